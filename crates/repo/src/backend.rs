//! Object storage. The repository is a set of immutable objects addressed by key
//! (`config`, `keys/<id>`, `data/<2 hex>/<pack id>`, `index/<id>`, `snapshots/<id>`,
//! `locks/<id>`). Every object is written once, whole, and never modified; deletes are the only
//! other change. That is all an object store offers, so the local directory offers no more.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::{Error, Result};

/// Kinds of objects, each under its own key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    Lock,
}

impl ObjectKind {
    pub fn prefix(self) -> &'static str {
        match self {
            ObjectKind::Config => "",
            ObjectKind::Key => "keys",
            ObjectKind::Pack => "data",
            ObjectKind::Index => "index",
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Lock => "locks",
        }
    }

    /// The object's full key, as used in messages: `config`, `data/ab/ab12…`, `index/…`.
    pub fn key(self, name: &str) -> String {
        match self {
            ObjectKind::Config => name.to_string(),
            ObjectKind::Pack => format!("data/{}/{name}", name.get(..2).unwrap_or("")),
            _ => format!("{}/{name}", self.prefix()),
        }
    }
}

/// The name of the repository's configuration object (kind [`ObjectKind::Config`]).
pub const CONFIG_NAME: &str = "config";

/// One object as listed: its name (the id, without prefix) and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    /// When the object was written, where the backend knows it (prune's grace period for
    /// packs that no index mentions yet).
    pub modified: Option<SystemTime>,
}

/// Storage of whole objects. Implementations must make `put` atomic (readers see the whole
/// object or nothing) and durable when it returns; `list` order is unspecified.
pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;
    /// Store `data` as object `name` of `kind`. Writing an existing name replaces it whole.
    fn put(&self, kind: ObjectKind, name: &str, data: &[u8]) -> Result<()>;
    /// Read a whole object. `Error::Missing` if absent.
    fn get(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>>;
    /// Read `length` bytes at `offset` of an object. `Error::Missing` if absent,
    /// `Error::Corrupt` if the object is shorter than the range.
    fn get_range(&self, kind: ObjectKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// All objects of a kind.
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;
    /// Remove an object; removing a missing object is not an error.
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()>;
    /// Whether an object exists.
    fn exists(&self, kind: ObjectKind, name: &str) -> Result<bool>;
    /// Prepare an empty location for a new repository (directories, buckets). Called once by
    /// `Repository::init`; object stores need nothing.
    fn create_layout(&self) -> Result<()> {
        Ok(())
    }
    /// Remove leftovers of interrupted puts older than `older_than` (prune calls this; object
    /// stores have none). Returns (count, bytes) removed.
    fn remove_stale_temp_files(&self, older_than: std::time::Duration) -> Result<(u64, u64)> {
        let _ = older_than;
        Ok((0, 0))
    }
}

/// A repository in a local directory (the embedded default).
///
/// Layout: `<root>/config`, `<root>/keys/<id>`, `<root>/data/<00..ff>/<pack id>`,
/// `<root>/index/<id>`, `<root>/snapshots/<id>`, `<root>/locks/<id>`. Puts write
/// `<final name>.tmp-<random>`, fsync it, rename it over the final name and fsync the directory:
/// the rename is this backend's private means to atomic puts, nothing above relies on it.
#[derive(Clone, Debug)]
pub struct LocalBackend {
    pub root: PathBuf,
}

const TEMP_MARKER: &str = ".tmp-";

impl LocalBackend {
    /// A backend on `root`, whether or not a repository exists there yet.
    pub fn new(root: impl Into<PathBuf>) -> LocalBackend {
        LocalBackend { root: root.into() }
    }

    /// An existing repository: `Error::NoRepository` unless `root/config` exists.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalBackend> {
        let b = LocalBackend::new(root);
        if !b.exists(ObjectKind::Config, CONFIG_NAME)? {
            return Err(Error::NoRepository(b.location()));
        }
        Ok(b)
    }

    fn path(&self, kind: ObjectKind, name: &str) -> Result<PathBuf> {
        check_name(kind, name)?;
        Ok(match kind {
            ObjectKind::Config => self.root.join(name),
            ObjectKind::Pack => self.root.join("data").join(&name[..2]).join(name),
            _ => self.root.join(kind.prefix()).join(name),
        })
    }

    fn io_error(&self, doing: &str, kind: ObjectKind, name: &str, e: std::io::Error) -> Error {
        let key = kind.key(name);
        if is_no_space(&e) {
            Error::io(
                format!(
                    "{doing} {key} in the repository at {}: no space left on the device holding it \
                     (free space there, then retry; nothing partial was left behind)",
                    self.location()
                ),
                e,
            )
        } else {
            Error::io(
                format!("{doing} {key} in the repository at {}", self.location()),
                e,
            )
        }
    }

    fn write_temp_and_rename(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        self.write_temp_and_rename_with(path, data, &|tmp| {
            File::options().write(true).create_new(true).open(tmp)
        })
    }

    /// `open_temp` creates the temp file; tests substitute one that fails like a full disk.
    fn write_temp_and_rename_with(
        &self,
        path: &Path,
        data: &[u8],
        open_temp: &dyn Fn(&Path) -> std::io::Result<File>,
    ) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut rnd = [0u8; 8];
        crate::crypto::random_bytes(&mut rnd);
        let tmp = dir.join(format!(
            "{file_name}{TEMP_MARKER}{}",
            crate::crypto::to_hex(&rnd)
        ));
        let mut file = match open_temp(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A directory missing (a repository made by a tool that creates directories
                // lazily, or a deleted subdirectory): objects stores have no directories, so
                // neither may we depend on them existing.
                fs::create_dir_all(dir)?;
                open_temp(&tmp)?
            }
            Err(e) => return Err(e),
        };
        let written = write_data(&mut file, data)
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                drop(file);
                fs::rename(&tmp, path)
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(dir);
        Ok(())
    }
}

