//! Copy guest files out to a host directory, safely.
//!
//! Guest names are data from a possibly hostile disk, so nothing here trusts them:
//! - Every guest name component goes through [`sanitize_name`] before it touches the host, and
//!   host paths are only ever built by joining sanitized components under the target. A
//!   sanitized component contains no separator and is never `.`/`..`, so the result is always
//!   below the target (checked again before each create).
//! - Files are created with `create_new` (O_CREAT|O_EXCL: an existing name, symlinks included,
//!   is never opened). With `overwrite`, an existing *regular file* is removed first and then
//!   created anew; an existing symlink, directory or device is never replaced.
//! - Directories we enter are checked with `symlink_metadata`: a host symlink in the way (say,
//!   one restored from the guest a moment earlier) stops that subtree, so writes never go
//!   through a link. Guest symlinks are recreated as symlinks holding their target text as
//!   stored, never resolved or followed ([`SymlinkMode`]).
//!
//! ## Name escaping (percent-encoding, injective)
//! Offending characters become `%XX` (two upper-case hex digits of the byte): `%` itself, `/`,
//! `\`, `:`, `<`, `>`, `"`, `|`, `?`, `*`, control characters (U+0000–U+001F, U+007F). Then:
//! `.` and `..` have their dots encoded (`%2E`, `%2E%2E`); a trailing dot or space is encoded
//! (Windows would strip it); a Windows reserved device name (CON, PRN, AUX, NUL, COM1–9,
//! LPT1–9, with any extension and any case) has its first letter encoded (`aux.txt` ->
//! `%61ux.txt`, `CON` -> `%43ON`). Because `%` is always
//! encoded, percent-decoding a host name gives back the guest name: two guest names never map
//! to one host name. (On a case-insensitive host, `A` and `a` still meet; the second is then
//! reported as existing, never overwritten.)
//!
//! ## Alternate data streams (NTFS)
//! Stream `S` of file `NAME` is written as the sibling file `NAME%%S` (both parts sanitized).
//! A sanitized name never contains `%%` (every `%` is followed by two hex digits), so stream
//! files cannot be confused with guest files. `NAME:S` would be unsafe (NTFS hosts would write
//! a real stream, other hosts reject or mangle `:`).
//!
//! ## Other rules
//! - Hard links (nlink > 1, same node met twice): the first copy is written, later names are
//!   host hard links to it.
//! - Sparse files stay sparse: all-zero 1 MiB pieces are not written, the length is set at the
//!   end.
//! - Times: modification and access times are set on files and directories (directories after
//!   their content). Unix permission bits (ext) are set without setuid/setgid/sticky (a restore
//!   must not create privileged programs).
//! - Errors on single entries (unreadable file, name the host refuses, existing file) are
//!   collected in [`ExtractReport::skipped`] and the extraction goes on.

