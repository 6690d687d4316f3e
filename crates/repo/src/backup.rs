//! The backup pipeline: one VM's disks and files into one snapshot.
//!
//! ```text
//! plan (main thread): allocation maps (+ change list) -> list of (source, chunk) jobs
//! workers × N:  claim job (atomic counter) -> read_at -> zero check -> keyed BLAKE3
//!               -> dedup (index + ids new in this run) -> zstd ──bounded channel──────────┐
//! packer:       seal into PackWriter up to pack_size -> put pack ◄──────────────────────────┘
//! main:         tables -> tree blobs (into packs too) -> index file -> snapshot (last)
//! ```
//!
//! Why this shape: fixed-size chunks aligned to the disk make every chunk independent, so the
//! expensive work (hashing, compression) runs on all cores *inside one disk* instead of one disk
//! per core; restic and Borg chunk a file on one core. Only ranges the disk's own allocation
//! table marks as data are read, so a sparse 64 GiB disk costs what its data costs. Encryption
//! runs in the packer, straight into the pack buffer, overlapping with the workers.
//! Memory stays flat: each worker owns one chunk buffer, the channel to the packer holds a few
//! compressed blobs, the packer one pack; only the chunk tables (32 bytes per chunk) grow with the
//! disk.
//!
//! Incrementals: every backup deduplicates against the whole repository, so an unchanged chunk
//! is never stored twice; but without a change list every allocated chunk is still *read*. With a
//! change list (`changes_from`: the ranges a differencing disk holds; `changed_ranges`: any list;
//! `disk_changes`: a list per disk, for VMs with several) only chunks touched by changed ranges
//! are read and every other entry is copied from the parent snapshot's table.
//!
//! Crash safety comes from the write order: packs, then the index file naming them, then the
//! snapshot. A backup that fails or is killed leaves at most unreferenced packs (and possibly an
//! index of them), which `prune` removes; no snapshot ever refers to data that was not written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use vdisk::{DiskFormat, ExtentState, MapScope, OpenOptions, VirtualDisk};

use crate::backend::ObjectKind;
use crate::crypto::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::pack::{self, BlobEntry, BlobKind, PackWriter};
use crate::repository::Repository;
use crate::snapshot::{
    self, find_snapshot, list_snapshots, load_table, now_rfc3339, table_to_blobs, DiskEntry,
    FileEntry, Snapshot, Summary, SNAPSHOT_VERSION, ZERO_ID,
};
use crate::{Error, Result};

/// Allocation maps are walked in windows of this many bytes: memory proportional to the window,
/// not the disk (a 4 GiB window of a 1 MiB-block VHDX is 4096 BAT entries).
const MAP_WINDOW: u64 = 4 << 30;

/// What to back up.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub vm: String,
    pub tags: BTreeMap<String, String>,
    /// Disks (VHDX, VHD; raw when named `.raw`/`.img`) and other files (anything else).
    pub paths: Vec<PathBuf>,
    /// Differencing disks whose own layers (`MapScope::Layer`: their Data and Zero extents) are
    /// the ranges changed since the parent snapshot, one per disk: each applies to the backed-up
    /// disk with the same path (a checkpoint's child backed up as the chain's view), or, when it
    /// is the only one, to the only disk. The parent snapshot's disk is the one with the same
    /// name or, failing that, the one named like the child's parent file.
    pub changes_from: Vec<PathBuf>,
    /// Changed `(offset, length)` byte ranges since the parent snapshot, for the only disk.
    pub changed_ranges: Option<Vec<(u64, u64)>>,
    /// Changed ranges of several disks, each named by its path as given in `paths` (or another
    /// path of the same file): a VM with several disks, each with its own change tracking. A
    /// disk without an entry is read in full.
    pub disk_changes: Vec<(PathBuf, Vec<(u64, u64)>)>,
    /// Parent snapshot spec (id, prefix or `latest`); default: the newest snapshot of the VM.
    pub parent: Option<String>,
    /// Worker threads; 0 = one per available core.
    pub threads: usize,
    pub mode: Option<String>,
    pub consistency: Option<String>,
    pub downtime_ms: Option<u64>,
    pub booted: Option<bool>,
}

