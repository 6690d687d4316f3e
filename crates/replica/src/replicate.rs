//! `replicate`: bring a VM's replica up to a repository snapshot, then drop versions above N.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use repo::index::Index;
use repo::repository::Repository;
use repo::restore::SnapshotDisk;
use repo::snapshot::{find_snapshot, load_table, short_id, DiskEntry, Snapshot};
use serde::Serialize;
use vdisk::{
    ConvertOptions, DiskFormat, ExtentState, Guid, MapScope, MergeOptions, OpenOptions, VirtualDisk,
};

use crate::manifest::{self, Disk, Manifest, PendingDiskMerge, PendingMerge, Version};
use crate::{config_dir, disks_dir, vm_dir, FAILOVER_DIR};

/// Block size of the replica's disks: 2 MiB (see the crate documentation for why).
pub const REPLICA_BLOCK_SIZE: u32 = 2 << 20;

#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// Versions to keep (at least 1).
    pub keep: usize,
    /// Snapshot spec (`latest`, an id or a prefix); `None` = the VM's newest snapshot.
    pub snapshot: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub file: String,
    /// `full` (a new base disk) or `incremental` (a differencing child of the previous version).
    pub kind: String,
    /// How the changes were found: `chunk-ids` (the two snapshots' chunk tables compared),
    /// `content` (the previous version read and compared), or `full`.
    pub method: String,
    pub chunks_changed: u64,
    /// Guest bytes written into the layer.
    pub bytes_written: u64,
    /// Size of the new layer file.
    pub file_size: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicateReport {
    pub vm: String,
    pub replica: PathBuf,
    /// The version written by this run; `None` if the replica already was at the snapshot.
    pub version: Option<u64>,
    pub snapshot: String,
    pub up_to_date: bool,
    pub disks: Vec<DiskReport>,
    pub files: Vec<String>,
    pub bytes_written: u64,
    /// Versions merged away (above `keep`), oldest first, including a merge an interrupted
    /// earlier run had left pending.
    pub removed_versions: Vec<u64>,
    /// Leftover files of an interrupted earlier run that were deleted.
    pub leftovers_removed: Vec<String>,
    pub versions: Vec<u64>,
    pub duration_ms: u64,
}

pub fn replicate(
    repo: &Repository,
    vm: &str,
    to: &Path,
    opts: &ReplicateOptions,
) -> Result<ReplicateReport> {
    let started = std::time::Instant::now();
    if opts.keep == 0 {
        bail!("--keep must be at least 1 (the newest version is always kept)");
    }
    manifest::check_plain_name(vm)
        .map_err(|_| anyhow!("VM name {vm:?} cannot be used as a directory name"))?;
    let dir = vm_dir(to, vm);
    for d in [&dir, &disks_dir(&dir), &dir.join("config")] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let _lock = crate::lock::acquire(&dir, "replicate")?;
    let failover = dir.join(FAILOVER_DIR);
    if failover.exists() {
        bail!(
            "{} exists: a failover was prepared from this replica, and its disks depend on the \
             replica's layers, which replication changes when it merges old versions\nhint: \
             move the VM off the replica (or delete {} if it is not used) before replicating again",
            failover.display(),
            failover.display()
        );
    }
    let mut m = match manifest::load(&dir)? {
        Some(m) => {
            if m.vm != vm {
                bail!(
                    "{} holds a replica of VM '{}', not '{vm}'",
                    dir.display(),
                    m.vm
                );
            }
            m
        }
        None => Manifest::new(vm),
    };
    let mut report = ReplicateReport {
        vm: vm.into(),
        replica: dir.clone(),
        version: None,
        snapshot: String::new(),
        up_to_date: false,
        disks: Vec::new(),
        files: Vec::new(),
        bytes_written: 0,
        removed_versions: Vec::new(),
        leftovers_removed: Vec::new(),
        versions: Vec::new(),
        duration_ms: 0,
    };
    if let Some(p) = m.pending_merge.clone() {
        tracing::info!(
            version = p.removed_version,
            "completing an interrupted merge"
        );
        finish_merge(&dir, &mut m, &p)?;
        report.removed_versions.push(p.removed_version);
    }
    report.leftovers_removed = remove_leftovers(&dir, &m)?;
    replay_logs(&dir, &m)?;

    let spec = opts.snapshot.as_deref().unwrap_or("latest");
    let (snap_id, snap) = find_snapshot(repo, spec, Some(vm))?;
    report.snapshot = snap_id.clone();
    if m.versions.last().is_some_and(|v| v.snapshot == snap_id) {
        report.up_to_date = true;
    } else {
        let v = write_version(repo, &dir, &mut m, &snap_id, &snap, &mut report)?;
        report.version = Some(v);
    }
    while m.versions.len() > opts.keep {
        report.removed_versions.push(drop_oldest(&dir, &mut m)?);
    }
    report.versions = m.versions.iter().map(|v| v.version).collect();
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Delete everything in `disks/` and `config/` (and a temporary manifest) that the manifest
/// does not name: what an interrupted run left behind.
pub(crate) fn remove_leftovers(dir: &Path, m: &Manifest) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let keep = m.referenced_disk_files();
    let disks = disks_dir(dir);
    for e in read_dir(&disks)? {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            remove_path(&e.path())?;
            removed.push(format!("disks/{name}"));
        }
    }
    let configs: BTreeSet<&str> = m.versions.iter().map(|v| v.config_dir.as_str()).collect();
    let cdir = dir.join("config");
    for e in read_dir(&cdir)? {
        let name = e.file_name().to_string_lossy().into_owned();
        if !configs.contains(name.as_str()) {
            remove_path(&e.path())?;
            removed.push(format!("config/{name}"));
        }
    }
    let tmp = dir.join(format!("{}.tmp", manifest::MANIFEST_NAME));
    if tmp.exists() {
        remove_path(&tmp)?;
        removed.push(format!("{}.tmp", manifest::MANIFEST_NAME));
    }
    if !removed.is_empty() {
        tracing::info!(?removed, "removed leftovers of an interrupted run");
        manifest::sync_dir(&disks)?;
    }
    Ok(removed)
}

