//! `hyperkeep diff`: what changed between two snapshots.
//!
//! Disks are compared by name, chunk by chunk: a chunk changed when its ids differ (keyed hashes
//! of the content, so equal ids mean equal bytes). Whole tree blobs with the same id are skipped
//! without loading them, so comparing two snapshots of a big, mostly unchanged disk reads almost
//! nothing. Files are compared by their chunk lists.

use serde::Serialize;

use crate::crypto::Id;
use crate::index::Index;
use crate::repository::Repository;
use crate::snapshot::{
    blob_to_table, validate_disk_entry, DiskEntry, FileEntry, Snapshot, TABLE_BLOB_ENTRIES,
};
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
    Unchanged,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskDiff {
    pub name: String,
    pub change: Change,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    /// Chunks whose content differs (a size change counts the chunks only one side has).
    pub changed_chunks: u64,
    /// Bytes of those chunks.
    pub changed_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileDiff {
    pub name: String,
    pub change: Change,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotDiff {
    pub old: String,
    pub new: String,
    pub disks: Vec<DiskDiff>,
    pub files: Vec<FileDiff>,
    /// Sum of the disks' changed bytes.
    pub changed_bytes: u64,
}

/// Compare snapshot `old` with snapshot `new` (each as (id, manifest)).
pub fn diff(
    repo: &Repository,
    index: &Index,
    old: (&str, &Snapshot),
    new: (&str, &Snapshot),
) -> Result<SnapshotDiff> {
    let mut disks = Vec::new();
    for d in &old.1.disks {
        match new.1.disks.iter().find(|n| n.name == d.name) {
            Some(n) => disks.push(diff_disk(repo, index, d, n)?),
            None => disks.push(DiskDiff {
                name: d.name.clone(),
                change: Change::Removed,
                old_size: Some(d.virtual_size),
                new_size: None,
                changed_chunks: d.chunk_count(),
                changed_bytes: d.virtual_size,
            }),
        }
    }
    for n in &new.1.disks {
        if !old.1.disks.iter().any(|d| d.name == n.name) {
            disks.push(DiskDiff {
                name: n.name.clone(),
                change: Change::Added,
                old_size: None,
                new_size: Some(n.virtual_size),
                changed_chunks: n.chunk_count(),
                changed_bytes: n.virtual_size,
            });
        }
    }
    let mut files = Vec::new();
    for f in &old.1.files {
        let change = match new.1.files.iter().find(|n| n.name == f.name) {
            Some(n) => file_change(f, n),
            None => Change::Removed,
        };
        files.push(FileDiff {
            name: f.name.clone(),
            change,
            old_size: Some(f.size),
            new_size: new
                .1
                .files
                .iter()
                .find(|n| n.name == f.name)
                .map(|n| n.size),
        });
    }
    for n in &new.1.files {
        if !old.1.files.iter().any(|f| f.name == n.name) {
            files.push(FileDiff {
                name: n.name.clone(),
                change: Change::Added,
                old_size: None,
                new_size: Some(n.size),
            });
        }
    }
    let changed_bytes = disks.iter().map(|d| d.changed_bytes).sum();
    Ok(SnapshotDiff {
        old: old.0.to_string(),
        new: new.0.to_string(),
        disks,
        files,
        changed_bytes,
    })
}

fn file_change(a: &FileEntry, b: &FileEntry) -> Change {
    if a.size == b.size && a.chunks == b.chunks {
        Change::Unchanged
    } else {
        Change::Changed
    }
}

fn load_part(repo: &Repository, index: &Index, disk: &DiskEntry, blob: &Id) -> Result<Vec<Id>> {
    let raw = repo.read_chunk(index, blob)?;
    blob_to_table(
        &raw,
        &format!("chunk table blob {blob} of disk '{}'", disk.name),
    )
}

fn diff_disk(repo: &Repository, index: &Index, a: &DiskEntry, b: &DiskEntry) -> Result<DiskDiff> {
    validate_disk_entry(a)?;
    validate_disk_entry(b)?;
    let mut out = DiskDiff {
        name: a.name.clone(),
        change: Change::Unchanged,
        old_size: Some(a.virtual_size),
        new_size: Some(b.virtual_size),
        changed_chunks: 0,
        changed_bytes: 0,
    };
    if a.chunk_size != b.chunk_size {
        // Different chunkings can't be compared by id; call everything changed.
        out.changed_chunks = b.chunk_count();
        out.changed_bytes = a.virtual_size.max(b.virtual_size);
        out.change = Change::Changed;
        return Ok(out);
    }
    let blobs = a.tables.len().max(b.tables.len());
    for i in 0..blobs {
        let first = (i * TABLE_BLOB_ENTRIES) as u64;
        let (ta, tb) = (a.tables.get(i), b.tables.get(i));
        if ta.is_some() && ta == tb {
            // Same blob id: same ids, same chunks (sizes equal here only if the disks' sizes
            // cover this part equally, which the same entries imply except for the last chunk).
            if a.virtual_size == b.virtual_size
                || (first + TABLE_BLOB_ENTRIES as u64) * u64::from(a.chunk_size)
                    <= a.virtual_size.min(b.virtual_size)
            {
                continue;
            }
        }
        let pa = match ta {
            Some(id) => load_part(repo, index, a, id)?,
            None => Vec::new(),
        };
        let pb = match tb {
            Some(id) => load_part(repo, index, b, id)?,
            None => Vec::new(),
        };
        for j in 0..pa.len().max(pb.len()) {
            let chunk = first + j as u64;
            let ra = a.chunk_range(chunk);
            let rb = b.chunk_range(chunk);
            let differs = pa.get(j) != pb.get(j) || ra.1 != rb.1;
            if differs {
                out.changed_chunks += 1;
                out.changed_bytes += ra.1.max(rb.1);
            }
        }
    }
    if out.changed_chunks > 0 || a.virtual_size != b.virtual_size {
        out.change = Change::Changed;
    }
    Ok(out)
}