/// Progress of long work, in bytes. Called from several threads at once.
pub trait Progress: Sync {
    fn start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Progress that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// One thing being backed up.
struct Source {
    path: PathBuf,
    name: String,
    /// Bytes of guest data (disks) or of the file.
    size: u64,
    /// Length of the file itself when we started, to notice it shrinking.
    file_len: u64,
    kind: SourceKind,
}

enum SourceKind {
    Disk {
        disk: Box<dyn VirtualDisk>,
        info: vdisk::DiskInfo,
    },
    File {
        file: File,
        mtime: Option<String>,
    },
}

impl Source {
    fn is_disk(&self) -> bool {
        matches!(self.kind, SourceKind::Disk { .. })
    }

    fn what(&self) -> &'static str {
        if self.is_disk() {
            "disk"
        } else {
            "file"
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let res = match &self.kind {
            SourceKind::Disk { disk, .. } => disk.read_at(buf, offset).map_err(|e| e.to_string()),
            SourceKind::File { file, .. } => vdisk::ReadAt::read_exact_at(file, buf, offset)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "the file ended early: it shrank during the backup".to_string()
                    } else {
                        e.to_string()
                    }
                }),
        };
        res.map_err(|detail| {
            Error::io(
                format!(
                    "backing up {} {}: reading {} bytes at offset {offset} failed; no snapshot \
                     was written",
                    self.what(),
                    self.path.display(),
                    buf.len()
                ),
                std::io::Error::other(detail),
            )
        })
    }

    /// After reading: the source must still exist and must not have shrunk, else what we read
    /// may mix old and new content.
    fn check_unchanged(&self) -> Result<()> {
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::io(
                format!(
                    "{} {} vanished during the backup; no snapshot was written",
                    self.what(),
                    self.path.display()
                ),
                e,
            )),
            Err(e) => Err(Error::io(
                format!("checking {} after reading it", self.path.display()),
                e,
            )),
            Ok(m) if m.len() < self.file_len => Err(Error::io(
                format!(
                    "{} {} shrank during the backup (from {} to {} bytes); no snapshot was \
                     written",
                    self.what(),
                    self.path.display(),
                    self.file_len,
                    m.len()
                ),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
            Ok(_) => Ok(()),
        }
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

/// Open a path as a disk or a plain file, per the rules of the contract: content decides
/// VHDX/VHD; raw only by name (`.raw`, `.img`), so configuration files are never taken for raw
/// disks; a file named like a VHDX/VHD that does not open as one is an error, not a plain file.
fn open_source(path: &Path) -> Result<Source> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} has no usable file name (UTF-8 names only)",
                path.display()
            ))
        })?;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("cannot back up {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file; give disk and configuration files one by one",
            path.display()
        )));
    }
    let ext = extension(path);
    let format = vdisk::detect(path)?;
    let named_disk = matches!(ext.as_str(), "vhdx" | "avhdx" | "vhd" | "avhd");
    let is_disk = match format {
        DiskFormat::Vhdx | DiskFormat::Vhd => true,
        DiskFormat::Raw if named_disk => {
            return Err(Error::InvalidArgument(format!(
                "{} is named like a virtual disk but holds no VHDX or VHD signature; it is \
                 damaged or not a disk (rename it if it really is a plain file)",
                path.display()
            )))
        }
        DiskFormat::Raw => matches!(ext.as_str(), "raw" | "img"),
    };
    if is_disk {
        let disk = vdisk::open(path, &OpenOptions::default()).map_err(|e| {
            Error::InvalidArgument(format!("cannot open disk {}: {e}", path.display()))
        })?;
        let info = disk.info();
        Ok(Source {
            path: path.to_path_buf(),
            name,
            size: disk.geometry().virtual_size,
            file_len: meta.len(),
            kind: SourceKind::Disk { disk, info },
        })
    } else {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let mtime = meta.modified().ok().map(|t| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        });
        Ok(Source {
            path: path.to_path_buf(),
            name,
            size: meta.len(),
            file_len: meta.len(),
            kind: SourceKind::File { file, mtime },
        })
    }
}