/// Test hook: with `HYPERKEEP_TEST_REPLICA_CRASH=<name>` the process aborts at that point (no
/// destructor, no flush: as if killed), so the crash tests reach every intermediate state
/// deterministically, not only the ones random kills happen to hit.
fn crash_point(name: &str) {
    if std::env::var("HYPERKEEP_TEST_REPLICA_CRASH").is_ok_and(|v| v == name) {
        eprintln!("HYPERKEEP_TEST_REPLICA_CRASH: aborting at {name}");
        std::process::abort();
    }
}

/// A run killed while it changed a VHDX's metadata (a parent locator) leaves a log that
/// readers replay in memory; Hyper-V and qemu replay it only when opening for writing, and some
/// readers ignore it. Replaying it here (a writable open replays and closes the log; content
/// and identity stay) leaves every layer clean for them.
fn replay_logs(dir: &Path, m: &Manifest) -> Result<()> {
    for f in m.referenced_disk_files() {
        let p = disks_dir(dir).join(&f);
        if vdisk::detect(&p)? != DiskFormat::Vhdx {
            continue;
        }
        let mut d = vdisk::open_mut(&p, &OpenOptions::default())
            .with_context(|| format!("opening {} to replay its log", p.display()))?;
        d.flush()?;
    }
    Ok(())
}

fn read_dir(d: &Path) -> Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(d) {
        Ok(rd) => rd
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("cannot list {}", d.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot list {}", d.display())),
    }
}

fn remove_path(p: &Path) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(p).with_context(|| format!("cannot inspect {}", p.display()))?;
    let r = if meta.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    r.with_context(|| format!("cannot delete {}", p.display()))
}

fn replica_format(d: &DiskEntry) -> DiskFormat {
    // A VHD source stays VHD (the hypervisor it came from knows it); VHDX and raw become VHDX,
    // which differencing chains and 4 KiB sectors need.
    if d.format == "vhd" && d.logical_sector_size == 512 {
        DiskFormat::Vhd
    } else {
        DiskFormat::Vhdx
    }
}

fn ext(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Vhd => "vhd",
        _ => "vhdx",
    }
}