/// Writes of at least this many bytes (packs) bypass the page cache where the platform allows.
const DIRECT_MIN: usize = 1 << 20;
/// O_DIRECT needs buffer, offset and length aligned to the device's logical block size; 4096
/// covers every common one (512 and 4096).
const DIRECT_ALIGN: usize = 4096;
/// Bytes copied into the aligned bounce buffer per direct write.
const DIRECT_BOUNCE: usize = 8 << 20;

/// Write `data` at the file's start. Large objects (packs: tens of MiB each, the whole volume of
/// a backup) go through O_DIRECT on Linux: a buffered write copies every byte into the page cache
/// (in a backup's profile that kernel copy cost about as much CPU as BLAKE3 plus encryption),
/// while the data is written once and never read back by this process. The aligned bulk is
/// written direct, straight from `data` when it starts 4096-aligned in memory (packs, which
/// `PackWriter` builds that way), else copied through an aligned bounce buffer (a user-space
/// memcpy of a few MiB that stays in cache); the unaligned tail is written buffered.
/// Durability is unchanged: the caller still fsyncs the file (metadata, the buffered tail)
/// before the rename. Where O_DIRECT is refused (file systems without it, EINVAL for other
/// alignments) the write falls back to the buffered path.
fn write_data(file: &mut File, data: &[u8]) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if data.len() >= DIRECT_MIN {
        return write_direct(file, data);
    }
    file.write_all(data)
}