use std::collections::HashMap;
use std::fs::{File, FileTimes, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::fs::{walk, FileType, GuestFs, Metadata, NodeId};
use crate::{Error, Result};

/// Size of the pieces files are copied in (and the unit of sparse detection).
pub const PIECE: usize = 1 << 20;

/// How guest symlinks and junctions are restored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SymlinkMode {
    /// A host symlink with the guest's target text, as stored (Unix hosts; elsewhere
    /// `TextFile`). Never followed by the extraction.
    #[default]
    Recreate,
    /// A small text file `NAME.symlink` holding the target text and a newline (safe on any host).
    TextFile,
    /// Not restored; listed in the report's skipped entries.
    Skip,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExtractOptions {
    /// Replace existing regular files (never symlinks, directories or devices).
    pub overwrite: bool,
    pub symlinks: SymlinkMode,
    /// Write NTFS alternate data streams as `NAME%%STREAM` files.
    pub streams: bool,
    /// Set modification/access times.
    pub times: bool,
    /// Set Unix permission bits where the guest has them.
    pub permissions: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            overwrite: false,
            symlinks: SymlinkMode::Recreate,
            streams: true,
            times: true,
            permissions: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Guest path as stored.
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Renamed {
    /// Guest path as stored.
    pub guest: String,
    /// Where it went on the host.
    pub host: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtractReport {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub streams: u64,
    /// Bytes of file and stream data restored (holes included).
    pub bytes: u64,
    pub skipped: Vec<Skipped>,
    /// Entries whose host name differs from the guest name (escaped characters).
    pub renamed: Vec<Renamed>,
}

const RESERVED: [&str; 4] = ["CON", "PRN", "AUX", "NUL"];

fn is_reserved_device(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or("").trim_end_matches(' ');
    let up = stem.to_ascii_uppercase();
    if RESERVED.contains(&up.as_str()) {
        return true;
    }
    let b = up.as_bytes();
    b.len() == 4
        && (up.starts_with("COM") || up.starts_with("LPT"))
        && (b'1'..=b'9').contains(&b[3])
}

fn must_escape(c: char) -> bool {
    matches!(
        c,
        '%' | '/' | '\\' | ':' | '<' | '>' | '"' | '|' | '?' | '*' | '\u{7f}'
    ) || (c as u32) < 0x20
}

fn push_escaped(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        out.push_str(&format!("%{b:02X}"));
    }
}

/// The host name for a guest name component (see the module doc for the scheme). `None` for an
/// empty name, which no host can represent.
pub fn sanitize_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    if name == "." || name == ".." {
        return Some("%2E".repeat(name.len()));
    }
    let chars: Vec<char> = name.chars().collect();
    let last = chars.len() - 1;
    let reserved = is_reserved_device(name);
    let mut out = String::with_capacity(name.len() + 8);
    for (i, &c) in chars.iter().enumerate() {
        let trailing = i == last && (c == '.' || c == ' ');
        if must_escape(c) || trailing || (reserved && i == 0) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Undo [`sanitize_name`] (for tools and tests); `None` if `host` is not a valid escaped name.
pub fn unsanitize_name(host: &str) -> Option<String> {
    let b = host.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = host.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Split a guest path into its components ('/' or '\\' separated, empty and "." dropped).
fn guest_components(path: &str) -> Vec<&str> {
    path.split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

struct Extractor<'a> {
    fs: &'a dyn GuestFs,
    target: PathBuf,
    opts: &'a ExtractOptions,
    report: ExtractReport,
    /// Node -> host path of the first copy, for hard links.
    linked: HashMap<NodeId, PathBuf>,
    /// Directories to stamp with times/permissions once their content is written.
    dirs_done: Vec<(PathBuf, Metadata)>,
}

/// Extract `guest_paths` (files or directories, recursively) into `target`, keeping each guest
/// path below the target (`/DOCS/a.txt` -> `TARGET/DOCS/a.txt`; `/` extracts the whole volume).
/// The target is created if missing. Problems with single entries are reported in
/// [`ExtractReport::skipped`]; a guest path that does not exist, or a target that cannot be
/// created, is an error.
pub fn extract(
    fs: &dyn GuestFs,
    guest_paths: &[&str],
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    std::fs::create_dir_all(target).map_err(|e| host_err(target, "create the target", e))?;
    let mut x = Extractor {
        fs,
        target: target.to_path_buf(),
        opts,
        report: ExtractReport::default(),
        linked: HashMap::new(),
        dirs_done: Vec::new(),
    };
    // Resolve every path first so a typo fails before anything is written.
    let mut starts = Vec::new();
    for gp in guest_paths {
        let node = fs.lookup(gp)?;
        starts.push((*gp, node));
    }
    for (gp, node) in starts {
        x.extract_one(gp, node)?;
    }
    // Innermost first, so setting a parent's time is not undone by stamping a child.
    let dirs = std::mem::take(&mut x.dirs_done);
    for (path, md) in dirs.iter().rev() {
        x.apply_metadata(path, md, true);
    }
    Ok(x.report)
}

fn host_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::InvalidArgument(format!("cannot {what} {}: {e}", path.display()))
}

impl Extractor<'_> {
    fn skip(&mut self, path: &str, reason: impl Into<String>) {
        self.report.skipped.push(Skipped {
            path: path.to_string(),
            reason: reason.into(),
        });
    }

    /// Sanitize `name`, noting renames; None (and a skip) for names no host can hold.
    fn host_name(&mut self, guest_path: &str, name: &str, parent: &Path) -> Option<PathBuf> {
        let Some(clean) = sanitize_name(name) else {
            self.skip(guest_path, "empty name");
            return None;
        };
        let host = parent.join(&clean);
        if clean != name {
            self.report.renamed.push(Renamed {
                guest: guest_path.to_string(),
                host: host.clone(),
            });
        }
        // Defence in depth: a sanitized component is one normal component.
        let mut comps = Path::new(&clean).components();
        if !matches!(
            (comps.next(), comps.next()),
            (Some(Component::Normal(_)), None)
        ) || !host.starts_with(&self.target)
        {
            self.skip(guest_path, "name would leave the target directory");
            return None;
        }
        Some(host)
    }

    /// Make sure `dir` is a real directory we may write into: create it, or accept an existing
    /// directory; a symlink or file in the way is refused.
    fn ensure_dir(&mut self, guest_path: &str, dir: &Path) -> bool {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_dir() => true,
            Ok(m) => {
                let what = if m.file_type().is_symlink() {
                    "a symlink"
                } else {
                    "not a directory"
                };
                self.skip(
                    guest_path,
                    format!("{} exists on the host and is {what}", dir.display()),
                );
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::create_dir(dir) {
                Ok(()) => {
                    self.report.directories += 1;
                    true
                }
                Err(e) => {
                    self.skip(guest_path, format!("cannot create {}: {e}", dir.display()));
                    false
                }
            },
            Err(e) => {
                self.skip(guest_path, format!("cannot inspect {}: {e}", dir.display()));
                false
            }
        }
    }

    fn extract_one(&mut self, guest_path: &str, node: NodeId) -> Result<()> {
        // Host directory for the guest path's parents: TARGET/comp1/comp2/...
        let comps = guest_components(guest_path);
        let mut parent = self.target.clone();
        let (dirs, last) = match comps.split_last() {
            Some((last, dirs)) => (dirs, Some(*last)),
            None => (&[][..], None),
        };
        let mut walked = String::new();
        for c in dirs {
            walked.push('/');
            walked.push_str(c);
            let Some(p) = self.host_name(&walked, c, &parent) else {
                return Ok(());
            };
            if !self.ensure_dir(&walked, &p) {
                return Ok(());
            }
            parent = p;
        }
        let md = self.fs.metadata(node)?;
        let host = match last {
            None => {
                // The root: its content goes straight into the target, whose own times and
                // permissions are the user's and stay as they are.
                if md.file_type != FileType::Directory {
                    return Err(Error::NotADirectory("/".into()));
                }
                self.target.clone()
            }
            Some(name) => {
                let Some(h) = self.host_name(guest_path, name, &parent) else {
                    return Ok(());
                };
                if md.file_type != FileType::Directory {
                    self.entry(guest_path, node, md.file_type, &h);
                    return Ok(());
                }
                if !self.ensure_dir(guest_path, &h) {
                    return Ok(());
                }
                self.dirs_done.push((h.clone(), md));
                h
            }
        };
        self.tree(guest_path, node, host)
    }

    /// Everything below directory `node`, whose host directory `host` exists.
    fn tree(&mut self, guest_path: &str, node: NodeId, host: PathBuf) -> Result<()> {
        let base = guest_path.trim_end_matches(['/', '\\']).to_string();
        // Host directory at each depth: [0] is the start; walk visits parents before children,
        // so the entry at depth d lives in host_dirs[d - 1]. None: that subtree is skipped.
        let mut host_dirs: Vec<Option<PathBuf>> = vec![Some(host)];
        let fs = self.fs;
        walk(fs, node, &mut |w| {
            host_dirs.truncate(w.depth);
            let gpath = format!("{base}/{}", w.path);
            let Some(Some(parent)) = host_dirs.get(w.depth - 1).cloned() else {
                return Ok(false);
            };
            let Some(h) = self.host_name(&gpath, &w.entry.name, &parent) else {
                return Ok(false);
            };
            if w.entry.file_type != FileType::Directory {
                self.entry(&gpath, w.entry.node, w.entry.file_type, &h);
                return Ok(false);
            }
            if w.is_loop {
                self.skip(
                    &gpath,
                    "directory loop (the directory contains its own ancestor)",
                );
                return Ok(false);
            }
            let ok = self.ensure_dir(&gpath, &h);
            if ok {
                match fs.metadata(w.entry.node) {
                    Ok(md) => self.dirs_done.push((h.clone(), md)),
                    Err(e) => self.skip(&gpath, format!("metadata: {e}")),
                }
            }
            host_dirs.push(ok.then_some(h));
            Ok(ok)
        })
    }

    /// A non-directory entry.
    fn entry(&mut self, gpath: &str, node: NodeId, ft: FileType, host: &Path) {
        let r = match ft {
            FileType::File => self.file(gpath, node, host),
            FileType::Symlink | FileType::Junction => self.link(gpath, node, host),
            FileType::Other => {
                Err("device, fifo, socket or unknown reparse point: not restored".into())
            }
            FileType::Directory => Ok(()),
        };
        if let Err(reason) = r {
            self.skip(gpath, reason);
        }
    }

    /// Create a new file at `host` (replacing an existing regular file only with `overwrite`).
    fn create(&self, host: &Path) -> std::result::Result<File, String> {
        if let Ok(m) = std::fs::symlink_metadata(host) {
            if !self.opts.overwrite {
                return Err(format!(
                    "{} already exists (not overwritten; use overwrite to replace files)",
                    host.display()
                ));
            }
            if !m.file_type().is_file() {
                return Err(format!(
                    "{} exists and is not a regular file (never replaced)",
                    host.display()
                ));
            }
            std::fs::remove_file(host)
                .map_err(|e| format!("cannot replace {}: {e}", host.display()))?;
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(host)
            .map_err(|e| format!("cannot create {}: {e}", host.display()))
    }

    fn file(&mut self, gpath: &str, node: NodeId, host: &Path) -> std::result::Result<(), String> {
        let md = self.fs.metadata(node).map_err(|e| e.to_string())?;
        if md.nlink > 1 {
            if let Some(first) = self.linked.get(&node).cloned() {
                if std::fs::symlink_metadata(host).is_ok() && !self.opts.overwrite {
                    return Err(format!(
                        "{} already exists (not overwritten)",
                        host.display()
                    ));
                }
                if self.opts.overwrite {
                    if let Ok(m) = std::fs::symlink_metadata(host) {
                        if !m.file_type().is_file() {
                            return Err(format!(
                                "{} exists and is not a regular file",
                                host.display()
                            ));
                        }
                        let _ = std::fs::remove_file(host);
                    }
                }
                std::fs::hard_link(&first, host)
                    .map_err(|e| format!("cannot hard-link {}: {e}", host.display()))?;
                self.report.hard_links += 1;
                return Ok(());
            }
        }
        self.copy_stream(gpath, node, None, md.size, host)?;
        self.report.files += 1;
        if md.nlink > 1 {
            self.linked.insert(node, host.to_path_buf());
        }
        if self.opts.streams {
            for s in &md.streams {
                let (Some(base), Some(sname)) = (
                    host.file_name().and_then(|n| n.to_str()),
                    sanitize_name(&s.name),
                ) else {
                    self.skip(gpath, format!("stream {:?}: unusable name", s.name));
                    continue;
                };
                let spath = host.with_file_name(format!("{base}%%{sname}"));
                match self.copy_stream(gpath, node, Some(&s.name), s.size, &spath) {
                    Ok(()) => self.report.streams += 1,
                    Err(e) => self.skip(gpath, format!("stream {:?}: {e}", s.name)),
                }
            }
        }
        self.apply_metadata(host, &md, false);
        Ok(())
    }

    fn copy_stream(
        &mut self,
        gpath: &str,
        node: NodeId,
        stream: Option<&str>,
        size: u64,
        host: &Path,
    ) -> std::result::Result<(), String> {
        let mut out = self.create(host)?;
        let r = self.copy_into(node, stream, size, &mut out);
        if let Err(e) = r {
            drop(out);
            let _ = std::fs::remove_file(host);
            return Err(format!("{e} (partial {} removed)", host.display()));
        }
        let _ = gpath;
        self.report.bytes += size;
        Ok(())
    }

    fn copy_into(
        &self,
        node: NodeId,
        stream: Option<&str>,
        size: u64,
        out: &mut File,
    ) -> std::result::Result<(), String> {
        let mut buf = vec![0u8; PIECE];
        let mut pos = 0u64;
        while pos < size {
            let want = (size - pos).min(PIECE as u64) as usize;
            let mut got = 0;
            while got < want {
                let n = self
                    .fs
                    .read_at(node, stream, &mut buf[got..want], pos + got as u64)
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err(format!(
                        "the guest file ends at {} bytes but says it holds {size}",
                        pos + got as u64
                    ));
                }
                got += n;
            }
            if vdisk::io::is_zero(&buf[..want]) {
                // A hole (or zeros): leave it unwritten so the host file stays sparse.
                out.seek(SeekFrom::Current(want as i64))
                    .map_err(|e| e.to_string())?;
            } else {
                out.write_all(&buf[..want]).map_err(|e| e.to_string())?;
            }
            pos += want as u64;
        }
        out.set_len(size).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn link(&mut self, gpath: &str, node: NodeId, host: &Path) -> std::result::Result<(), String> {
        let target = self.fs.read_link(node).map_err(|e| e.to_string())?.target;
        let mode = if cfg!(unix) {
            self.opts.symlinks
        } else if self.opts.symlinks == SymlinkMode::Recreate {
            SymlinkMode::TextFile
        } else {
            self.opts.symlinks
        };
        match mode {
            SymlinkMode::Skip => Err(format!("symlink to {target:?}: symlinks not restored")),
            SymlinkMode::TextFile => {
                let name = host
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or("unusable name")?;
                let p = host.with_file_name(format!("{name}.symlink"));
                let mut f = self.create(&p)?;
                f.write_all(format!("{target}\n").as_bytes())
                    .map_err(|e| e.to_string())?;
                self.report.symlinks += 1;
                Ok(())
            }
            SymlinkMode::Recreate => {
                if target.contains('\0') {
                    return Err(format!("symlink target {target:?} contains NUL"));
                }
                if std::fs::symlink_metadata(host).is_ok() {
                    // Never replace anything with a link (even with overwrite): a link put where
                    // a file was could redirect a later write.
                    return Err(format!(
                        "{} already exists (not replaced by a symlink)",
                        host.display()
                    ));
                }
                make_symlink(&target, host)
                    .map_err(|e| format!("cannot create symlink {}: {e}", host.display()))?;
                let _ = gpath;
                self.report.symlinks += 1;
                Ok(())
            }
        }
    }

    /// Times and permission bits; failures are reported, not fatal.
    fn apply_metadata(&mut self, host: &Path, md: &Metadata, is_dir: bool) {
        #[cfg(unix)]
        if self.opts.permissions {
            if let Some(mode) = md.mode {
                use std::os::unix::fs::PermissionsExt;
                let perm = std::fs::Permissions::from_mode(mode & 0o777);
                if let Err(e) = std::fs::set_permissions(host, perm) {
                    self.skip(&host.display().to_string(), format!("permissions: {e}"));
                }
            }
        }
        if !self.opts.times {
            return;
        }
        let mut times = FileTimes::new();
        let mut any = false;
        if let Some(t) = md.mtime.and_then(to_system_time) {
            times = times.set_modified(t);
            any = true;
        }
        if let Some(t) = md.atime.and_then(to_system_time) {
            times = times.set_accessed(t);
            any = true;
        }
        if !any {
            return;
        }
        // Opening for the timestamp: a file we just created, or a directory we checked is a
        // real directory. Files need write access on some hosts; directories open read-only.
        let f = if is_dir {
            File::open(host)
        } else {
            OpenOptions::new().write(true).open(host)
        };
        if let Err(e) = f.and_then(|f| f.set_times(times)) {
            self.skip(&host.display().to_string(), format!("timestamps: {e}"));
        }
    }
}

#[cfg(unix)]
fn make_symlink(target: &str, host: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, host)
}

#[cfg(not(unix))]
fn make_symlink(_target: &str, _host: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "symlinks are only recreated on Unix hosts",
    ))
}