/// Write version `m.next_version` for snapshot `snap`: new layers, configuration files, and
/// last the manifest that makes it visible.
fn write_version(
    repo: &Repository,
    dir: &Path,
    m: &mut Manifest,
    snap_id: &str,
    snap: &Snapshot,
    report: &mut ReplicateReport,
) -> Result<u64> {
    let k = m.next_version;
    let index = repo.load_index()?;
    let prev = m.versions.last().cloned();
    // The previous version's snapshot, if the repository still has it: its chunk tables say
    // what changed without reading any disk.
    let prev_snap = prev
        .as_ref()
        .and_then(|p| match find_snapshot(repo, &p.snapshot, None) {
            Ok((_, s)) => Some(s),
            Err(e) => {
                tracing::warn!(
                    "snapshot {} of version {} is not in the repository ({e}); comparing the \
                     replica's content instead",
                    short_id(&p.snapshot),
                    p.version
                );
                None
            }
        });
    let mut seen = BTreeSet::new();
    let mut disks = Vec::new();
    for (i, d) in snap.disks.iter().enumerate() {
        manifest::check_plain_name(&d.name)
            .with_context(|| format!("disk name in snapshot {}", short_id(snap_id)))?;
        if !seen.insert(d.name.clone()) {
            bail!(
                "snapshot {} has two disks named {}; a replica cannot tell them apart",
                short_id(snap_id),
                d.name
            );
        }
        let format = replica_format(d);
        let file = format!("v{k:06}-d{i:02}.{}", ext(format));
        let path = disks_dir(dir).join(&file);
        let prev_disk = prev
            .as_ref()
            .and_then(|p| p.disks.iter().find(|x| x.name == d.name))
            .filter(|x| x.virtual_size == d.virtual_size && x.format == ext(format));
        let src = SnapshotDisk::open(repo, &index, d)?;
        let r = match prev_disk {
            Some(pd) => {
                let prev_entry = prev_snap
                    .as_ref()
                    .and_then(|s| s.disks.iter().find(|x| x.name == d.name))
                    .filter(|x| x.chunk_size == d.chunk_size && x.virtual_size == d.virtual_size);
                let parent = disks_dir(dir).join(&pd.file);
                let r = write_child(repo, &index, &src, prev_entry, &parent, &path)
                    .map_err(|e| repo_failure(&src, e))?;
                disks.push(Disk {
                    name: d.name.clone(),
                    file: file.clone(),
                    parent: Some(pd.file.clone()),
                    format: ext(format).into(),
                    virtual_size: d.virtual_size,
                });
                r
            }
            None => {
                let opts = ConvertOptions {
                    format,
                    fixed: false,
                    block_size: Some(REPLICA_BLOCK_SIZE),
                };
                let c = vdisk::convert(&src, &path, &opts, None)
                    .map_err(|e| repo_failure(&src, e.into()))?;
                disks.push(Disk {
                    name: d.name.clone(),
                    file: file.clone(),
                    parent: None,
                    format: ext(format).into(),
                    virtual_size: d.virtual_size,
                });
                (
                    "full".to_string(),
                    "full".to_string(),
                    d.data_bytes.div_ceil(u64::from(d.chunk_size.max(1))),
                    c.bytes_written,
                )
            }
        };
        let file_size = std::fs::metadata(&path).map(|x| x.len()).unwrap_or(0);
        report.bytes_written += r.3;
        report.disks.push(DiskReport {
            name: d.name.clone(),
            file,
            kind: r.0,
            method: r.1,
            chunks_changed: r.2,
            bytes_written: r.3,
            file_size,
        });
    }
    manifest::sync_dir(&disks_dir(dir))?;
    let cdir_name = format!("v{k:06}");
    let cdir = config_dir(dir, &cdir_name);
    std::fs::create_dir_all(&cdir).with_context(|| format!("cannot create {}", cdir.display()))?;
    let mut files = Vec::new();
    for f in &snap.files {
        manifest::check_plain_name(&f.name)
            .with_context(|| format!("file name in snapshot {}", short_id(snap_id)))?;
        write_config_file(repo, &index, f, &cdir.join(&f.name))?;
        files.push(f.name.clone());
    }
    manifest::sync_dir(&cdir)?;
    report.files = files.clone();
    m.versions.push(Version {
        version: k,
        snapshot: snap_id.into(),
        snapshot_time: snap.time.clone(),
        created: repo::snapshot::now_rfc3339(),
        disks,
        config_dir: cdir_name,
        files,
        bytes_written: report.bytes_written,
    });
    m.next_version = k + 1;
    crash_point("version-written");
    manifest::save(dir, m)?;
    Ok(k)
}

/// A disk read failed: report the repository's own error (damaged or missing data) if that was
/// the cause, not just the disk layer's summary of it.
fn repo_failure(src: &SnapshotDisk<'_>, e: anyhow::Error) -> anyhow::Error {
    match src.take_failure() {
        Some(r) => anyhow::Error::new(r).context("reading the snapshot failed"),
        None => e,
    }
}