/// Sorted, merged chunk ranges `[start, end)` touched by byte ranges, clipped to `count` chunks.
fn touched_chunks(ranges: &[(u64, u64)], chunk_size: u64, count: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(off, len)| {
            let first = off / chunk_size;
            let last = off.saturating_add(len).div_ceil(chunk_size);
            (first.min(count), last.min(count))
        })
        .filter(|(a, b)| a < b)
        .collect();
    out.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (a, b) in out {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// What a differencing disk says changed: the ranges its own layer holds (Data and Zero
/// extents: both change what the guest sees), which is what changed since its parent was
/// current; and the file name of that parent, if it has one.
struct LayerChanges {
    ranges: Vec<(u64, u64)>,
    parent_name: Option<String>,
}

fn layer_ranges(path: &Path, virtual_size: u64) -> Result<LayerChanges> {
    let child = vdisk::open(path, &OpenOptions::default()).map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot open the change list disk {}: {e}",
            path.display()
        ))
    })?;
    let size = child.geometry().virtual_size;
    if size != virtual_size {
        return Err(Error::InvalidArgument(format!(
            "the change list disk {} is {size} bytes, the disk it describes {virtual_size}",
            path.display()
        )));
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = MAP_WINDOW.min(size - pos);
        for e in child.map(pos, len, MapScope::Layer)? {
            if matches!(e.state, ExtentState::Data | ExtentState::Zero) {
                match out.last_mut() {
                    Some((o, l)) if *o + *l == e.offset => *l += e.length,
                    _ => out.push((e.offset, e.length)),
                }
            }
        }
        pos += len;
    }
    let parent_name = child
        .info()
        .parent
        .and_then(|p| p.path)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok(LayerChanges {
        ranges: out,
        parent_name,
    })
}

/// Chunks of `[first, end)` that hold data in the disk's view, ascending.
fn data_chunks(
    disk: &dyn VirtualDisk,
    size: u64,
    chunk_size: u64,
    first: u64,
    end: u64,
    out: &mut Vec<u64>,
) -> Result<()> {
    let window_chunks = (MAP_WINDOW / chunk_size).max(1);
    let mut c = first;
    while c < end {
        let wend = (c + window_chunks).min(end);
        let off = c * chunk_size;
        let len = (wend * chunk_size).min(size) - off;
        for e in disk.map(off, len, MapScope::View)? {
            if !e.state.has_data() || e.length == 0 {
                continue;
            }
            let a = e.offset / chunk_size;
            let b = e.end().div_ceil(chunk_size).min(wend);
            for chunk in a.max(c)..b {
                if out.last().is_none_or(|&l| l < chunk) {
                    out.push(chunk);
                }
            }
        }
        c = wend;
    }
    Ok(())
}

/// A blob on its way to the packer, not yet sealed: the packer seals it straight into the pack
/// buffer (see [`PackWriter::add_sealing`]), which saves a copy of every stored byte compared
/// with sealing into a buffer of its own here and copying that into the pack.
struct Blob {
    id: Id,
    kind: BlobKind,
    compressed: bool,
    raw_len: u32,
    /// The zstd frame, or the raw bytes when compression does not pay.
    payload: Vec<u8>,
}

/// A worker's zstd context and output buffer, reused for every chunk.
struct WorkerZstd {
    ctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

/// Shared state of one run.
struct Run<'a> {
    repo: &'a Repository,
    index: &'a Index,
    level: i32,
    /// Ids stored in this run, so that two workers never store the same chunk twice.
    new_ids: Mutex<HashSet<Id>>,
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    bytes_read: AtomicU64,
    bytes_new: AtomicU64,
    chunks_new: AtomicU64,
    chunks_reused: AtomicU64,
    zero_chunks: AtomicU64,
}

