//! Replication: per VM a directory of native, bootable VHDX (or VHD) disks and configuration
//! files, fed from the backup repository, keeping the last N versions.
//!
//! Layout of `DIR/<vm>/`:
//! - `replica.json`: the manifest ([`manifest::Manifest`]): versions in order, each with its
//!   snapshot, its disk layers and its configuration directory; a merge in progress. A version
//!   exists once the manifest that lists it has (atomically) replaced the previous one.
//! - `disks/`: base disks and differencing layers, named `vNNNNNN-dII.vhdx` after the version
//!   that created them (a base keeps its name when later versions are merged into it).
//! - `config/vNNNNNN/`: the configuration files of each version.
//! - `replica.lock`: held (an OS file lock) while a run changes the replica.
//! - `failover/`: made by [`failover()`]; replication refuses to run while it exists.
//!
//! The chain: version 1 is a full dynamic disk per VM disk. Each next version is a differencing
//! child of the previous version's layer holding only the chunks whose ids differ between the
//! two snapshots' chunk tables (a chunk that became zeros is written as zeros, which in a
//! differencing disk hides the parent; unchanged chunks cost nothing). When the previous
//! snapshot is gone from the repository, the previous version is read and compared instead: all
//! is read, only the change is written. Layers below a version are never changed while it
//! depends on them; the newest version is the top of a chain at most N deep.
//!
//! Removing the oldest version (more than N): its base absorbs the next version's layer, then
//! the layer above that is pointed at the base, and the absorbed layer is deleted; the steps are
//! recorded in the manifest first and redone by the next run if interrupted, and every version in
//! the manifest stays readable after each step (see [`replicate`] and `vdisk::merge_with`).
//!
//! Block size 2 MiB (not Hyper-V's 32 MiB): a differencing layer allocates whole blocks in its
//! file, so with 1 MiB repository chunks a changed chunk costs at most a 2 MiB block (written
//! sectors only, the rest a hole on sparse-capable storage) and per-cycle writes stay
//! proportional to the change; 32 MiB blocks would make a scattered 1% change allocate up to
//! 32 times its size. The BAT grows accordingly (8 bytes per 2 MiB, 16 MiB per 4 TiB).
//!
//! Cost of the chain: a read of the newest version walks down the layers until one holds the
//! block; with N versions that is up to N BAT look-ups (in memory) and, for blocks that changed
//! in no version since the base, the read goes to the base file. The benchmark
//! (`bench/replicate.sh`) measures the newest through a depth-N chain against a flat disk.
//! [`failover()`] with `flatten` writes a standalone disk for hypervisors that cannot follow a
//! chain (QEMU cannot open differencing VHDX) or when a long chain must not slow the VM.

pub mod failover;
mod lock;
pub mod manifest;
mod replicate;
mod verify;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use repo::index::Index;
use repo::repository::Repository;
use serde::Serialize;

pub use failover::{
    failover, register, FailoverOptions, FailoverReport, RegisterOptions, Registered,
};
pub use replicate::{replicate, DiskReport, ReplicateOptions, ReplicateReport, REPLICA_BLOCK_SIZE};
pub use verify::{verify, VerifyReport, VersionCheck};

/// Where `failover` prepares the VM's disks.
pub const FAILOVER_DIR: &str = "failover";

/// The replica directory of VM `vm` under the replication target `to`.
pub fn vm_dir(to: &Path, vm: &str) -> PathBuf {
    to.join(vm)
}

pub(crate) fn disks_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("disks")
}

pub(crate) fn config_dir(vm_dir: &Path, name: &str) -> PathBuf {
    vm_dir.join("config").join(name)
}

/// The replica directories `dir` names: itself if it holds a manifest, else its subdirectories
/// that do (the target of `replicate --to`).
pub fn find_replicas(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join(manifest::MANIFEST_NAME).is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut out = Vec::new();
    for e in rd {
        let p = e
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if p.join(manifest::MANIFEST_NAME).is_file() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "{} holds no replica (no {} in it or in its subdirectories)\nhint: create one with \
             `hyperkeep replicate --vm NAME --to {}`",
            dir.display(),
            manifest::MANIFEST_NAME,
            dir.display()
        );
    }
    Ok(out)
}