/// A differencing child of `parent` at `path` holding exactly what changed. Returns (kind,
/// method, chunks changed, guest bytes written).
fn write_child(
    repo: &Repository,
    index: &Index,
    src: &SnapshotDisk<'_>,
    prev_entry: Option<&DiskEntry>,
    parent: &Path,
    path: &Path,
) -> Result<(String, String, u64, u64)> {
    let mut child = vdisk::create_child(parent, path)?;
    let new = src.table();
    let cs = u64::from(src.entry().chunk_size);
    let size = src.entry().virtual_size;
    let mut buf = vec![0u8; cs as usize];
    let mut old_buf = vec![0u8; cs as usize];
    let (mut changed, mut written) = (0u64, 0u64);
    let method;
    match prev_entry {
        Some(pe) => {
            method = "chunk-ids";
            let old = load_table(repo, index, pe)?;
            if old.len() != new.len() {
                bail!("internal: chunk tables of different lengths for one disk size");
            }
            for (i, (a, b)) in old.iter().zip(new).enumerate() {
                if a == b {
                    continue;
                }
                let off = i as u64 * cs;
                let n = cs.min(size - off);
                changed += 1;
                let new_zero = b.is_zero();
                let b = &mut buf[..n as usize];
                if new_zero {
                    b.fill(0);
                } else {
                    src.read_at(b, off)?;
                }
                let o = &mut old_buf[..n as usize];
                child.read_at(o, off)?;
                written += write_differences(child.as_mut(), off, b, o)?;
            }
        }
        None => {
            // No usable previous snapshot: read the previous version and compare, writing only
            // the chunks that differ (reads everything, writes only the change).
            method = "content";
            let old = &mut old_buf;
            let mut off = 0u64;
            while off < size {
                let n = cs.min(size - off);
                let i = (off / cs) as usize;
                let b = &mut buf[..n as usize];
                let o = &mut old[..n as usize];
                let new_zero = new[i].is_zero();
                if new_zero {
                    b.fill(0);
                } else {
                    src.read_at(b, off)?;
                }
                let old_has_data = child
                    .map(off, n, MapScope::View)?
                    .iter()
                    .any(|e| e.state == ExtentState::Data);
                if old_has_data {
                    child.read_at(o, off)?;
                } else {
                    o.fill(0);
                }
                if b != o {
                    changed += 1;
                    written += write_differences(child.as_mut(), off, b, o)?;
                }
                off += n;
            }
        }
    }
    child.flush()?;
    Ok(("incremental".into(), method.into(), changed, written))
}

/// The granule a changed chunk is compared in: a changed 1 MiB chunk usually differs from the
/// previous version in a few file-system blocks only (a guest rewrote some 4 KiB blocks), and
/// only those are written, so a cycle writes in proportion to the guest's change rather than to
/// the number of chunks it touched. 4 KiB is a multiple of both sector sizes.
const DIFF_GRANULE: usize = 4096;

/// Writes into `child` at `off` the granules where `new` differs from `old` (the previous
/// version's content there), adjacent ones as one write. Returns the bytes written.
fn write_differences(
    child: &mut dyn vdisk::VirtualDiskMut,
    off: u64,
    new: &[u8],
    old: &[u8],
) -> Result<u64> {
    let mut written = 0u64;
    let mut run: Option<usize> = None; // start of the current differing run
    let mut pos = 0usize;
    while pos <= new.len() {
        let end = (pos + DIFF_GRANULE).min(new.len());
        let differs = pos < new.len() && new[pos..end] != old[pos..end];
        match (differs, run) {
            (true, None) => run = Some(pos),
            (false, Some(start)) => {
                let piece = &new[start..pos];
                if vdisk::io::is_zero(piece) {
                    child.write_zeroes(off + start as u64, piece.len() as u64)?;
                } else {
                    child.write_at(piece, off + start as u64)?;
                }
                written += piece.len() as u64;
                run = None;
            }
            _ => {}
        }
        if pos == new.len() {
            break;
        }
        pos = end;
    }
    Ok(written)
}