/// Nanoseconds since the epoch to a `SystemTime` (None when not representable).
fn to_system_time(ns: i128) -> Option<SystemTime> {
    let secs = ns.div_euclid(1_000_000_000);
    let sub = ns.rem_euclid(1_000_000_000) as u32;
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(u64::try_from(secs).ok()?, sub))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(u64::try_from(-secs).ok()?))?
            .checked_add(Duration::from_nanos(u64::from(sub)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_safe() {
        let names = [
            "..",
            ".",
            "a\\b",
            "a/b",
            "C:x",
            "CON",
            "con",
            "aux.txt",
            "COM1",
            "lpt9.log",
            "a\0b",
            "tab\there",
            "trail.",
            "trail ",
            "100%",
            "%25",
            "ok.txt",
            "COM0",
            "CONSOLE",
            "a:b",
            "x%2Ey",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let s = sanitize_name(n).unwrap();
            assert!(!s.contains(['/', '\\', ':', '\0']), "{n:?} -> {s}");
            assert!(s != "." && s != "..");
            assert!(!is_reserved_device(&s), "{n:?} -> {s}");
            assert!(!s.ends_with(['.', ' ']));
            assert_eq!(unsanitize_name(&s).as_deref(), Some(n));
            assert!(seen.insert(s.clone()), "collision at {n:?}");
        }
        assert_eq!(sanitize_name("..").unwrap(), "%2E%2E");
        assert_eq!(sanitize_name("aux.txt").unwrap(), "%61ux.txt");
        assert_eq!(sanitize_name("C:x").unwrap(), "C%3Ax");
        assert_eq!(sanitize_name("ok.txt").unwrap(), "ok.txt");
        assert_eq!(sanitize_name("COM0").unwrap(), "COM0");
        assert_eq!(sanitize_name(""), None);
    }

    #[test]
    fn times_convert() {
        assert_eq!(to_system_time(0), Some(UNIX_EPOCH));
        assert_eq!(
            to_system_time(-1_500_000_000),
            UNIX_EPOCH.checked_sub(Duration::from_millis(1500))
        );
    }
}