impl Run<'_> {
    fn fail(&self, e: Error) {
        self.abort.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// Hash `raw`, and if the repository doesn't have it yet, compress it for the packer
    /// (which seals it). Returns the id and the blob if it must be stored.
    fn prepare(
        &self,
        raw: &[u8],
        kind: BlobKind,
        compressor: Option<&mut WorkerZstd>,
    ) -> (Id, Option<Blob>) {
        let key = self.repo.key();
        let id = key.chunk_id(raw);
        if self.index.contains(&id) {
            return (id, None);
        }
        if !self
            .new_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
        {
            return (id, None);
        }
        // A worker's own compressor keeps its zstd context and output buffer across chunks
        // (creating them per chunk costs allocations comparable to compressing at level 1).
        // The frame is handed over by moving the output buffer (the next chunk gets a fresh
        // one), so the payload is not copied on its way to the packer.
        let (compressed, payload) = match compressor {
            Some(z) => match z.ctx.compress_to_buffer(raw, &mut z.out) {
                Ok(n) if n < raw.len() => {
                    let fresh = Vec::with_capacity(z.out.capacity());
                    (true, std::mem::replace(&mut z.out, fresh))
                }
                _ => (false, raw.to_vec()),
            },
            None => pack::compress(self.level, raw),
        };
        let blob = Blob {
            id,
            kind,
            compressed,
            raw_len: raw.len() as u32,
            payload,
        };
        (id, Some(blob))
    }
}

/// What the packer wrote.
#[derive(Default)]
struct Packed {
    packs: Vec<(Id, Vec<BlobEntry>)>,
    bytes_stored: u64,
}

/// Packs being written at once. Writing a pack (and its fsync) takes as long as filling one,
/// so the packer hands full packs to uploaders and keeps accepting blobs; with one uploader the
/// workers would stall for every pack. Memory: one pack filling plus this many being written.
const UPLOADERS: usize = 2;

/// Seals blobs into packs; full packs go to the uploaders.
fn packer(run: &Run<'_>, rx: Receiver<Blob>) -> Result<Packed> {
    let repo = run.repo;
    let pack_size = repo.config().pack_size;
    let out = Mutex::new(Packed::default());
    // Rendezvous channel: a full pack waits in the packer until an uploader is free.
    let (up_tx, up_rx) = sync_channel::<PackWriter>(0);
    let up_rx = Mutex::new(up_rx);
    // Buffers of written packs, reused for the next ones (at most one per uploader plus one).
    let spare: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let new_writer = || {
        let buf = spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        PackWriter::with_buffer(pack_size, buf.unwrap_or_default())
    };
    std::thread::scope(|scope| {
        for _ in 0..UPLOADERS {
            scope.spawn(|| loop {
                let next = up_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(writer) = next else { break };
                if run.abort.load(Ordering::Relaxed) {
                    continue;
                }
                match repo.save_pack_reuse(writer) {
                    Ok(((id, size, entries), buf)) => {
                        spare.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
                        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                        o.bytes_stored += size;
                        o.packs.push((id, entries));
                    }
                    Err(e) => run.fail(e),
                }
            });
        }
        let mut writer = new_writer();
        for blob in rx {
            if run.abort.load(Ordering::Relaxed) {
                // A failed run writes nothing more; keep draining so no worker blocks.
                continue;
            }
            writer.add_sealing(
                repo.key(),
                BlobEntry {
                    id: blob.id,
                    kind: blob.kind,
                    compressed: blob.compressed,
                    offset: 0,
                    stored_len: 0,
                    raw_len: blob.raw_len,
                },
                &blob.payload,
            );
            if writer.is_full() {
                let full = std::mem::replace(&mut writer, new_writer());
                if up_tx.send(full).is_err() {
                    break;
                }
            }
        }
        if !run.abort.load(Ordering::SeqCst) && !writer.is_empty() {
            let _ = up_tx.send(writer);
        }
        // Uploaders finish when the channel closes.
        drop(up_tx);
    });
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// One source's plan: the table to fill and the chunks to read.
struct Plan {
    table: Vec<Id>,
    jobs: Vec<u64>,
    /// The parent snapshot whose table this plan starts from.
    parent: Option<String>,
}

/// Which snapshot (and its disk) an incremental of `src` starts from.
fn parent_disk<'s>(
    candidates: &'s [(String, Snapshot)],
    src: &Source,
    parent_name: Option<&str>,
    single_disk: bool,
    chunk_size: u32,
) -> Option<(&'s str, &'s DiskEntry)> {
    let fits = |d: &DiskEntry| d.virtual_size == src.size && d.chunk_size == chunk_size;
    for (id, snap) in candidates {
        // The same name; or, for a new differencing child, its parent's name (the disk the
        // child was taken of, as the parent snapshot knows it).
        let found = snap.disks.iter().find(|d| d.name == src.name).or_else(|| {
            snap.disks
                .iter()
                .find(|d| Some(d.name.as_str()) == parent_name)
        });
        if let Some(d) = found {
            if fits(d) {
                return Some((id, d));
            }
            tracing::warn!(
                "snapshot {} has disk {} with another size or chunk size; it can't be the \
                 parent of an incremental",
                snapshot::short_id(id),
                d.name
            );
            continue;
        }
        // A chain backed up through its newest layer has a new name each checkpoint; with one
        // disk on both sides the change list still says what differs.
        if single_disk && snap.disks.len() == 1 && fits(&snap.disks[0]) {
            return Some((id, &snap.disks[0]));
        }
    }
    None
}