#[cfg(target_os = "linux")]
fn write_direct(file: &mut File, data: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// One aligned block; a Vec of these is an aligned buffer without unsafe allocation.
    #[derive(Clone, Copy)]
    #[repr(C, align(4096))]
    struct Block([u8; DIRECT_ALIGN]);

    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let set = |f: libc::c_int| unsafe { libc::fcntl(fd, libc::F_SETFL, f) } == 0;
    if flags < 0 || !set(flags | libc::O_DIRECT) {
        return file.write_all(data);
    }
    thread_local! {
        // Kept per thread (a backup's uploaders write many packs each): allocating it per pack
        // costs page faults and zeroing comparable to the copy it serves.
        static BOUNCE: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // A buffer that is already aligned (a pack built in place by `PackWriter`) is written
    // straight from where it is: the bounce copy exists only for alignment.
    let result = if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        direct_bulk(file, data, None)
    } else {
        BOUNCE.with(|b| {
            let mut blocks = b.borrow_mut();
            if blocks.is_empty() {
                *blocks = vec![Block([0; DIRECT_ALIGN]); DIRECT_BOUNCE / DIRECT_ALIGN];
            }
            // SAFETY: `Block` is plain bytes with no padding; the slice covers exactly the
            // blocks.
            let bounce: &mut [u8] = unsafe {
                std::slice::from_raw_parts_mut(
                    blocks.as_mut_ptr().cast::<u8>(),
                    blocks.len() * DIRECT_ALIGN,
                )
            };
            direct_bulk(file, data, Some(bounce))
        })
    };
    set(flags);
    match result {
        Ok(done) => file.write_all(&data[done..]),
        Err(e) => Err(e),
    }
}

