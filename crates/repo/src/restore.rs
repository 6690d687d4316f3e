//! Reading snapshots back: a backed-up disk as a [`VirtualDisk`], and whole-snapshot restore.
//!
//! [`SnapshotDisk`] makes a disk inside a snapshot look like any other disk, so everything that
//! works on disks works on backups without a restore first: `vdisk::convert` writes it out in any
//! format (this is how [`restore`] restores), and the guest-filesystem layer reads files from it.
//! Its allocation map comes from the chunk table (a zero id is a hole), so a restore writes only
//! the chunks that hold data and the restored disk is as sparse as the original.
//!
//! Every chunk is authenticated and its keyed hash checked against the table
//! ([`Repository::read_chunk`]), so a damaged repository makes a read fail; it never yields wrong
//! bytes. A failed restore removes everything it created.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use vdisk::{
    ConvertOptions, DiskFormat, DiskInfo, Extent, ExtentState, Geometry, MapScope, Subformat,
    VirtualDisk,
};

use crate::backup::Progress;
use crate::crypto::Id;
use crate::index::Index;
use crate::repository::Repository;
use crate::snapshot::{load_table, short_id, validate_disk_entry, DiskEntry, Snapshot};
use crate::{Error, Result};

/// Chunks kept in a [`SnapshotDisk`]'s cache: enough for the parallel readers of a convert
/// (2 readers × 4 MiB pieces at 1 MiB chunks) and for a file system's metadata reads.
const CACHE_CHUNKS: usize = 8;

/// A disk inside a snapshot, readable like any disk.
pub struct SnapshotDisk<'a> {
    repo: &'a Repository,
    index: &'a Index,
    entry: DiskEntry,
    table: Vec<Id>,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    /// The first repository error a read hit, kept whole (the `VirtualDisk` interface can only
    /// carry a disk error) so that [`restore`] can report the original.
    failure: Mutex<Option<Error>>,
}

impl<'a> SnapshotDisk<'a> {
    /// Open disk `entry` of a snapshot (loads its chunk table).
    pub fn open(repo: &'a Repository, index: &'a Index, entry: &DiskEntry) -> Result<Self> {
        validate_disk_entry(entry)?;
        if entry.logical_sector_size == 0 || entry.physical_sector_size == 0 {
            return Err(Error::corrupt(
                format!("snapshot disk entry '{}'", entry.name),
                "sector size 0",
            ));
        }
        let table = load_table(repo, index, entry)?;
        Ok(SnapshotDisk {
            repo,
            index,
            entry: entry.clone(),
            table,
            cache: Mutex::new(VecDeque::with_capacity(CACHE_CHUNKS)),
            failure: Mutex::new(None),
        })
    }

    pub fn entry(&self) -> &DiskEntry {
        &self.entry
    }

    /// The chunk table: one id per chunk, [`Id::ZERO`] for chunks that read as zeros.
    pub fn table(&self) -> &[Id] {
        &self.table
    }

    /// The repository error behind the first failed read, if any.
    pub fn take_failure(&self) -> Option<Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn cached(&self, chunk: u64) -> Option<Arc<Vec<u8>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let pos = cache.iter().position(|(c, _)| *c == chunk)?;
        let hit = cache.remove(pos)?;
        let data = hit.1.clone();
        cache.push_front(hit);
        Some(data)
    }

    /// Chunk `chunk`'s bytes (not for zero chunks).
    fn chunk(&self, chunk: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.cached(chunk) {
            return Ok(d);
        }
        let id = self.table[chunk as usize];
        let (offset, len) = self.entry.chunk_range(chunk);
        let data = self.repo.read_chunk(self.index, &id)?;
        if data.len() as u64 != len {
            return Err(Error::corrupt(
                format!("chunk {id}"),
                format!(
                    "holds {} bytes, but chunk {chunk} of disk '{}' at offset {offset} is {len} \
                     bytes",
                    data.len(),
                    self.entry.name
                ),
            ));
        }
        let data = Arc::new(data);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.iter().any(|(c, _)| *c == chunk) {
            if cache.len() >= CACHE_CHUNKS {
                cache.pop_back();
            }
            cache.push_front((chunk, data.clone()));
        }
        Ok(data)
    }

    /// Turn a repository error into a disk error that names the disk, the offset and the object,
    /// keeping the original for [`SnapshotDisk::take_failure`].
    fn fail(&self, e: Error, chunk: u64) -> vdisk::Error {
        let id = self.table[chunk as usize];
        let (offset, _) = self.entry.chunk_range(chunk);
        let e = match e {
            Error::Corrupt { object, detail } => Error::Corrupt {
                object,
                detail: format!(
                    "{detail} (chunk {id} of disk '{}' at offset {offset} is lost)",
                    self.entry.name
                ),
            },
            Error::Missing(object) => Error::Missing(format!(
                "{object} (holds chunk {id} of disk '{}' at offset {offset})",
                self.entry.name
            )),
            other => other,
        };
        let msg = format!(
            "disk '{}' of the snapshot, offset {offset}: chunk {id} cannot be read",
            self.entry.name
        );
        let detail = e.to_string();
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        vdisk::Error::io(msg, std::io::Error::other(detail))
    }
}