/// Back up one VM: its disks and files into a new snapshot. Returns the snapshot's id.
pub fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<(String, Snapshot)> {
    let started = Instant::now();
    let time = now_rfc3339();
    if opts.vm.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "a backup needs a VM name (--vm NAME)".into(),
        ));
    }
    if opts.paths.is_empty() {
        return Err(Error::InvalidArgument(
            "nothing to back up: give the VM's disk and configuration files".into(),
        ));
    }
    let config = repo.config();
    let chunk_size32 = config.chunk_size;
    let chunk_size = u64::from(chunk_size32);
    if chunk_size == 0 {
        return Err(Error::corrupt("config", "chunk size 0"));
    }

    // Shared: other backups may run at once, prune may not (it could delete the packs this run
    // deduplicates against, or the parent this run copies entries from).
    let _lock = repo.lock_shared("backup")?;

    let mut sources = Vec::with_capacity(opts.paths.len());
    let mut names = HashSet::new();
    for p in &opts.paths {
        let s = open_source(p)?;
        if !names.insert(s.name.clone()) {
            return Err(Error::InvalidArgument(format!(
                "two paths are named {}; a snapshot holds each file name once (restore writes \
                 them side by side)",
                s.name
            )));
        }
        sources.push(s);
    }
    let disk_count = sources.iter().filter(|s| s.is_disk()).count();

    // The change lists, by the index of the disk they belong to.
    let mut change: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
    let change_sources = usize::from(!opts.changes_from.is_empty())
        + usize::from(opts.changed_ranges.is_some())
        + usize::from(!opts.disk_changes.is_empty());
    if change_sources > 1 {
        return Err(Error::InvalidArgument(
            "give one kind of change list: a change-list disk, changed ranges, or changed ranges \
             per disk"
                .into(),
        ));
    }
    let only_disk = || -> Result<usize> {
        let mut disks = sources.iter().enumerate().filter(|(_, s)| s.is_disk());
        match (disks.next(), disks.next()) {
            (Some((i, _)), None) => Ok(i),
            _ => Err(Error::InvalidArgument(format!(
                "a change list applies to one disk, and this backup has {disk_count}; say which \
                 disk it describes by backing up that disk's path given to --changes-from"
            ))),
        }
    };
    // For a disk whose change list is a differencing child: the file name of the child's
    // parent, which is what the parent snapshot calls that disk when the child is new.
    let mut parent_names: HashMap<usize, String> = HashMap::new();
    let several = opts.changes_from.len() > 1;
    for cf in &opts.changes_from {
        let canon = std::fs::canonicalize(cf)
            .map_err(|e| Error::io(format!("change list disk {}", cf.display()), e))?;
        let target = sources
            .iter()
            .position(|s| {
                s.is_disk() && std::fs::canonicalize(&s.path).ok().as_deref() == Some(&canon)
            })
            .map(Ok)
            .unwrap_or_else(|| {
                if several {
                    Err(Error::InvalidArgument(format!(
                        "the change list disk {} is not one of the disks backed up; with several \
                         change lists, back up each differencing disk that gives one",
                        cf.display()
                    )))
                } else {
                    only_disk()
                }
            })?;
        let LayerChanges {
            ranges,
            parent_name,
        } = layer_ranges(cf, sources[target].size)?;
        if change.insert(target, ranges).is_some() {
            return Err(Error::InvalidArgument(format!(
                "two change lists describe the disk {}",
                sources[target].path.display()
            )));
        }
        if let Some(name) = parent_name {
            parent_names.insert(target, name);
        }
    }
    if let Some(r) = &opts.changed_ranges {
        change.insert(only_disk()?, r.clone());
    }
    for (path, ranges) in &opts.disk_changes {
        // The same path as given, or else the same file (another spelling of its path).
        let canon = std::fs::canonicalize(path).ok();
        let target = opts
            .paths
            .iter()
            .position(|p| p == path)
            .or_else(|| {
                let canon = canon.as_deref()?;
                sources
                    .iter()
                    .position(|s| std::fs::canonicalize(&s.path).ok().as_deref() == Some(canon))
            })
            .filter(|&i| sources[i].is_disk())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "changed ranges are given for {}, which is not one of this backup's disks",
                    path.display()
                ))
            })?;
        if change.insert(target, ranges.clone()).is_some() {
            return Err(Error::InvalidArgument(format!(
                "changed ranges are given twice for {}",
                path.display()
            )));
        }
    }

    // Parent candidates: the explicit parent, or this VM's snapshots newest first.
    let candidates: Vec<(String, Snapshot)> = match &opts.parent {
        Some(spec) => vec![find_snapshot(repo, spec, Some(&opts.vm))?],
        None => {
            let mut all: Vec<_> = list_snapshots(repo)?
                .into_iter()
                .filter(|(_, s)| s.vm == opts.vm)
                .collect();
            all.reverse();
            all
        }
    };

    let index = repo.load_index()?;

    // Plan every source.
    let mut plans = Vec::with_capacity(sources.len());
    for (i, src) in sources.iter().enumerate() {
        let count = src.size.div_ceil(chunk_size);
        let mut plan = Plan {
            table: Vec::new(),
            jobs: Vec::new(),
            parent: None,
        };
        match &src.kind {
            SourceKind::File { .. } => {
                plan.table = vec![ZERO_ID; count as usize];
                plan.jobs = (0..count).collect();
            }
            SourceKind::Disk { disk, .. } => {
                let incremental = match change.get(&i) {
                    Some(ranges) => {
                        match parent_disk(
                            &candidates,
                            src,
                            parent_names.get(&i).map(String::as_str),
                            disk_count == 1,
                            chunk_size32,
                        ) {
                            Some((pid, pdisk)) => Some((pid, pdisk, ranges)),
                            None => {
                                tracing::warn!(
                                    "no earlier snapshot of VM '{}' has disk {} with the same \
                                     size and chunk size; ignoring the change list and reading \
                                     every allocated chunk",
                                    opts.vm,
                                    src.name
                                );
                                None
                            }
                        }
                    }
                    None => None,
                };
                // Entries copied from the parent must point at data the index still has;
                // otherwise the new snapshot would silently inherit a loss.
                let incremental = match incremental {
                    Some((pid, pdisk, ranges)) => match load_table(repo, &index, pdisk) {
                        Err(e @ (Error::Missing(_) | Error::Corrupt { .. })) => {
                            tracing::warn!(
                                "the chunk table of disk {} in the parent snapshot {} cannot be read ({e}); reading every allocated chunk instead of the change list",
                                src.name,
                                snapshot::short_id(pid)
                            );
                            None
                        }
                        Err(e) => return Err(e),
                        Ok(table) => {
                            let missing = table
                                .iter()
                                .filter(|id| !id.is_zero() && !index.contains(id))
                                .count();
                            if missing > 0 {
                                tracing::warn!(
                                "the parent snapshot {} of disk {} refers to {missing} chunks the repository no longer has (run `hyperkeep check`); reading every allocated chunk instead of the change list",
                                snapshot::short_id(pid),
                                src.name
                            );
                                None
                            } else {
                                Some((pid, table, ranges))
                            }
                        }
                    },
                    None => None,
                };
                match incremental {
                    Some((pid, table, ranges)) => {
                        plan.table = table;
                        plan.parent = Some(pid.to_string());
                        for (a, b) in touched_chunks(ranges, chunk_size, count) {
                            for c in a..b {
                                plan.table[c as usize] = ZERO_ID;
                            }
                            data_chunks(&**disk, src.size, chunk_size, a, b, &mut plan.jobs)?;
                        }
                    }
                    None => {
                        plan.table = vec![ZERO_ID; count as usize];
                        data_chunks(&**disk, src.size, chunk_size, 0, count, &mut plan.jobs)?;
                    }
                }
            }
        }
        plans.push(plan);
    }

    let jobs: Vec<(usize, u64)> = plans
        .iter()
        .enumerate()
        .flat_map(|(s, p)| p.jobs.iter().map(move |&c| (s, c)))
        .collect();
    let chunk_len = |s: usize, c: u64| -> u64 { chunk_size.min(sources[s].size - c * chunk_size) };
    let total: u64 = jobs.iter().map(|&(s, c)| chunk_len(s, c)).sum();
    progress.start(total);

    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        opts.threads
    }
    .clamp(1, 256);

    let run = Run {
        repo,
        index: &index,
        level: config.compression_level,
        new_ids: Mutex::new(HashSet::new()),
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        bytes_read: AtomicU64::new(0),
        bytes_new: AtomicU64::new(0),
        chunks_new: AtomicU64::new(0),
        chunks_reused: AtomicU64::new(0),
        zero_chunks: AtomicU64::new(0),
    };
    let next = AtomicUsize::new(0);

    let mut disk_tables: Vec<(usize, Vec<Id>)> = Vec::new();
    let packed = std::thread::scope(|scope| -> Result<Packed> {
        let (tx, rx) = sync_channel::<Blob>(threads * 2);
        let packer = scope.spawn(|| packer(&run, rx));
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let tx = tx.clone();
            let (run, next, jobs, sources) = (&run, &next, &jobs, &sources);
            workers.push(
                scope.spawn(move || worker(run, next, jobs, sources, chunk_size, &tx, progress)),
            );
        }
        for w in workers {
            match w.join() {
                Ok(results) => {
                    for (s, c, id) in results {
                        plans[s].table[c as usize] = id;
                    }
                }
                Err(_) => run.fail(Error::InvalidArgument(
                    "a backup worker thread panicked; no snapshot was written".into(),
                )),
            }
        }
        if !run.abort.load(Ordering::SeqCst) {
            for s in &sources {
                if let Err(e) = s.check_unchanged() {
                    run.fail(e);
                    break;
                }
            }
        }
        // Tables go into packs too, before the index that names those packs.
        if !run.abort.load(Ordering::SeqCst) {
            for (i, src) in sources.iter().enumerate() {
                if !src.is_disk() {
                    continue;
                }
                let mut ids = Vec::new();
                for raw in table_to_blobs(&plans[i].table) {
                    let (id, blob) = run.prepare(&raw, BlobKind::Tree, None);
                    ids.push(id);
                    if let Some(b) = blob {
                        if tx.send(b).is_err() {
                            break;
                        }
                    }
                }
                disk_tables.push((i, ids));
            }
        }
        drop(tx);
        let packed = match packer.join() {
            Ok(r) => r,
            Err(_) => Err(Error::InvalidArgument(
                "the backup's pack writer panicked; no snapshot was written".into(),
            )),
        };
        if let Some(e) = run.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        packed
    })?;
    progress.finish();

    // Index of the new packs, then the snapshot.
    if !packed.packs.is_empty() {
        let file = IndexFile {
            packs: packed
                .packs
                .iter()
                .map(|(id, blobs)| IndexPack {
                    id: *id,
                    blobs: blobs.clone(),
                })
                .collect(),
            supersedes: Vec::new(),
        };
        repo.save_index(&file)?;
    }

    let mut disks = Vec::new();
    let mut files = Vec::new();
    let mut parent_used: Option<String> = None;
    for (i, ids) in disk_tables {
        let src = &sources[i];
        let plan = &plans[i];
        let SourceKind::Disk { info, .. } = &src.kind else {
            continue;
        };
        if plan.parent.is_some() {
            parent_used = plan.parent.clone();
        }
        let data_bytes = plan
            .table
            .iter()
            .enumerate()
            .filter(|(_, id)| !id.is_zero())
            .map(|(c, _)| chunk_len(i, c as u64))
            .sum();
        disks.push(DiskEntry {
            name: src.name.clone(),
            source_path: src.path.display().to_string(),
            format: info.format.to_string(),
            subformat: info.subformat.to_string(),
            virtual_size: src.size,
            logical_sector_size: info.logical_sector_size,
            physical_sector_size: info.physical_sector_size,
            block_size: info.block_size,
            chunk_size: chunk_size32,
            tables: ids,
            data_bytes,
        });
    }
    for (i, src) in sources.iter().enumerate() {
        if let SourceKind::File { mtime, .. } = &src.kind {
            files.push(FileEntry {
                name: src.name.clone(),
                size: src.size,
                mtime: mtime.clone(),
                chunks: std::mem::take(&mut plans[i].table),
            });
        }
    }
    let parent = parent_used.or_else(|| candidates.first().map(|(id, _)| id.clone()));
    let snap = Snapshot {
        version: SNAPSHOT_VERSION,
        time,
        vm: opts.vm.clone(),
        hostname: snapshot::hostname(),
        tags: opts.tags.clone(),
        parent,
        mode: opts.mode.clone(),
        consistency: opts.consistency.clone(),
        downtime_ms: opts.downtime_ms,
        booted: opts.booted,
        disks,
        files,
        summary: Summary {
            bytes_read: run.bytes_read.load(Ordering::SeqCst),
            bytes_new: run.bytes_new.load(Ordering::SeqCst),
            bytes_stored: packed.bytes_stored,
            chunks_new: run.chunks_new.load(Ordering::SeqCst),
            chunks_reused: run.chunks_reused.load(Ordering::SeqCst),
            zero_chunks: run.zero_chunks.load(Ordering::SeqCst),
            duration_ms: started.elapsed().as_millis() as u64,
        },
        program: format!("hyperkeep {}", env!("CARGO_PKG_VERSION")),
    };
    let id = repo.save_json(ObjectKind::Snapshot, &snap)?;
    Ok((id.to_hex(), snap))
}