/// Write the aligned bulk of `data` with O_DIRECT set, in pieces of the bounce buffer's size:
/// copied through `bounce` when `data` is not 4096-aligned in memory, straight from `data`
/// (`bounce` = None) when it is. Returns how many bytes were written; the caller writes the rest
/// buffered.
#[cfg(target_os = "linux")]
fn direct_bulk(
    file: &mut File,
    data: &[u8],
    mut bounce: Option<&mut [u8]>,
) -> std::io::Result<usize> {
    let bulk = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let piece = bounce.as_ref().map_or(DIRECT_BOUNCE, |b| b.len());
    let mut done = 0;
    while done < bulk {
        let n = piece.min(bulk - done);
        let src = &data[done..done + n];
        let buf: &[u8] = match bounce.as_deref_mut() {
            Some(b) => {
                b[..n].copy_from_slice(src);
                &b[..n]
            }
            None => src,
        };
        match file.write(buf) {
            Ok(w) if w == n => done += n,
            // A short or refused direct write: finish buffered from where the file stands.
            Ok(w) => {
                done += w;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The object is not there: no such file, or a path component is not a directory (the
/// "repository" is a file).
fn is_not_found(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// ENOSPC or a quota exceeded: the disk holding the repository is full.
fn is_no_space(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        return true;
    }
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Make a rename or unlink in `dir` durable. Best effort: not every platform or file system
/// can open or sync a directory, and the data itself is already synced.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Object names are ids (hex) or `config`: anything else (a `/`, `..`, an empty name) would
/// let a damaged or hostile name escape its directory.
fn check_name(kind: ObjectKind, name: &str) -> Result<()> {
    let ok = match kind {
        ObjectKind::Config => name == CONFIG_NAME,
        ObjectKind::Pack => {
            name.len() >= 2 && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_hexdigit())
        }
        _ => {
            !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }
    };
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{name:?} is not a valid name for a repository object of kind {kind:?}"
        )))
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, kind: ObjectKind, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(kind, name)?;
        self.write_temp_and_rename(&path, data)
            .map_err(|e| self.io_error("writing", kind, name, e))
    }

    fn get(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        let path = self.path(kind, name)?;
        match fs::read(&path) {
            Ok(d) => Ok(d),
            Err(e) if is_not_found(&e) => Err(Error::Missing(kind.key(name))),
            Err(e) => Err(self.io_error("reading", kind, name, e)),
        }
    }

    fn get_range(&self, kind: ObjectKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let path = self.path(kind, name)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Err(Error::Missing(kind.key(name))),
            Err(e) => return Err(self.io_error("opening", kind, name, e)),
        };
        let size = file
            .metadata()
            .map_err(|e| self.io_error("reading", kind, name, e))?
            .len();
        // Check against the real size before allocating: `length` comes from an index entry.
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                kind.key(name),
                format!("object is {size} bytes, too short for {length} bytes at offset {offset}"),
            ));
        }
        let len = usize::try_from(length).map_err(|_| {
            Error::InvalidArgument(format!(
                "range of {length} bytes is too large to read at once"
            ))
        })?;
        let mut buf = vec![0u8; len];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| self.io_error("reading", kind, name, e))?;
        Ok(buf)
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        match kind {
            ObjectKind::Config => {
                if let Ok(m) = fs::metadata(self.root.join(CONFIG_NAME)) {
                    if m.is_file() {
                        out.push(ObjectInfo {
                            name: CONFIG_NAME.into(),
                            size: m.len(),
                            modified: m.modified().ok(),
                        });
                    }
                }
            }
            ObjectKind::Pack => {
                let data = self.root.join("data");
                let subdirs = match fs::read_dir(&data) {
                    Ok(d) => d,
                    Err(e) if is_not_found(&e) => return Ok(out),
                    Err(e) => return Err(Error::io(format!("listing {}", data.display()), e)),
                };
                for sub in subdirs {
                    let sub =
                        sub.map_err(|e| Error::io(format!("listing {}", data.display()), e))?;
                    let sub_name = sub.file_name().to_string_lossy().into_owned();
                    if sub_name.len() != 2 || !sub_name.bytes().all(|b| b.is_ascii_hexdigit()) {
                        continue;
                    }
                    list_dir(&sub.path(), &mut out, |n| {
                        n.starts_with(&sub_name) && check_name(kind, n).is_ok()
                    })?;
                }
            }
            _ => list_dir(&self.root.join(kind.prefix()), &mut out, |n| {
                check_name(kind, n).is_ok()
            })?,
        }
        Ok(out)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let path = self.path(kind, name)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sync_dir(dir);
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.io_error("deleting", kind, name, e)),
        }
    }

    fn exists(&self, kind: ObjectKind, name: &str) -> Result<bool> {
        let path = self.path(kind, name)?;
        match path.try_exists() {
            Ok(b) => Ok(b),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.io_error("looking for", kind, name, e)),
        }
    }

    fn remove_stale_temp_files(&self, older_than: std::time::Duration) -> Result<(u64, u64)> {
        let now = SystemTime::now();
        let mut dirs = vec![self.root.clone()];
        for kind in [
            ObjectKind::Key,
            ObjectKind::Index,
            ObjectKind::Snapshot,
            ObjectKind::Lock,
        ] {
            dirs.push(self.root.join(kind.prefix()));
        }
        for i in 0..=255u8 {
            dirs.push(self.root.join("data").join(format!("{i:02x}")));
        }
        let (mut count, mut bytes) = (0u64, 0u64);
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_name().to_string_lossy().contains(TEMP_MARKER) {
                    continue;
                }
                let Ok(meta) = e.metadata() else { continue };
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age >= older_than);
                if meta.is_file() && old && fs::remove_file(e.path()).is_ok() {
                    count += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((count, bytes))
    }

    fn create_layout(&self) -> Result<()> {
        let mk = |p: PathBuf| {
            fs::create_dir_all(&p).map_err(|e| {
                if is_no_space(&e) {
                    Error::io(format!("creating {}: no space left", p.display()), e)
                } else {
                    Error::io(format!("creating {}", p.display()), e)
                }
            })
        };
        // Only into a new or empty directory (or one holding just our layout): `init` on the
        // wrong path must not scatter directories among someone's files.
        match fs::read_dir(&self.root) {
            Ok(entries) => {
                let ours = ["keys", "data", "index", "snapshots", "locks"];
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !ours.contains(&name.as_str()) {
                        return Err(Error::InvalidArgument(format!(
                            "{} is not empty (it holds {name:?}); choose a new or empty directory \
                             for the repository",
                            self.location()
                        )));
                    }
                }
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("cannot use {} for a repository", self.location()),
                    e,
                ))
            }
        }
        mk(self.root.clone())?;
        for kind in [
            ObjectKind::Key,
            ObjectKind::Index,
            ObjectKind::Snapshot,
            ObjectKind::Lock,
        ] {
            mk(self.root.join(kind.prefix()))?;
        }
        for i in 0..=255u8 {
            mk(self.root.join("data").join(format!("{i:02x}")))?;
        }
        sync_dir(&self.root);
        Ok(())
    }
}