/// The one replica `dir` names; with several VMs under it, `vm` chooses.
pub fn find_replica(dir: &Path, vm: Option<&str>) -> Result<PathBuf> {
    let all = find_replicas(dir)?;
    if let Some(v) = vm {
        for p in &all {
            if manifest::load(p)?.is_some_and(|m| m.vm == v) {
                return Ok(p.clone());
            }
        }
        bail!("{} holds no replica of VM '{v}'", dir.display());
    }
    match all.len() {
        1 => Ok(all[0].clone()),
        n => bail!(
            "{} holds replicas of {n} VMs; choose one with --vm NAME or give its directory",
            dir.display()
        ),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ListedDisk {
    pub name: String,
    pub file: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    /// Layers from this version's file down to its base (1 = a standalone disk).
    pub chain_depth: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListedVersion {
    pub version: u64,
    pub snapshot: String,
    pub snapshot_time: String,
    pub created: String,
    pub newest: bool,
    pub bytes_written: u64,
    pub disks: Vec<ListedDisk>,
    pub config_dir: PathBuf,
    pub files: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaSummary {
    pub vm: String,
    pub replica: PathBuf,
    pub versions: Vec<ListedVersion>,
    /// A version whose removal was interrupted (the next replicate completes it).
    pub pending_removal: Option<u64>,
    pub failover_prepared: bool,
}

/// What `replica list` shows for each replica under `dir`.
pub fn list(dir: &Path) -> Result<Vec<ReplicaSummary>> {
    let mut out = Vec::new();
    for r in find_replicas(dir)? {
        let Some(m) = manifest::load(&r)? else {
            continue;
        };
        let parents: std::collections::HashMap<&str, Option<&str>> = m
            .versions
            .iter()
            .flat_map(|v| v.disks.iter())
            .map(|d| (d.file.as_str(), d.parent.as_deref()))
            .collect();
        let depth = |file: &str| {
            let mut n = 1;
            let mut cur = parents.get(file).copied().flatten();
            while let Some(p) = cur {
                n += 1;
                if n > m.versions.len() + 1 {
                    break; // a loop in a damaged manifest
                }
                cur = parents.get(p).copied().flatten();
            }
            n
        };
        let last = m.versions.last().map(|v| v.version);
        let versions = m
            .versions
            .iter()
            .map(|v| ListedVersion {
                version: v.version,
                snapshot: v.snapshot.clone(),
                snapshot_time: v.snapshot_time.clone(),
                created: v.created.clone(),
                newest: Some(v.version) == last,
                bytes_written: v.bytes_written,
                disks: v
                    .disks
                    .iter()
                    .map(|d| ListedDisk {
                        name: d.name.clone(),
                        file: disks_dir(&r).join(&d.file),
                        format: d.format.clone(),
                        virtual_size: d.virtual_size,
                        chain_depth: depth(&d.file),
                    })
                    .collect(),
                config_dir: config_dir(&r, &v.config_dir),
                files: v.files.clone(),
            })
            .collect();
        out.push(ReplicaSummary {
            vm: m.vm.clone(),
            failover_prepared: r.join(FAILOVER_DIR).exists(),
            replica: r,
            versions,
            pending_removal: m.pending_merge.as_ref().map(|p| p.removed_version),
        });
    }
    Ok(out)
}

/// Feed a snapshot file's bytes to `sink`, one repository chunk at a time.
pub(crate) fn file_chunks(
    repo: &Repository,
    index: &Index,
    f: &repo::snapshot::FileEntry,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let cs = u64::from(repo.config().chunk_size);
    if f.size.div_ceil(cs) != f.chunks.len() as u64 {
        bail!(
            "snapshot file '{}' of {} bytes lists {} chunks; the snapshot is damaged",
            f.name,
            f.size,
            f.chunks.len()
        );
    }
    for (i, id) in f.chunks.iter().enumerate() {
        let n = cs.min(f.size - i as u64 * cs) as usize;
        let data = if id.is_zero() {
            vec![0u8; n]
        } else {
            repo.read_chunk(index, id)
                .with_context(|| format!("reading file '{}' from the repository", f.name))?
        };
        if data.len() != n {
            bail!(
                "chunk {id} of file '{}' holds {} bytes where {n} were expected",
                f.name,
                data.len()
            );
        }
        sink(&data)?;
    }
    Ok(())
}
