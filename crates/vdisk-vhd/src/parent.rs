//! Finding the parent of a differencing VHD.
//!
//! Order: the caller's override, then the `W2ru` (relative) locator, then `W2ku` (absolute; on
//! Linux also with the drive letter stripped), then the deprecated `Wi2r`/`Wi2k`, then the parent
//! unicode name next to the child. Windows paths use backslashes; we convert them. A candidate
//! counts only if its unique id equals the one the child records: a file with the right name but
//! another identity is a different disk, and reading through it would silently mix two disks.

use std::path::{Component, Path, PathBuf};

use vdisk_core::{Error, Result};

use crate::disk::{read_footer, Vhd};
use crate::format::*;

/// `C:\dir\x.vhd` -> `/dir/x.vhd`; anything else unchanged.
fn strip_drive(p: &str) -> Option<String> {
    let b = p.as_bytes();
    if b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'/' {
        Some(p[2..].to_string())
    } else {
        None
    }
}

/// The candidate paths for the parent of `child`, in the order we try them, with a label each.
pub(crate) fn candidates(vhd: &Vhd, child: &Path) -> Vec<(String, PathBuf)> {
    let dir = child
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let locs = vhd.parent_locators();
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    let mut add = |label: String, p: PathBuf| {
        if !out.iter().any(|(_, q)| *q == p) {
            out.push((label, p));
        }
    };
    let order = [PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_WI2R, PLATFORM_WI2K];
    for code in order {
        for (c, raw) in locs.iter().filter(|(c, _)| *c == code) {
            let label = format!("{} locator", tag_string(c));
            let conv = raw.replace('\\', "/");
            if code == PLATFORM_W2RU || code == PLATFORM_WI2R {
                add(label, dir.join(&conv));
            } else {
                add(label.clone(), PathBuf::from(raw));
                add(label.clone(), PathBuf::from(&conv));
                if let Some(s) = strip_drive(&conv) {
                    add(label, PathBuf::from(s));
                }
            }
        }
    }
    if let Some(name) = vhd.parent_name().filter(|n| !n.is_empty()) {
        let conv = name.replace('\\', "/");
        if let Some(file) = Path::new(&conv).file_name() {
            add("parent name".into(), dir.join(file));
        }
    }
    out
}

/// Find the parent file of the differencing disk `vhd` opened from `child`, and check that it is
/// the disk the child was made from.
pub(crate) fn resolve(vhd: &Vhd, child: &Path, override_path: Option<&Path>) -> Result<PathBuf> {
    let want = vhd.parent_unique_id().unwrap_or_default();
    let cands = match override_path {
        Some(p) => vec![("--parent".to_string(), p.to_path_buf())],
        None => candidates(vhd, child),
    };
    let mut mismatches = Vec::new();
    for (label, p) in &cands {
        if !p.is_file() {
            continue;
        }
        let file = std::fs::File::open(p)
            .map_err(|e| Error::io(format!("cannot open parent {}", p.display()), e))?;
        match read_footer(&file) {
            Ok((f, _, _)) if f.unique_id == want => return Ok(p.clone()),
            Ok((f, _, _)) => mismatches.push(format!(
                "{} (from the {label}) has unique id {}",
                p.display(),
                f.unique_id
            )),
            Err(e) => mismatches.push(format!(
                "{} (from the {label}) is not a readable VHD: {e}",
                p.display()
            )),
        }
    }
    if !mismatches.is_empty() {
        return Err(Error::Parent(format!(
            "wrong parent for differencing disk {}: it expects parent unique id {want}, but {}. \
             The parent was replaced or changed; if you know the right parent file, pass it with --parent",
            child.display(),
            mismatches.join("; ")
        )));
    }
    let tried: Vec<String> = cands
        .iter()
        .map(|(l, p)| format!("{} ({l})", p.display()))
        .collect();
    Err(Error::Parent(format!(
        "cannot find the parent (unique id {want}) of differencing disk {}: tried {}. \
         Pass the parent file with --parent",
        child.display(),
        if tried.is_empty() {
            "nothing (no locators, no name)".to_string()
        } else {
            tried.join(", ")
        }
    )))
}

/// The path of `target` relative to directory `from`, Windows style (`.\x.vhd`, `..\d\x.vhd`),
/// as Hyper-V writes `W2ru` locators. Both paths must be absolute.
pub(crate) fn relative_windows_path(from: &Path, target: &Path) -> String {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    if common == a.len() {
        parts.push(".".into());
    }
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    parts.join("\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            ".\\p.vhd"
        );
        assert_eq!(
            relative_windows_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            "..\\c\\p.vhd"
        );
        assert_eq!(strip_drive("C:/x/y.vhd").as_deref(), Some("/x/y.vhd"));
        assert_eq!(strip_drive("/x"), None);
    }
}
