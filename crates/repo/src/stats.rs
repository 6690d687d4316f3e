//! `hyperkeep stats`: how big the repository is, and how much dedup and compression save.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::backend::ObjectKind;
use crate::index::Index;
use crate::pack::BlobKind;
use crate::repository::Repository;
use crate::snapshot::Snapshot;
use crate::Result;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RepoStats {
    pub snapshots: u64,
    /// Distinct VMs with snapshots.
    pub vms: u64,
    /// What restoring every snapshot would write: virtual sizes of all disks plus file sizes.
    pub total_restore_size: u64,
    /// Bytes of non-zero chunks over all snapshots (before deduplication).
    pub total_data_bytes: u64,
    /// Distinct blobs in the index (data chunks and table blobs).
    pub blobs: u64,
    pub data_blobs: u64,
    pub tree_blobs: u64,
    /// Raw bytes of the distinct blobs (after deduplication, before compression).
    pub unique_raw_bytes: u64,
    /// Stored (compressed, sealed) bytes of the distinct blobs.
    pub unique_stored_bytes: u64,
    /// Packs in the index.
    pub packs: u64,
    /// Bytes of all pack files present (including unreferenced ones prune has not removed).
    pub pack_bytes: u64,
    /// unique_raw_bytes / unique_stored_bytes (1.0 when empty).
    pub compression_ratio: f64,
    /// total_data_bytes / unique data bytes (1.0 when empty).
    pub dedup_ratio: f64,
}

/// Statistics over the given snapshots (usually all of them) and the repository's index.
pub fn stats(
    repo: &Repository,
    index: &Index,
    snapshots: &[(String, Snapshot)],
) -> Result<RepoStats> {
    let mut s = RepoStats {
        snapshots: snapshots.len() as u64,
        ..RepoStats::default()
    };
    let vms: BTreeSet<&str> = snapshots.iter().map(|(_, snap)| snap.vm.as_str()).collect();
    s.vms = vms.len() as u64;
    for (_, snap) in snapshots {
        for d in &snap.disks {
            s.total_restore_size += d.virtual_size;
            s.total_data_bytes += d.data_bytes;
        }
        for f in &snap.files {
            s.total_restore_size += f.size;
            s.total_data_bytes += f.size;
        }
    }
    // Duplicates (the same blob in two packs) are counted once.
    let mut blobs: Vec<_> = index
        .iter()
        .map(|(id, loc)| (id, loc.kind, loc.stored_len, loc.raw_len))
        .collect();
    blobs.sort_unstable_by_key(|b| b.0);
    blobs.dedup_by(|a, b| a.0 == b.0);
    let mut unique_data_raw = 0u64;
    for (_, kind, stored, raw) in &blobs {
        s.blobs += 1;
        s.unique_raw_bytes += u64::from(*raw);
        s.unique_stored_bytes += u64::from(*stored);
        match kind {
            BlobKind::Data => {
                s.data_blobs += 1;
                unique_data_raw += u64::from(*raw);
            }
            BlobKind::Tree => s.tree_blobs += 1,
        }
    }
    s.packs = index.packs().len() as u64;
    s.pack_bytes = repo
        .backend()
        .list(ObjectKind::Pack)?
        .iter()
        .map(|o| o.size)
        .sum();
    s.compression_ratio = ratio(s.unique_raw_bytes, s.unique_stored_bytes);
    s.dedup_ratio = ratio(s.total_data_bytes, unique_data_raw);
    Ok(s)
}

fn ratio(a: u64, b: u64) -> f64 {
    if a == 0 || b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ratio_of_nothing_is_one() {
        assert_eq!(super::ratio(0, 0), 1.0);
        assert_eq!(super::ratio(10, 5), 2.0);
    }
}
