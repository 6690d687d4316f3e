//! `replica verify`: every version's disks read back identical to its repository snapshot, and
//! its configuration files too.

use std::path::{Path, PathBuf};

use anyhow::Result;
use repo::repository::Repository;
use repo::restore::SnapshotDisk;
use repo::snapshot::{find_snapshot, short_id};
use serde::Serialize;
use vdisk::{ExtentState, MapScope, OpenOptions, VirtualDisk};

use crate::manifest;
use crate::replicate::open_layer;
use crate::{config_dir, disks_dir};

#[derive(Clone, Debug, Serialize)]
pub struct VersionCheck {
    pub version: u64,
    pub snapshot: String,
    pub disks_checked: usize,
    pub files_checked: usize,
    pub bytes_compared: u64,
    /// Empty = this version is identical to its snapshot.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub vm: String,
    pub replica: PathBuf,
    pub versions: Vec<VersionCheck>,
    /// Problems outside any one version (pending merge, manifest).
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.problems.is_empty() && self.versions.iter().all(|v| v.problems.is_empty())
    }
}

/// Verify every version of the replica in `vm_dir` (read-only: nothing is repaired).
pub fn verify(repo: &Repository, vm_dir: &Path) -> Result<VerifyReport> {
    let m = manifest::load(vm_dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not a replica (no {})",
            vm_dir.display(),
            manifest::MANIFEST_NAME
        )
    })?;
    let index = repo.load_index()?;
    let mut report = VerifyReport {
        vm: m.vm.clone(),
        replica: vm_dir.to_path_buf(),
        versions: Vec::new(),
        problems: Vec::new(),
    };
    if let Some(p) = &m.pending_merge {
        report.problems.push(format!(
            "the removal of version {} was interrupted; the next replicate completes it (the \
             remaining versions are checked below)",
            p.removed_version
        ));
    }
    for v in &m.versions {
        let mut c = VersionCheck {
            version: v.version,
            snapshot: v.snapshot.clone(),
            disks_checked: 0,
            files_checked: 0,
            bytes_compared: 0,
            problems: Vec::new(),
        };
        let snap = match find_snapshot(repo, &v.snapshot, Some(&m.vm)) {
            Ok((_, s)) => s,
            Err(e) => {
                c.problems.push(format!(
                    "snapshot {} is not readable from the repository: {e}",
                    short_id(&v.snapshot)
                ));
                report.versions.push(c);
                continue;
            }
        };
        for d in &v.disks {
            let Some(entry) = snap.disks.iter().find(|x| x.name == d.name) else {
                c.problems.push(format!(
                    "disk {} is not in snapshot {}",
                    d.name,
                    short_id(&v.snapshot)
                ));
                continue;
            };
            let path = disks_dir(vm_dir).join(&d.file);
            match vdisk::check(&path, &OpenOptions::default()) {
                Ok(r) => {
                    for p in &r.problems {
                        // A log left by a killed run: readers replay it (the content check below
                        // proves it), and the next replicate replays it on disk.
                        if p.contains("not yet applied") {
                            report.problems.push(format!(
                                "{}: a metadata log is pending; the next replicate replays it",
                                d.file
                            ));
                        } else {
                            c.problems.push(format!("{}: {p}", d.file));
                        }
                    }
                }
                Err(e) => c.problems.push(format!("{}: {e:#}", d.file)),
            }
            let disk = match open_layer(vm_dir, d) {
                Ok(x) => x,
                Err(e) => {
                    c.problems.push(format!("disk {}: {e:#}", d.name));
                    continue;
                }
            };
            let src = match SnapshotDisk::open(repo, &index, entry) {
                Ok(s) => s,
                Err(e) => {
                    c.problems
                        .push(format!("disk {} in the repository: {e}", d.name));
                    continue;
                }
            };
            match compare(&*disk, &src) {
                Ok((n, None)) => c.bytes_compared += n,
                Ok((n, Some(off))) => {
                    c.bytes_compared += n;
                    c.problems.push(format!(
                        "disk {} ({}) differs from snapshot {} at offset {off}",
                        d.name,
                        d.file,
                        short_id(&v.snapshot)
                    ));
                }
                Err(e) => c.problems.push(format!(
                    "disk {} ({}): {}",
                    d.name,
                    d.file,
                    src.take_failure()
                        .map(|r| r.to_string())
                        .unwrap_or(format!("{e:#}"))
                )),
            }
            c.disks_checked += 1;
        }
        if v.disks.len() != snap.disks.len() {
            c.problems.push(format!(
                "the version has {} disks, snapshot {} has {}",
                v.disks.len(),
                short_id(&v.snapshot),
                snap.disks.len()
            ));
        }
        let cdir = config_dir(vm_dir, &v.config_dir);
        for f in &snap.files {
            let p = cdir.join(&f.name);
            match same_file(repo, &index, f, &p) {
                Ok(true) => c.files_checked += 1,
                Ok(false) => c
                    .problems
                    .push(format!("{} differs from the snapshot", p.display())),
                Err(e) => c.problems.push(format!("file {}: {e:#}", f.name)),
            }
        }
        report.versions.push(c);
    }
    Ok(report)
}

/// Compare a replica disk with a snapshot disk, chunk by chunk; returns the bytes compared and
/// the first differing offset. Chunks the snapshot records as zeros are read from the replica
/// only where its map says it holds data.
fn compare(disk: &dyn VirtualDisk, src: &SnapshotDisk<'_>) -> Result<(u64, Option<u64>)> {
    let (g, sg) = (disk.geometry(), src.geometry());
    if g.virtual_size != sg.virtual_size {
        anyhow::bail!(
            "size {} differs from the snapshot's {}",
            g.virtual_size,
            sg.virtual_size
        );
    }
    let cs = u64::from(src.entry().chunk_size);
    let size = g.virtual_size;
    let (mut a, mut b) = (vec![0u8; cs as usize], vec![0u8; cs as usize]);
    let mut compared = 0u64;
    for (i, id) in src.table().iter().enumerate() {
        let off = i as u64 * cs;
        let n = cs.min(size - off) as usize;
        let ra = &mut a[..n];
        if id.is_zero() {
            let data = disk
                .map(off, n as u64, MapScope::View)?
                .iter()
                .any(|e| e.state == ExtentState::Data);
            if !data {
                continue;
            }
            disk.read_at(ra, off)?;
            if !vdisk::io::is_zero(ra) {
                let at = ra.iter().position(|&x| x != 0).unwrap_or(0);
                return Ok((compared, Some(off + at as u64)));
            }
        } else {
            let rb = &mut b[..n];
            disk.read_at(ra, off)?;
            src.read_at(rb, off)?;
            if ra != rb {
                let at = ra
                    .iter()
                    .zip(rb.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok((compared + n as u64, Some(off + at as u64)));
            }
        }
        compared += n as u64;
    }
    Ok((compared, None))
}

/// Does the file at `p` hold exactly the snapshot file `f`? Streams chunk by chunk (saved-state
/// files can be as large as the VM's memory).
fn same_file(
    repo: &Repository,
    index: &repo::index::Index,
    f: &repo::snapshot::FileEntry,
    p: &Path,
) -> Result<bool> {
    use std::io::Read;
    let mut local =
        std::fs::File::open(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
    if local.metadata()?.len() != f.size {
        return Ok(false);
    }
    let mut same = true;
    let mut buf = Vec::new();
    crate::file_chunks(repo, index, f, |data| {
        buf.resize(data.len(), 0);
        local.read_exact(&mut buf)?;
        same &= buf == data;
        Ok(())
    })?;
    Ok(same)
}