impl VirtualDisk for SnapshotDisk<'_> {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.entry.virtual_size,
            logical_sector_size: self.entry.logical_sector_size,
            physical_sector_size: self.entry.physical_sector_size,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        vdisk::disk::check_range(offset, buf.len() as u64, self.entry.virtual_size)?;
        let cs = u64::from(self.entry.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let chunk = pos / cs;
            let within = (pos - chunk * cs) as usize;
            let (_, clen) = self.entry.chunk_range(chunk);
            let n = (clen as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.table[chunk as usize].is_zero() {
                out.fill(0);
            } else {
                let data = self.chunk(chunk).map_err(|e| self.fail(e, chunk))?;
                out.copy_from_slice(&data[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64, _scope: MapScope) -> vdisk::Result<Vec<Extent>> {
        let size = self.entry.virtual_size;
        let end = offset.saturating_add(length).min(size);
        let mut out = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        let cs = u64::from(self.entry.chunk_size);
        let mut pos = offset;
        while pos < end {
            let chunk = pos / cs;
            let cend = ((chunk + 1) * cs).min(end);
            let state = if self.table[chunk as usize].is_zero() {
                ExtentState::Unallocated
            } else {
                ExtentState::Data
            };
            vdisk::disk::push_extent(&mut out, pos, cend - pos, state);
            pos = cend;
        }
        Ok(out)
    }

    fn info(&self) -> DiskInfo {
        let format = parse_format(&self.entry.format).unwrap_or(DiskFormat::Raw);
        let subformat = match self.entry.subformat.as_str() {
            "fixed" => Subformat::Fixed,
            "differencing" => Subformat::Differencing,
            _ => Subformat::Dynamic,
        };
        DiskInfo {
            path: None,
            format,
            subformat,
            virtual_size: self.entry.virtual_size,
            block_size: self.entry.block_size,
            logical_sector_size: self.entry.logical_sector_size,
            physical_sector_size: self.entry.physical_sector_size,
            file_size: 0,
            allocated_bytes: self.entry.data_bytes,
            identifier: None,
            details: vec![
                ("backed up from".into(), self.entry.source_path.clone()),
                ("chunk size".into(), self.entry.chunk_size.to_string()),
                ("chunks".into(), self.table.len().to_string()),
            ],
            parent: None,
        }
    }
}

/// `vhdx` / `vhd` / `raw` as recorded in a manifest.
pub fn parse_format(s: &str) -> Option<DiskFormat> {
    match s {
        "vhdx" => Some(DiskFormat::Vhdx),
        "vhd" => Some(DiskFormat::Vhd),
        "raw" => Some(DiskFormat::Raw),
        _ => None,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoredDisk {
    pub name: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub virtual_size: u64,
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoredFile {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub vm: String,
    pub target: PathBuf,
    pub disks: Vec<RestoredDisk>,
    pub files: Vec<RestoredFile>,
}

/// The file name a disk is restored under: its own name, with the extension of the output
/// format when converting (`--to`) or when a differencing layer becomes a standalone disk.
pub fn output_name(disk: &DiskEntry, format: DiskFormat) -> String {
    let path = Path::new(&disk.name);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let want = match format {
        DiskFormat::Vhdx => "vhdx",
        DiskFormat::Vhd => "vhd",
        DiskFormat::Raw => "raw",
    };
    let keep = matches!(
        (format, ext.as_deref()),
        (DiskFormat::Vhdx, Some("vhdx"))
            | (DiskFormat::Vhd, Some("vhd"))
            | (DiskFormat::Raw, Some("raw" | "img"))
    );
    if keep {
        return disk.name.clone();
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(&disk.name);
    format!("{stem}.{want}")
}

/// Removes what a restore created unless the restore finished.
struct Cleanup {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    done: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Restore a whole snapshot into directory `target` (created if missing): every disk via
/// `vdisk::convert` (the original format, or `to`; always dynamic, so holes stay holes) and every
/// file written whole. Refuses to overwrite anything; on any error, everything this restore
/// created is removed again.
pub fn restore(
    repo: &Repository,
    snapshot_id: &str,
    snapshot: &Snapshot,
    target: &Path,
    to: Option<DiskFormat>,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    if target.exists() && !target.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "the restore target {} exists and is not a directory; give a new or empty directory",
            target.display()
        )));
    }
    // Plan and refuse first, so that nothing is written when anything is in the way.
    let mut outputs = Vec::new();
    for d in &snapshot.disks {
        validate_disk_entry(d)?;
        let original = parse_format(&d.format).ok_or_else(|| {
            Error::corrupt(
                format!("snapshot {}", short_id(snapshot_id)),
                format!("disk '{}' has unknown format '{}'", d.name, d.format),
            )
        })?;
        let format = to.unwrap_or(original);
        outputs.push((format, target.join(output_name(d, format))));
    }
    for f in &snapshot.files {
        check_file_name(&f.name)?;
    }
    let mut all: Vec<&Path> = outputs.iter().map(|(_, p)| p.as_path()).collect();
    let file_paths: Vec<PathBuf> = snapshot
        .files
        .iter()
        .map(|f| target.join(&f.name))
        .collect();
    all.extend(file_paths.iter().map(|p| p.as_path()));
    let mut seen = std::collections::HashSet::new();
    for p in &all {
        if !seen.insert(*p) {
            return Err(Error::InvalidArgument(format!(
                "two items of the snapshot would be restored as {}; restore with another --to",
                p.display()
            )));
        }
        if p.symlink_metadata().is_ok() {
            return Err(Error::InvalidArgument(format!(
                "{} already exists; restore refuses to overwrite anything (choose an empty \
                 --target directory)",
                p.display()
            )));
        }
    }

    let mut cleanup = Cleanup {
        files: Vec::new(),
        dir: None,
        done: false,
    };
    if !target.exists() {
        std::fs::create_dir_all(target)
            .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        cleanup.dir = Some(target.to_path_buf());
    }

    let index = repo.load_index()?;
    let total: u64 = snapshot.disks.iter().map(|d| d.data_bytes).sum::<u64>()
        + snapshot.files.iter().map(|f| f.size).sum::<u64>();
    progress.start(total);

    let mut report = RestoreReport {
        snapshot: snapshot_id.to_string(),
        vm: snapshot.vm.clone(),
        target: target.to_path_buf(),
        disks: Vec::new(),
        files: Vec::new(),
    };
    for (d, (format, out)) in snapshot.disks.iter().zip(&outputs) {
        let disk = SnapshotDisk::open(repo, &index, d)?;
        let original = parse_format(&d.format);
        let opts = ConvertOptions {
            format: *format,
            fixed: false,
            // Keep the original block size when the format stays the same (an 8 MiB-block
            // qemu disk comes back as one); otherwise the output format's default.
            block_size: if original == Some(*format) {
                d.block_size
            } else {
                None
            },
        };
        let last = std::sync::atomic::AtomicU64::new(0);
        let cb = |done: u64, _total: u64| {
            let prev = last.swap(done, std::sync::atomic::Ordering::Relaxed);
            progress.advance(done.saturating_sub(prev));
        };
        cleanup.files.push(out.clone());
        let res = vdisk::convert(&disk, out, &opts, Some(&cb));
        match res {
            Ok(r) => report.disks.push(RestoredDisk {
                name: d.name.clone(),
                path: out.clone(),
                format: *format,
                virtual_size: d.virtual_size,
                bytes_written: r.bytes_written,
            }),
            Err(e) => {
                return Err(match disk.take_failure() {
                    Some(repo_err) => repo_err,
                    None => Error::Disk(e),
                })
            }
        }
    }
    for (f, path) in snapshot.files.iter().zip(&file_paths) {
        cleanup.files.push(path.clone());
        restore_file(repo, &index, f, path, progress)?;
        report.files.push(RestoredFile {
            name: f.name.clone(),
            path: path.clone(),
            size: f.size,
        });
    }
    progress.finish();
    cleanup.done = true;
    Ok(report)
}

fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(Error::corrupt(
            "snapshot",
            format!("file name {name:?} is not a plain file name"),
        ));
    }
    Ok(())
}

/// Write one backed-up file whole.
fn restore_file(
    repo: &Repository,
    index: &Index,
    f: &crate::snapshot::FileEntry,
    path: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    use std::io::Write;
    let chunk_size = u64::from(repo.config().chunk_size);
    let want = f.size.div_ceil(chunk_size);
    if want != f.chunks.len() as u64 {
        return Err(Error::corrupt(
            "snapshot",
            format!(
                "file '{}' of {} bytes needs {want} chunks, the manifest lists {}",
                f.name,
                f.size,
                f.chunks.len()
            ),
        ));
    }
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut w = std::io::BufWriter::new(&file);
    let werr = |e| Error::io(format!("writing {}", path.display()), e);
    for (i, id) in f.chunks.iter().enumerate() {
        let offset = i as u64 * chunk_size;
        let len = chunk_size.min(f.size - offset) as usize;
        if id.is_zero() {
            w.write_all(&vec![0u8; len]).map_err(werr)?;
        } else {
            let data = repo.read_chunk(index, id).map_err(|e| match e {
                Error::Corrupt { object, detail } => Error::Corrupt {
                    object,
                    detail: format!(
                        "{detail} (chunk {id} of file '{}' at offset {offset} is lost)",
                        f.name
                    ),
                },
                Error::Missing(o) => Error::Missing(format!(
                    "{o} (holds chunk {id} of file '{}' at offset {offset})",
                    f.name
                )),
                other => other,
            })?;
            if data.len() != len {
                return Err(Error::corrupt(
                    format!("chunk {id}"),
                    format!(
                        "holds {} bytes, file '{}' needs {len} at offset {offset}",
                        data.len(),
                        f.name
                    ),
                ));
            }
            w.write_all(&data).map_err(werr)?;
        }
        progress.advance(len as u64);
    }
    w.flush().map_err(werr)?;
    drop(w);
    if let Some(t) = f.mtime.as_deref().and_then(crate::snapshot::parse_time) {
        let _ = file.set_modified(t.into());
    }
    file.sync_all().map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, format: &str) -> DiskEntry {
        DiskEntry {
            name: name.into(),
            source_path: String::new(),
            format: format.into(),
            subformat: "dynamic".into(),
            virtual_size: 1 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: None,
            chunk_size: 1 << 20,
            tables: vec![Id::ZERO],
            data_bytes: 0,
        }
    }

    #[test]
    fn output_names_follow_the_format() {
        assert_eq!(
            output_name(&entry("a.vhdx", "vhdx"), DiskFormat::Vhdx),
            "a.vhdx"
        );
        assert_eq!(
            output_name(&entry("a.avhdx", "vhdx"), DiskFormat::Vhdx),
            "a.vhdx"
        );
        assert_eq!(
            output_name(&entry("a.vhdx", "vhdx"), DiskFormat::Vhd),
            "a.vhd"
        );
        assert_eq!(
            output_name(&entry("a.img", "raw"), DiskFormat::Raw),
            "a.img"
        );
        assert_eq!(
            output_name(&entry("disk", "raw"), DiskFormat::Raw),
            "disk.raw"
        );
        assert_eq!(
            output_name(&entry("A.VHD", "vhd"), DiskFormat::Vhd),
            "A.VHD"
        );
    }
}