fn list_dir(dir: &Path, out: &mut Vec<ObjectInfo>, accept: impl Fn(&str) -> bool) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(TEMP_MARKER) || !accept(&name) {
            continue;
        }
        // An object deleted between read_dir and metadata is simply not listed.
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push(ObjectInfo {
            name,
            size: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hexname(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    /// Large puts take the O_DIRECT path (aligned bulk through the bounce buffer, buffered
    /// tail): every size round-trips byte for byte, including several bounce buffers' worth.
    #[test]
    fn large_puts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create_layout().unwrap();
        for (i, len) in [
            DIRECT_MIN,
            DIRECT_MIN + 1,
            DIRECT_MIN + DIRECT_ALIGN - 1,
            2 * DIRECT_BOUNCE + DIRECT_ALIGN + 777,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (j * 31 + j / 4096 + i) as u8).collect();
            let name = hexname(char::from(b'a' + i as u8));
            b.put(ObjectKind::Pack, &name, &data).unwrap();
            assert!(
                b.get(ObjectKind::Pack, &name).unwrap() == data,
                "size {len}"
            );
        }
    }

    #[test]
    fn put_get_list_delete_range() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        assert!(matches!(
            LocalBackend::open(&root),
            Err(Error::NoRepository(_))
        ));
        let b = LocalBackend::new(&root);
        b.create_layout().unwrap();
        assert!(root.join("data/00").is_dir() && root.join("data/ff").is_dir());
        assert!(root.join("keys").is_dir() && root.join("locks").is_dir());

        b.put(ObjectKind::Config, CONFIG_NAME, b"{}").unwrap();
        LocalBackend::open(&root).unwrap();

        let p1 = hexname('a');
        let p2 = hexname('b');
        b.put(ObjectKind::Pack, &p1, b"hello world").unwrap();
        b.put(ObjectKind::Pack, &p2, b"second").unwrap();
        assert!(root.join("data/aa").join(&p1).is_file());
        assert_eq!(b.get(ObjectKind::Pack, &p1).unwrap(), b"hello world");
        assert_eq!(b.get_range(ObjectKind::Pack, &p1, 6, 5).unwrap(), b"world");
        assert_eq!(b.get_range(ObjectKind::Pack, &p1, 11, 0).unwrap(), b"");
        assert!(matches!(
            b.get_range(ObjectKind::Pack, &p1, 6, 6),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            b.get_range(ObjectKind::Pack, &p1, u64::MAX, 2),
            Err(Error::Corrupt { .. })
        ));
        let mut names: Vec<_> = b.list(ObjectKind::Pack).unwrap();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(names.len(), 2);
        assert_eq!(names[0].name, p1);
        assert_eq!(names[0].size, 11);
        assert!(names[0].modified.is_some());

        // Temp files (a crashed put) and foreign files are never listed.
        std::fs::write(root.join("index").join(format!("{p1}.tmp-0011")), b"x").unwrap();
        std::fs::write(root.join("index").join("notes.txt"), b"x").unwrap();
        std::fs::write(root.join("data/aa/README"), b"x").unwrap();
        b.put(ObjectKind::Index, &p2, b"idx").unwrap();
        let idx = b.list(ObjectKind::Index).unwrap();
        assert_eq!(idx.len(), 1);
        assert_eq!(idx[0].name, p2);

        // Replace whole.
        b.put(ObjectKind::Index, &p2, b"idx2").unwrap();
        assert_eq!(b.get(ObjectKind::Index, &p2).unwrap(), b"idx2");

        assert!(b.exists(ObjectKind::Pack, &p1).unwrap());
        b.delete(ObjectKind::Pack, &p1).unwrap();
        b.delete(ObjectKind::Pack, &p1).unwrap();
        assert!(!b.exists(ObjectKind::Pack, &p1).unwrap());
        match b.get(ObjectKind::Pack, &p1) {
            Err(Error::Missing(k)) => assert_eq!(k, format!("data/aa/{p1}")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            b.get_range(ObjectKind::Pack, &p1, 0, 1),
            Err(Error::Missing(_))
        ));
        assert_eq!(b.list(ObjectKind::Config).unwrap().len(), 1);
        assert_eq!(b.list(ObjectKind::Pack).unwrap().len(), 1);
        // The crashed put's temp file goes when old enough, not before.
        let tmp = root.join("index").join(format!("{p1}.tmp-0011"));
        assert_eq!(
            b.remove_stale_temp_files(std::time::Duration::from_secs(3600))
                .unwrap(),
            (0, 0)
        );
        assert!(tmp.exists());
        assert_eq!(
            b.remove_stale_temp_files(std::time::Duration::ZERO)
                .unwrap(),
            (1, 1)
        );
        assert!(!tmp.exists());
        assert!(b.list(ObjectKind::Snapshot).unwrap().is_empty());
    }

    #[test]
    fn hostile_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        for (kind, name) in [
            (ObjectKind::Index, "../x"),
            (ObjectKind::Index, ""),
            (ObjectKind::Snapshot, "a/b"),
            (ObjectKind::Pack, "zz"),
            (ObjectKind::Pack, "a"),
            (ObjectKind::Config, "other"),
        ] {
            assert!(
                matches!(b.put(kind, name, b"x"), Err(Error::InvalidArgument(_))),
                "{kind:?} {name:?}"
            );
        }
    }

    #[test]
    fn missing_directories_are_created_on_put() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("lazy"));
        b.put(ObjectKind::Snapshot, &hexname('c'), b"s").unwrap();
        assert_eq!(b.get(ObjectKind::Snapshot, &hexname('c')).unwrap(), b"s");
    }

    /// A full disk: the error names the object, the repository and "no space left".
    #[cfg(target_os = "linux")]
    #[test]
    fn no_space_error_is_clear_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create_layout().unwrap();
        let name = hexname('d');
        let path = b.path(ObjectKind::Pack, &name).unwrap();
        // The temp file is created as usual, but the handle written to is /dev/full, where
        // every write fails with ENOSPC exactly as on a full file system.
        let full_disk = |tmp: &Path| {
            File::options().write(true).create_new(true).open(tmp)?;
            File::options().write(true).open("/dev/full")
        };
        let e = b
            .write_temp_and_rename_with(&path, &[7u8; 100_000], &full_disk)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        let msg = b
            .io_error("writing", ObjectKind::Pack, &name, e)
            .to_string();
        assert!(msg.contains("no space left"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains(&format!("data/dd/{name}")), "{msg}");
        // Nothing visible, nothing left behind.
        assert!(!b.exists(ObjectKind::Pack, &name).unwrap());
        let left = std::fs::read_dir(dir.path().join("data/dd"))
            .unwrap()
            .count();
        assert_eq!(left, 0);
    }

    /// Any failure after the temp file exists removes it and leaves no object.
    #[cfg(target_os = "linux")]
    #[test]
    fn failed_put_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create_layout().unwrap();
        let name = hexname('e');
        // The final name is a non-empty directory: the write succeeds, the rename fails.
        let target = dir.path().join("index").join(&name);
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        assert!(b.put(ObjectKind::Index, &name, b"data").is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("index"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