fn write_config_file(
    repo: &Repository,
    index: &Index,
    f: &repo::snapshot::FileEntry,
    path: &Path,
) -> Result<()> {
    use std::io::Write;
    let mut out =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    crate::file_chunks(repo, index, f, |data| {
        out.write_all(data)
            .with_context(|| format!("cannot write {}", path.display()))
    })?;
    out.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Remove the oldest version: record the merges in the manifest, then do them.
fn drop_oldest(dir: &Path, m: &mut Manifest) -> Result<u64> {
    let oldest = m.versions[0].clone();
    let next = m.versions.get(1).cloned();
    let after = m.versions.get(2).cloned();
    let mut merges = Vec::new();
    for d in &oldest.disks {
        let child = next.as_ref().and_then(|n| {
            n.disks
                .iter()
                .find(|x| x.parent.as_deref() == Some(&d.file))
        });
        // Without a child in the next version (the disk was removed or replaced by a new base)
        // the layer is a leftover once no version names it, and deleted below.
        if let Some(c) = child {
            let grandchild = after
                .as_ref()
                .and_then(|n| {
                    n.disks
                        .iter()
                        .find(|x| x.parent.as_deref() == Some(&c.file))
                })
                .map(|g| g.file.clone());
            merges.push(PendingDiskMerge {
                base: d.file.clone(),
                child: c.file.clone(),
                grandchild,
                identity: Guid::new_random().to_string(),
            });
        }
    }
    m.versions.remove(0);
    let p = PendingMerge {
        removed_version: oldest.version,
        disks: merges,
    };
    m.pending_merge = Some(p.clone());
    manifest::save(dir, m)?;
    crash_point("merge-recorded");
    finish_merge(dir, m, &p)?;
    // Files (layers, configuration) no version names any more.
    remove_leftovers(dir, m)?;
    Ok(oldest.version)
}

/// Do (or redo) the merges of `p`, then record them as done. Every step can be repeated after a
/// crash, and every version in the manifest stays readable at every moment:
/// 1. `child` accepts `base` under its new identity too (VHDX `parent_linkage2`);
/// 2. `child`'s layer is merged into `base`, whose identity changes first (the child masks every
///    range it holds, so neither its view nor its descendants' change);
/// 3. `grandchild` is pointed at `base` (which now shows what `child` showed);
/// 4. the manifest names `base` for `child`'s version; `child` is deleted afterwards.
fn finish_merge(dir: &Path, m: &mut Manifest, p: &PendingMerge) -> Result<()> {
    let disks = disks_dir(dir);
    for d in &p.disks {
        let (base, child) = (disks.join(&d.base), disks.join(&d.child));
        let g: Guid = d.identity.parse().map_err(|_| {
            anyhow!(
                "the manifest's merge identity {:?} is not a GUID",
                d.identity
            )
        })?;
        vdisk::accept_parent_identity(&child, g)
            .with_context(|| format!("preparing the merge of {}", child.display()))?;
        crash_point("identity-accepted");
        let mopts = MergeOptions {
            parent_identity: Some(g),
            keep_child: true,
        };
        vdisk::merge_with(&child, &OpenOptions::default(), &mopts)
            .with_context(|| format!("merging {} into {}", child.display(), base.display()))?;
        crash_point("merged");
        if let Some(gc) = &d.grandchild {
            let gc = disks.join(gc);
            vdisk::reparent(&gc, &base)
                .with_context(|| format!("pointing {} at {}", gc.display(), base.display()))?;
        }
    }
    for v in m.versions.iter_mut() {
        for disk in v.disks.iter_mut() {
            for d in &p.disks {
                if disk.file == d.child {
                    disk.file = d.base.clone();
                    disk.parent = None;
                } else if disk.parent.as_deref() == Some(d.child.as_str()) {
                    disk.parent = Some(d.base.clone());
                }
            }
        }
    }
    crash_point("reparented");
    m.pending_merge = None;
    manifest::save(dir, m)?;
    crash_point("merge-done");
    for d in &p.disks {
        let child = disks.join(&d.child);
        if child.exists() {
            std::fs::remove_file(&child)
                .with_context(|| format!("cannot delete {}", child.display()))?;
        }
    }
    Ok(())
}

/// Open a version's disk (its layer with the chain below it).
pub(crate) fn open_layer(dir: &Path, d: &Disk) -> Result<Box<dyn VirtualDisk>> {
    let p = disks_dir(dir).join(&d.file);
    vdisk::open(&p, &OpenOptions::default()).with_context(|| format!("opening {}", p.display()))
}
