//! The guest-filesystem side of the fuzzers: a fuzz input as a whole virtual disk
//! ([`SparseDisk`]), and the bounded walk ([`exercise_fs`], [`exercise_partitions`]) the
//! `guestfs_open` and `partitions` targets run over whatever `guestfs` opens.
//!
//! Why a disk over [`SparseFile`] rather than `guestfs::volume::MemDisk`: `MemDisk` holds the
//! whole image in a `Vec`, so a 64 MiB input would cost 64 MiB of memset per run; the sparse
//! file costs only the pages the input patches.

use std::sync::Arc;

use guestfs::fs::{FileType, GuestFs, NodeId, WalkEntry};
use guestfs::volume::Volume;
use vdisk_core::{
    DiskFormat, DiskInfo, Extent, ExtentState, Geometry, MapScope, ReadAt, Subformat, VirtualDisk,
};

use crate::SparseFile;

/// A fuzz input as a raw disk with 512-byte sectors: every byte is `Data` (a filesystem parser
/// never asks for the map, but the contract says what a raw disk's map is).
pub struct SparseDisk(pub SparseFile);

impl SparseDisk {
    pub fn decode(data: &[u8]) -> SparseDisk {
        SparseDisk(SparseFile::decode(data))
    }
}

impl VirtualDisk for SparseDisk {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.0.len(),
            logical_sector_size: 512,
            physical_sector_size: 512,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk_core::Result<()> {
        vdisk_core::disk::check_range(offset, buf.len() as u64, self.0.len())?;
        self.0
            .read_exact_at(buf, offset)
            .map_err(|e| vdisk_core::Error::io(format!("read at {offset}"), e))
    }

    fn map(&self, offset: u64, length: u64, _scope: MapScope) -> vdisk_core::Result<Vec<Extent>> {
        let size = self.0.len();
        let start = offset.min(size);
        let end = offset.saturating_add(length).min(size);
        let mut out = Vec::new();
        vdisk_core::disk::push_extent(&mut out, start, end - start, ExtentState::Data);
        Ok(out)
    }

    fn info(&self) -> DiskInfo {
        let size = self.0.len();
        DiskInfo {
            path: None,
            format: DiskFormat::Raw,
            subformat: Subformat::Fixed,
            virtual_size: size,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 512,
            file_size: size,
            allocated_bytes: size,
            identifier: None,
            details: vec![("backing".into(), "fuzz input".into())],
            parent: None,
        }
    }
}

/// Work limits of one input's walk, shared by every partition of the disk, so that no input
/// (a directory of a million entries, a 4 GiB file) makes one run slow.
pub struct FsBudget {
    /// Directory entries visited (each gets `metadata` and reads).
    pub entries: usize,
    /// File bytes read in total.
    pub bytes: u64,
    /// Largest single `read_at`.
    pub piece: usize,
    /// Partitions opened per disk.
    pub partitions: usize,
    /// Entries that also get a `lookup` of their path.
    pub lookups: usize,
}

impl Default for FsBudget {
    fn default() -> Self {
        FsBudget {
            entries: 2000,
            bytes: 4 << 20,
            piece: 64 << 10,
            partitions: 16,
            lookups: 64,
        }
    }
}

/// What one walk saw: the seeds test checks that real images are walked to the end.
#[derive(Debug, Default)]
pub struct FsStats {
    pub entries: usize,
    pub files_read: usize,
    pub links: usize,
    /// The walk stopped because the entry budget ran out (not an error of the filesystem).
    pub capped: bool,
}

/// Marker error the visitor returns to stop the walk when the entry budget runs out.
const CAP: &str = "hyperkeep-fuzz: entry budget exhausted";

