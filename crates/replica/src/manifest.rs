//! `replica.json`: the one file that says which versions exist and which files make them up.
//!
//! Everything in a replica directory that the manifest does not name is a leftover of an
//! interrupted run and is deleted by the next one; a version exists once the manifest that lists
//! it has replaced the previous one. The manifest is replaced atomically: written to a temporary
//! file, flushed, renamed over the old one, and the directory flushed (rename within one
//! directory is atomic on local file systems and on SMB shares).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const MANIFEST_NAME: &str = "replica.json";
pub const FORMAT_NAME: &str = "hyperkeep-replica";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`]: a JSON file that is not ours is refused, never overwritten.
    pub format: String,
    /// [`FORMAT_VERSION`]; a newer one is refused (a newer hyperkeep wrote it).
    pub format_version: u32,
    pub vm: String,
    /// The number the next version gets (versions are never renumbered).
    pub next_version: u64,
    /// Oldest first. The newest is the ready-to-boot disk set.
    pub versions: Vec<Version>,
    /// A merge of the oldest version that was recorded but not yet finished (an interrupted
    /// run); the next run completes it before anything else.
    #[serde(default)]
    pub pending_merge: Option<PendingMerge>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Version {
    pub version: u64,
    /// Full id of the repository snapshot this version equals.
    pub snapshot: String,
    /// The snapshot's time (RFC 3339, UTC).
    pub snapshot_time: String,
    /// When this version was written (RFC 3339, UTC).
    pub created: String,
    pub disks: Vec<Disk>,
    /// Directory under `config/` holding this version's configuration files.
    pub config_dir: String,
    /// File names in `config_dir`.
    pub files: Vec<String>,
    /// Guest bytes written into the disks to make this version.
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    /// The disk's name in the snapshot (what the VM calls it).
    pub name: String,
    /// The layer file in `disks/` whose view is this version of the disk.
    pub file: String,
    /// The layer below `file` in `disks/`, if `file` is a differencing disk.
    pub parent: Option<String>,
    /// `vhdx` or `vhd`.
    pub format: String,
    pub virtual_size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PendingMerge {
    /// The version being removed (no longer in `versions`).
    pub removed_version: u64,
    pub disks: Vec<PendingDiskMerge>,
}

/// Merge `child` into `base` (which then becomes the next version's layer), then point
/// `grandchild` at `base`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PendingDiskMerge {
    pub base: String,
    pub child: String,
    pub grandchild: Option<String>,
    /// VHDX: the DataWriteGuid `base` gets (announced to `child` first, see `vdisk::merge_with`).
    pub identity: String,
}

impl Manifest {
    pub fn new(vm: &str) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            vm: vm.into(),
            next_version: 1,
            versions: Vec::new(),
            pending_merge: None,
        }
    }

    /// Every file in `disks/` the manifest needs.
    pub fn referenced_disk_files(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for v in &self.versions {
            for d in &v.disks {
                out.insert(d.file.clone());
                out.extend(d.parent.clone());
            }
        }
        if let Some(p) = &self.pending_merge {
            for d in &p.disks {
                out.insert(d.base.clone());
                out.insert(d.child.clone());
                out.extend(d.grandchild.clone());
            }
        }
        out
    }

    pub fn version(&self, n: u64) -> Option<&Version> {
        self.versions.iter().find(|v| v.version == n)
    }
}

/// The manifest in `vm_dir`, or `None` if there is none yet.
pub fn load(vm_dir: &Path) -> Result<Option<Manifest>> {
    let path = vm_dir.join(MANIFEST_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let m: Manifest = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid replica manifest (damaged, or not written by hyperkeep)",
            path.display()
        )
    })?;
    if m.format != FORMAT_NAME {
        bail!(
            "{} is not a hyperkeep replica manifest (format {:?})",
            path.display(),
            m.format
        );
    }
    if m.format_version > FORMAT_VERSION {
        bail!(
            "{} was written by a newer hyperkeep (replica format {}); upgrade hyperkeep",
            path.display(),
            m.format_version
        );
    }
    for v in &m.versions {
        for name in v
            .disks
            .iter()
            .flat_map(|d| std::iter::once(&d.file).chain(d.parent.iter()))
            .chain(v.files.iter())
            .chain(std::iter::once(&v.config_dir))
        {
            check_plain_name(name).with_context(|| format!("in {}", path.display()))?;
        }
    }
    Ok(Some(m))
}

/// Names in the manifest are joined to the replica directory: they must stay inside it.
pub fn check_plain_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\', '\0'])
        || name.contains(':')
    {
        bail!("{name:?} is not a plain file name");
    }
    Ok(())
}

/// Replace the manifest atomically (temporary file, flush, rename, flush the directory).
pub fn save(vm_dir: &Path, m: &Manifest) -> Result<()> {
    let path = vm_dir.join(MANIFEST_NAME);
    let tmp = vm_dir.join(format!("{MANIFEST_NAME}.tmp"));
    let text = serde_json::to_vec_pretty(m)?;
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    sync_dir(vm_dir)
}

/// Flush a directory's entries (new, renamed and deleted files) to stable storage.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot flush directory {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir; // Windows cannot open a directory as a file; NTFS journals its metadata.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new("vm1");
        m.versions.push(Version {
            version: 1,
            snapshot: "ab".repeat(32),
            snapshot_time: "2026-12-04T10:00:00Z".into(),
            created: "2026-12-04T10:01:00Z".into(),
            disks: vec![Disk {
                name: "disk.vhdx".into(),
                file: "v000001-d00.vhdx".into(),
                parent: None,
                format: "vhdx".into(),
                virtual_size: 1 << 20,
            }],
            config_dir: "v000001".into(),
            files: vec!["vm1.vmcx".into()],
            bytes_written: 0,
        });
        m
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let m = sample();
        save(dir.path(), &m).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(m.clone()));
        assert!(!dir.path().join("replica.json.tmp").exists());

        let mut bad = m.clone();
        bad.versions[0].disks[0].file = "../../etc/passwd".into();
        save(dir.path(), &bad).unwrap();
        let e = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(e.contains("not a plain file name"), "{e}");

        let mut newer = m.clone();
        newer.format_version = FORMAT_VERSION + 1;
        save(dir.path(), &newer).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("newer hyperkeep"), "{e}");

        std::fs::write(dir.path().join(MANIFEST_NAME), b"{\"format\": 3}").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a valid replica manifest"), "{e}");
    }

    #[test]
    fn second_lock_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = crate::lock::acquire(dir.path(), "replicate").unwrap();
        let e = crate::lock::acquire(dir.path(), "failover")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("in use by another hyperkeep") && e.contains("replicate"),
            "{e}"
        );
        drop(held);
        crate::lock::acquire(dir.path(), "failover").unwrap();
    }
}
