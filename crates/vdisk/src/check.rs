//! Checking a disk file and its parent chain without modifying anything.

use std::path::Path;

use crate::{detect, formats, CheckReport, DiskInfo, OpenOptions, Result, VirtualDisk};

/// `Err` means the file cannot be examined at all (missing, unreadable); a damaged but readable
/// file gives `Ok` with its problems listed.
pub(crate) fn check(path: &Path, opts: &OpenOptions) -> Result<CheckReport> {
    let format = detect::detect(path)?;
    let mut problems = formats::check(format, path)?;
    let ro = OpenOptions {
        writable: false,
        ..opts.clone()
    };
    match detect::open(path, &ro) {
        Err(e) => {
            // The structural check often already said the same thing.
            let msg = e.to_string();
            if !problems.iter().any(|p| p.contains(&msg)) {
                problems.push(format!("cannot open the disk with its parent chain: {msg}"));
            }
        }
        Ok(disk) => {
            problems.extend(probe_reads(&*disk));
            let info = disk.info();
            let mut layer: &DiskInfo = &info;
            while let Some(parent) = layer.parent.as_deref() {
                if parent.virtual_size != layer.virtual_size {
                    problems.push(format!(
                        "{} has a virtual size of {} bytes but its parent {} has {}",
                        name(layer),
                        layer.virtual_size,
                        name(parent),
                        parent.virtual_size
                    ));
                }
                if let Some(p) = &parent.path {
                    match formats::check(parent.format, p) {
                        Ok(ps) => problems.extend(
                            ps.into_iter()
                                .map(|m| format!("parent {}: {m}", p.display())),
                        ),
                        Err(e) => problems.push(format!("parent {}: {e}", p.display())),
                    }
                }
                layer = parent;
            }
        }
    }
    // Format checkers mark findings that are not errors with a `warning:` prefix (possibly
    // behind a "parent X: " prefix we added).
    let (warnings, problems): (Vec<String>, Vec<String>) = problems
        .into_iter()
        .partition(|p| p.starts_with("warning: ") || p.contains(": warning: "));
    Ok(CheckReport {
        path: path.to_path_buf(),
        format,
        problems,
        warnings,
    })
}

fn name(i: &DiskInfo) -> String {
    i.path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(unnamed layer)".into())
}

/// Read the first and last sector through the whole chain: catches truncated files and
/// unreadable parents that the structure alone does not show.
fn probe_reads(disk: &dyn VirtualDisk) -> Vec<String> {
    let g = disk.geometry();
    let sector = u64::from(g.logical_sector_size).min(g.virtual_size);
    let mut buf = vec![0u8; sector as usize];
    let mut problems = Vec::new();
    for off in [0, g.virtual_size - sector] {
        if let Err(e) = disk.read_at(&mut buf, off) {
            problems.push(format!("reading guest offset {off} fails: {e}"));
        }
    }
    problems.dedup();
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskFormat;

    #[test]
    fn raw_is_clean_and_missing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let r = crate::check(&p, &OpenOptions::default()).unwrap();
        assert_eq!(r.format, DiskFormat::Raw);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        let e = crate::check(&dir.path().join("nope"), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }

    #[test]
    fn a_copied_vhd_parent_is_a_warning_not_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        let mut opts = crate::CreateOptions::new(DiskFormat::Vhd, 8 << 20);
        opts.physical_sector_size = 512;
        drop(crate::create(&base, &opts).unwrap());
        drop(crate::create_child(&base, &child).unwrap());
        // Copying a parent to another server changes its modification time, not its identity.
        let f = std::fs::File::options().write(true).open(&base).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30))
            .unwrap();
        drop(f);
        let r = crate::check(&child, &OpenOptions::default()).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("time stamp"), "{:?}", r.warnings);
    }
}