/// Walk a filesystem with bounded work: every entry gets `metadata`, links `read_link`, files
/// reads of their first and a middle piece and of each named stream, the first entries a
/// `lookup` of their path. Errors from the filesystem are fine (hostile input) and are returned
/// for the seeds test; a panic is a finding, and so is a read that claims more bytes than
/// asked for.
pub fn exercise_fs(fs: &dyn GuestFs, budget: &mut FsBudget) -> guestfs::Result<FsStats> {
    let _ = (fs.kind(), fs.label());
    let root = fs.root();
    let _ = fs.metadata(root).map(|m| format!("{m:?}"));
    let _ = fs.dir_key(root);
    let mut stats = FsStats::default();
    let mut buf = vec![0u8; budget.piece];
    let mut first_error: Option<guestfs::Error> = None;
    let result = guestfs::fs::walk(fs, root, &mut |item: &WalkEntry| {
        if budget.entries == 0 {
            return Err(guestfs::Error::InvalidArgument(CAP.into()));
        }
        budget.entries -= 1;
        stats.entries += 1;
        if budget.lookups > 0 {
            budget.lookups -= 1;
            // Hostile names can hold separators or repeat, so the node found may differ.
            let _ = fs.lookup(&format!("/{}", item.path));
        }
        let node = item.entry.node;
        match fs.metadata(node) {
            Ok(meta) => {
                let _ = format!("{meta:?}");
                match meta.file_type {
                    FileType::File => {
                        stats.files_read += 1;
                        read_piece(fs, node, None, 0, &mut buf, budget);
                        read_piece(fs, node, None, meta.size / 2, &mut buf, budget);
                        // At and past the end: 0 bytes or an error, never data.
                        read_piece(fs, node, None, meta.size, &mut buf, budget);
                        read_piece(fs, node, None, u64::MAX - 1, &mut buf, budget);
                    }
                    FileType::Symlink | FileType::Junction => {
                        stats.links += 1;
                        let _ = fs.read_link(node).map(|l| format!("{l:?}"));
                    }
                    FileType::Directory | FileType::Other => {}
                }
                for s in meta.streams.iter().take(4) {
                    read_piece(fs, node, Some(&s.name), 0, &mut buf, budget);
                }
                for x in meta.xattrs.iter().take(4) {
                    read_piece(fs, node, Some(x), 0, &mut buf, budget);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        Ok(!item.is_loop)
    });
    match result {
        Err(guestfs::Error::InvalidArgument(m)) if m == CAP => stats.capped = true,
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

/// One bounded `read_at` that must not claim more bytes than the buffer holds.
fn read_piece(
    fs: &dyn GuestFs,
    node: NodeId,
    stream: Option<&str>,
    offset: u64,
    buf: &mut [u8],
    budget: &mut FsBudget,
) {
    let n = (buf.len() as u64).min(budget.bytes) as usize;
    if n == 0 {
        return;
    }
    budget.bytes -= n as u64;
    if let Ok(got) = fs.read_at(node, stream, &mut buf[..n], offset) {
        assert!(
            got <= n,
            "read_at(node {node}, stream {stream:?}, {n} bytes at {offset}) returned {got} bytes"
        );
    }
}

/// Open the filesystem in `volume` and walk it. `Err` if it does not open or the walk hit an
/// error (fine for fuzz inputs, a failure for seeds).
pub fn exercise_volume(volume: Volume, budget: &mut FsBudget) -> guestfs::Result<FsStats> {
    let fs = guestfs::open_fs(volume)?;
    exercise_fs(&*fs, budget)
}

/// Read the disk's partition table and walk the filesystem of each partition (at most
/// `budget.partitions`). Returns the table and, per partition, its walk's result.
pub fn exercise_partitions(
    disk: Arc<dyn VirtualDisk>,
    budget: &mut FsBudget,
) -> guestfs::Result<(guestfs::PartitionTable, Vec<guestfs::Result<FsStats>>)> {
    let table = guestfs::partitions(&*disk)?;
    let _ = format!("{table:?}");
    let mut results = Vec::new();
    for part in table.partitions.iter().take(budget.partitions) {
        let _ = part.type_description();
        let r = part
            .volume(disk.clone())
            .and_then(|v| exercise_volume(v, budget));
        results.push(r);
    }
    Ok((table, results))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn inputs(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let p = e.unwrap().path();
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        out.sort();
        out
    }

    /// Every committed seed was made by the filesystem's own mkfs (make-guestfs-corpus.sh): each
    /// must open and be walked to the end without an error, or fuzzing starts blind.
    #[test]
    fn guestfs_seeds_open_and_walk() {
        let seeds = inputs("corpus/guestfs_open");
        assert!(seeds.len() >= 7, "only {} guestfs_open seeds", seeds.len());
        let mut kinds = std::collections::BTreeSet::new();
        for (path, bytes) in &seeds {
            let volume = Volume::whole(Arc::new(SparseDisk::decode(bytes)));
            let fs = guestfs::open_fs(volume)
                .unwrap_or_else(|e| panic!("seed {} does not open: {e}", path.display()));
            kinds.insert(format!("{:?}", fs.kind()));
            let stats = exercise_fs(&*fs, &mut FsBudget::default())
                .unwrap_or_else(|e| panic!("seed {} walk failed: {e}", path.display()));
            eprintln!("{}: {:?} {stats:?}", path.display(), fs.kind());
            assert!(!stats.capped, "seed {} hit the entry cap", path.display());
            // exFAT's seed is empty when exfat-fuse cannot mount; every other one has the tree.
            if fs.kind() != guestfs::fs::FsKind::Exfat {
                assert!(
                    stats.entries >= 5 && stats.files_read >= 3,
                    "seed {}: {stats:?}",
                    path.display()
                );
            }
        }
        let want = ["Fat12", "Fat16", "Fat32", "Ext2", "Ext4", "Exfat", "Ntfs"];
        for k in want {
            assert!(kinds.contains(k), "no {k} seed (have {kinds:?})");
        }
    }

    #[test]
    fn partition_seeds_open_and_walk() {
        let seeds = inputs("corpus/partitions");
        assert!(seeds.len() >= 3, "only {} partitions seeds", seeds.len());
        let mut tables = std::collections::BTreeSet::new();
        for (path, bytes) in &seeds {
            let disk: Arc<dyn VirtualDisk> = Arc::new(SparseDisk::decode(bytes));
            let (table, results) = exercise_partitions(disk, &mut FsBudget::default())
                .unwrap_or_else(|e| panic!("seed {}: no partition table: {e}", path.display()));
            tables.insert(format!("{:?}", table.kind));
            assert!(
                !results.is_empty(),
                "seed {}: no partitions",
                path.display()
            );
            for (part, r) in table.partitions.iter().zip(&results) {
                let stats = r.as_ref().unwrap_or_else(|e| {
                    panic!("seed {} partition {}: {e}", path.display(), part.index)
                });
                assert!(stats.entries >= 5, "seed {}: {stats:?}", path.display());
            }
            if table.kind == guestfs::TableKind::Mbr {
                assert!(
                    table.partitions.iter().any(|p| p.logical),
                    "seed {}: the MBR seed has no logical partition: {table:?}",
                    path.display()
                );
            }
        }
        for k in ["Gpt", "Mbr", "None"] {
            assert!(tables.contains(k), "no {k} table seed (have {tables:?})");
        }
    }

    /// Inputs that once crashed a target (fuzz/regressions/<target>/): each must now run
    /// through the target's code without a panic (this test build has overflow checks on, as
    /// the fuzz build has).
    #[test]
    fn regressions_do_not_panic() {
        let mut n = 0;
        for (path, bytes) in inputs("regressions/guestfs_open") {
            eprintln!("{}", path.display());
            let volume = Volume::whole(Arc::new(SparseDisk::decode(&bytes)));
            let _ = exercise_volume(volume, &mut FsBudget::default());
            n += 1;
        }
        for (path, bytes) in inputs("regressions/partitions") {
            eprintln!("{}", path.display());
            let _ = exercise_partitions(
                Arc::new(SparseDisk::decode(&bytes)),
                &mut FsBudget::default(),
            );
            n += 1;
        }
        assert!(n > 0);
    }

    #[test]
    fn sparse_disk_reads_like_a_raw_disk() {
        let mut image = vec![0u8; 4096];
        image[1000..1010].fill(7);
        let disk = SparseDisk::decode(&crate::encode(&image).unwrap());
        let mut b = [0u8; 12];
        disk.read_at(&mut b, 999).unwrap();
        assert_eq!(b, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        assert!(disk.read_at(&mut b, 4090).is_err());
        crate::exercise(&disk, &crate::Limits::default());
    }
}