/// One worker: claims jobs until none are left or the run failed. Returns the table entries it
/// computed as (source, chunk, id).
fn worker(
    run: &Run<'_>,
    next: &AtomicUsize,
    jobs: &[(usize, u64)],
    sources: &[Source],
    chunk_size: u64,
    tx: &SyncSender<Blob>,
    progress: &dyn Progress,
) -> Vec<(usize, u64, Id)> {
    let mut results = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut compressor = zstd::bulk::Compressor::new(run.level)
        .ok()
        .map(|ctx| WorkerZstd {
            ctx,
            out: Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk_size as usize)),
        });
    loop {
        if run.abort.load(Ordering::Relaxed) {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(s, chunk)) = jobs.get(i) else {
            break;
        };
        let src = &sources[s];
        let offset = chunk * chunk_size;
        let len = chunk_size.min(src.size - offset) as usize;
        let data = &mut buf[..len];
        if let Err(e) = src.read(data, offset) {
            run.fail(e);
            break;
        }
        run.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        progress.advance(len as u64);
        if vdisk::io::is_zero(data) {
            run.zero_chunks.fetch_add(1, Ordering::Relaxed);
            results.push((s, chunk, ZERO_ID));
            continue;
        }
        let (id, blob) = run.prepare(data, BlobKind::Data, compressor.as_mut());
        results.push((s, chunk, id));
        match blob {
            None => {
                run.chunks_reused.fetch_add(1, Ordering::Relaxed);
            }
            Some(b) => {
                run.chunks_new.fetch_add(1, Ordering::Relaxed);
                run.bytes_new.fetch_add(len as u64, Ordering::Relaxed);
                if tx.send(b).is_err() {
                    // The packer stopped: it recorded why.
                    break;
                }
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_chunks_merge_and_clip() {
        let cs = 1 << 20;
        assert_eq!(
            touched_chunks(
                &[(0, 1), (1, 10), (3 << 20, (1 << 20) + 1), (100 << 20, 5)],
                cs,
                50
            ),
            vec![(0, 1), (3, 5)]
        );
        assert_eq!(touched_chunks(&[(cs, 0)], cs, 50), vec![]);
        assert_eq!(touched_chunks(&[(cs - 1, 2)], cs, 50), vec![(0, 2)]);
        assert_eq!(
            touched_chunks(&[(5 * cs, cs), (0, 6 * cs)], cs, 50),
            vec![(0, 6)]
        );
        assert_eq!(touched_chunks(&[(u64::MAX - 5, 10)], cs, 50), vec![]);
    }
}
