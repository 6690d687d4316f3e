//! Snapshot manifests: one VM at one point in time.
//!
//! A snapshot is a sealed JSON object (`snapshots/<id>`, id = BLAKE3 of the stored bytes) that
//! lists the VM's disks and other files. A disk is described by its geometry and its *chunk
//! table*: chunk `i` covers `[i * chunk_size, min((i + 1) * chunk_size, virtual_size))` and its
//! entry is the chunk's keyed id, or the all-zero id when the chunk reads as zeros (nothing is
//! stored for it). Files (VM configuration and anything else that is not a disk) use the same
//! fixed-size chunking, with their chunk list inline.
//!
//! Tables are not inline: a 1 TiB disk has a million entries (32 MiB), and consecutive snapshots
//! of a VM share almost all of them. So a table is cut into *tree blobs* of [`TABLE_BLOB_ENTRIES`]
//! ids each (128 KiB raw, covering 4 GiB at 1 MiB chunks), stored in packs like data chunks
//! (`BlobKind::Tree`). Unchanged parts of a table then deduplicate across snapshots, and the
//! manifest stays small.
//!
//! Snapshot ids can be abbreviated to a unique hex prefix of at least [`MIN_PREFIX`] digits, and
//! `latest` (optionally of one VM) names the newest snapshot.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::backend::ObjectKind;
use crate::crypto::Id;
use crate::index::Index;
use crate::repository::Repository;
use crate::{Error, Result};

/// Current snapshot manifest version; readers refuse newer ones.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Ids per tree blob of a chunk table.
pub const TABLE_BLOB_ENTRIES: usize = 4096;
/// Shortest accepted abbreviation of a snapshot id: fewer digits would match by accident.
pub const MIN_PREFIX: usize = 4;
/// The id recorded for a chunk that reads as zeros.
pub const ZERO_ID: Id = Id::ZERO;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: u32,
    /// RFC 3339, UTC.
    pub time: String,
    pub vm: String,
    pub hostname: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The snapshot whose tables this one's incremental parts were copied from.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub consistency: Option<String>,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    #[serde(default)]
    pub booted: Option<bool>,
    pub disks: Vec<DiskEntry>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    pub summary: Summary,
    /// Program and version that wrote the snapshot.
    pub program: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskEntry {
    /// File name of the disk (no directories): what restore creates.
    pub name: String,
    /// Where the disk was read from, for people.
    pub source_path: String,
    /// `vhdx`, `vhd` or `raw`.
    pub format: String,
    /// `dynamic`, `fixed` or `differencing` (the chain's view was backed up in the latter case).
    pub subformat: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub block_size: Option<u32>,
    pub chunk_size: u32,
    /// Tree blobs holding the chunk table, in order.
    pub tables: Vec<Id>,
    /// Bytes of the disk in non-zero chunks.
    pub data_bytes: u64,
}

impl DiskEntry {
    /// Number of entries the chunk table must have.
    pub fn chunk_count(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.virtual_size.div_ceil(u64::from(self.chunk_size))
    }

    /// The byte range chunk `i` covers.
    pub fn chunk_range(&self, i: u64) -> (u64, u64) {
        let cs = u64::from(self.chunk_size);
        let start = i.saturating_mul(cs).min(self.virtual_size);
        let end = start.saturating_add(cs).min(self.virtual_size);
        (start, end - start)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub mtime: Option<String>,
    /// Chunk `i` covers `[i * chunk_size, min((i + 1) * chunk_size, size))` with the
    /// repository's chunk size; [`ZERO_ID`] = zeros.
    pub chunks: Vec<Id>,
}

/// What one backup did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// Bytes read from the sources.
    pub bytes_read: u64,
    /// Raw (uncompressed) bytes of chunks that were new to the repository.
    pub bytes_new: u64,
    /// Bytes added to the repository (sealed, compressed blobs).
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub zero_chunks: u64,
    pub duration_ms: u64,
}

/// The current time in the manifest's format (RFC 3339, UTC, microseconds, `Z`). Always the same
/// width, so manifest times compare correctly even as strings.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Parse a manifest time; `None` if it is not RFC 3339.
pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Load one snapshot manifest by its full id, refusing versions we don't understand.
pub fn load_snapshot(repo: &Repository, id: &str) -> Result<Snapshot> {
    let snap: Snapshot = repo.load_json(ObjectKind::Snapshot, id)?;
    if snap.version > SNAPSHOT_VERSION {
        return Err(Error::Incompatible(format!(
            "snapshot {id} was written by a newer hyperkeep (snapshot version {}); upgrade hyperkeep",
            snap.version
        )));
    }
    Ok(snap)
}

/// Every snapshot in the repository, oldest first (ties broken by id).
///
/// A snapshot object that is damaged, or that vanished between listing and reading (a concurrent
/// `forget`), is skipped with a warning rather than failing the whole listing: one bad manifest
/// must not hide all the good ones. `check` reports damaged manifests.
pub fn list_snapshots(repo: &Repository) -> Result<Vec<(String, Snapshot)>> {
    let mut out = Vec::new();
    for info in repo.backend().list(ObjectKind::Snapshot)? {
        match load_snapshot(repo, &info.name) {
            Ok(s) => out.push((info.name, s)),
            Err(e @ (Error::Corrupt { .. } | Error::Missing(_) | Error::Incompatible(_))) => {
                tracing::warn!("skipping snapshot {}: {e}", info.name);
            }
            Err(e) => return Err(e),
        }
    }
    sort_by_time(&mut out);
    Ok(out)
}

/// Sort oldest first by parsed time (string order as a fallback), then by id.
pub fn sort_by_time(snaps: &mut [(String, Snapshot)]) {
    snaps.sort_by(|a, b| {
        let ta = parse_time(&a.1.time);
        let tb = parse_time(&b.1.time);
        match (ta, tb) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => a.1.time.cmp(&b.1.time),
        }
        .then_with(|| a.0.cmp(&b.0))
    });
}

/// Resolve a snapshot spec: a full id, a unique hex prefix of at least [`MIN_PREFIX`] digits, or
/// `latest` (the newest snapshot, of VM `vm` if given). With an id or prefix, `vm` (if given)
/// must match the snapshot's VM.
pub fn find_snapshot(
    repo: &Repository,
    spec: &str,
    vm: Option<&str>,
) -> Result<(String, Snapshot)> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("latest") {
        let snaps = list_snapshots(repo)?;
        return snaps
            .into_iter()
            .rev()
            .find(|(_, s)| vm.is_none_or(|v| s.vm == v))
            .ok_or_else(|| match vm {
                Some(v) => Error::NotFound(format!(
                    "no snapshot of VM '{v}' in the repository (`hyperkeep snapshots` lists them)"
                )),
                None => Error::NotFound(
                    "the repository has no snapshots yet (create one with `hyperkeep backup`)"
                        .into(),
                ),
            });
    }
    if spec.len() < MIN_PREFIX || spec.len() > 64 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(format!(
            "'{spec}' is not a snapshot id: give 'latest', a full id, or at least {MIN_PREFIX} \
             hex digits of one (`hyperkeep snapshots` lists them)"
        )));
    }
    let prefix = spec.to_ascii_lowercase();
    let mut matches: Vec<String> = repo
        .backend()
        .list(ObjectKind::Snapshot)?
        .into_iter()
        .map(|i| i.name)
        .filter(|n| n.starts_with(&prefix))
        .collect();
    matches.sort();
    matches.dedup();
    match matches.len() {
        0 => Err(Error::NotFound(format!(
            "no snapshot with id {prefix}… in the repository (`hyperkeep snapshots` lists them)"
        ))),
        1 => {
            let id = matches.pop().unwrap_or_default();
            let snap = load_snapshot(repo, &id)?;
            if let Some(v) = vm {
                if snap.vm != v {
                    return Err(Error::NotFound(format!(
                        "snapshot {} belongs to VM '{}', not '{v}'",
                        short_id(&id),
                        snap.vm
                    )));
                }
            }
            Ok((id, snap))
        }
        n => {
            let shown: Vec<String> = matches.iter().take(5).map(|m| short_id(m)).collect();
            Err(Error::InvalidArgument(format!(
                "snapshot id {prefix}… is ambiguous: {n} snapshots match ({}{}); give more digits",
                shown.join(", "),
                if n > 5 { ", …" } else { "" }
            )))
        }
    }
}

/// The conventional abbreviation of an id for display (8 hex digits).
pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Cut a chunk table into tree blob payloads of [`TABLE_BLOB_ENTRIES`] ids (the last may be
/// shorter; an empty table has no blobs).
pub fn table_to_blobs(table: &[Id]) -> Vec<Vec<u8>> {
    table
        .chunks(TABLE_BLOB_ENTRIES)
        .map(|part| {
            let mut raw = Vec::with_capacity(part.len() * 32);
            for id in part {
                raw.extend_from_slice(&id.0);
            }
            raw
        })
        .collect()
}

/// Decode one tree blob payload into ids. `object` names the blob in errors.
pub fn blob_to_table(raw: &[u8], object: &str) -> Result<Vec<Id>> {
    if raw.is_empty() || !raw.len().is_multiple_of(32) || raw.len() > TABLE_BLOB_ENTRIES * 32 {
        return Err(Error::corrupt(
            object,
            format!(
                "a chunk table blob must hold 1 to {TABLE_BLOB_ENTRIES} ids of 32 bytes, this one \
                 has {} bytes",
                raw.len()
            ),
        ));
    }
    Ok(raw
        .chunks_exact(32)
        .map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            Id(id)
        })
        .collect())
}

/// Check a disk entry's numbers before trusting them for allocation: the table must fit the
/// tree blobs it claims (bounded memory whatever the manifest says).
pub fn validate_disk_entry(disk: &DiskEntry) -> Result<()> {
    let object = format!("snapshot disk entry '{}'", disk.name);
    if disk.chunk_size == 0 || !disk.chunk_size.is_power_of_two() {
        return Err(Error::corrupt(
            object,
            format!("chunk size {} is not a power of two", disk.chunk_size),
        ));
    }
    let expected_blobs = disk.chunk_count().div_ceil(TABLE_BLOB_ENTRIES as u64);
    if expected_blobs != disk.tables.len() as u64 {
        return Err(Error::corrupt(
            object,
            format!(
                "a disk of {} bytes in chunks of {} needs {expected_blobs} table blobs, the \
                 manifest lists {}",
                disk.virtual_size,
                disk.chunk_size,
                disk.tables.len()
            ),
        ));
    }
    if disk.name.is_empty()
        || disk.name.contains(['/', '\\'])
        || disk.name == "."
        || disk.name == ".."
    {
        return Err(Error::corrupt(
            object,
            "the disk name must be a plain file name",
        ));
    }
    Ok(())
}

/// Load a disk's whole chunk table (one entry per chunk), checking that every tree blob has the
/// expected number of entries.
pub fn load_table(repo: &Repository, index: &Index, disk: &DiskEntry) -> Result<Vec<Id>> {
    validate_disk_entry(disk)?;
    let count = disk.chunk_count();
    let mut table = Vec::with_capacity(count as usize);
    let covers = u64::from(disk.chunk_size) * TABLE_BLOB_ENTRIES as u64;
    for (i, blob_id) in disk.tables.iter().enumerate() {
        let lost = || {
            let start = (i as u64).saturating_mul(covers).min(disk.virtual_size);
            let end = start.saturating_add(covers).min(disk.virtual_size);
            format!(
                "chunk table blob {blob_id} of disk '{}' (offsets {start} to {end}) is lost",
                disk.name
            )
        };
        let raw = repo.read_chunk(index, blob_id).map_err(|e| match e {
            Error::Corrupt { object, detail } => Error::Corrupt {
                object,
                detail: format!("{detail}; {}", lost()),
            },
            Error::Missing(object) => Error::Missing(format!("{object}; {}", lost())),
            other => other,
        })?;
        let object = format!("chunk table blob {blob_id} of disk '{}'", disk.name);
        let part = blob_to_table(&raw, &object)?;
        let want = (count - (i * TABLE_BLOB_ENTRIES) as u64).min(TABLE_BLOB_ENTRIES as u64);
        if part.len() as u64 != want {
            return Err(Error::corrupt(
                object,
                format!("holds {} ids where {want} were expected", part.len()),
            ));
        }
        table.extend(part);
    }
    Ok(table)
}

/// Every blob a snapshot needs: its table blobs, the data chunks in those tables, and its files'
/// chunks (zero ids excluded). What prune keeps and check verifies.
pub fn referenced_blobs(repo: &Repository, index: &Index, snap: &Snapshot) -> Result<HashSet<Id>> {
    let mut used = HashSet::new();
    for disk in &snap.disks {
        used.extend(disk.tables.iter().copied());
        for id in load_table(repo, index, disk)? {
            if id != ZERO_ID {
                used.insert(id);
            }
        }
    }
    for f in &snap.files {
        used.extend(f.chunks.iter().copied().filter(|id| *id != ZERO_ID));
    }
    Ok(used)
}

/// This machine's name, for manifests.
pub fn hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Id {
        Id([b; 32])
    }

    #[test]
    fn table_blobs_round_trip_and_split_at_4096() {
        let table: Vec<Id> = (0..(TABLE_BLOB_ENTRIES + 3)).map(|i| id(i as u8)).collect();
        let blobs = table_to_blobs(&table);
        assert_eq!(blobs.len(), 2);
        assert_eq!(blobs[0].len(), TABLE_BLOB_ENTRIES * 32);
        assert_eq!(blobs[1].len(), 3 * 32);
        let mut back = blob_to_table(&blobs[0], "a").unwrap();
        back.extend(blob_to_table(&blobs[1], "b").unwrap());
        assert_eq!(back, table);
        assert!(table_to_blobs(&[]).is_empty());
    }

    #[test]
    fn bad_table_blobs_are_refused() {
        assert!(blob_to_table(&[], "x").is_err());
        assert!(blob_to_table(&[0u8; 33], "x").is_err());
        assert!(blob_to_table(&vec![0u8; (TABLE_BLOB_ENTRIES + 1) * 32], "x").is_err());
    }

    fn disk(size: u64, chunk: u32, tables: usize) -> DiskEntry {
        DiskEntry {
            name: "d.vhdx".into(),
            source_path: "/x/d.vhdx".into(),
            format: "vhdx".into(),
            subformat: "dynamic".into(),
            virtual_size: size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: Some(1 << 25),
            chunk_size: chunk,
            tables: vec![ZERO_ID; tables],
            data_bytes: 0,
        }
    }

    #[test]
    fn disk_entries_are_validated() {
        let d = disk((1 << 20) * 4096 + 1, 1 << 20, 2);
        assert_eq!(d.chunk_count(), 4097);
        assert_eq!(d.chunk_range(4096), ((1 << 20) * 4096, 1));
        validate_disk_entry(&d).unwrap();
        assert!(validate_disk_entry(&disk(1 << 40, 1 << 20, 1)).is_err());
        assert!(validate_disk_entry(&disk(1 << 20, 0, 0)).is_err());
        let mut bad = disk(1 << 20, 1 << 20, 1);
        bad.name = "../evil".into();
        assert!(validate_disk_entry(&bad).is_err());
    }

    #[test]
    fn times_are_fixed_width_and_sort() {
        let t = now_rfc3339();
        assert!(t.ends_with('Z'), "{t}");
        assert!(parse_time(&t).is_some());
        let mk = |time: &str| Snapshot {
            version: 1,
            time: time.into(),
            vm: "vm".into(),
            hostname: "h".into(),
            tags: BTreeMap::new(),
            parent: None,
            mode: None,
            consistency: None,
            downtime_ms: None,
            booted: None,
            disks: vec![],
            files: vec![],
            summary: Summary::default(),
            program: "t".into(),
        };
        let mut v = vec![
            ("b".to_string(), mk("2026-01-01T00:00:05Z")),
            ("a".to_string(), mk("2026-01-01T00:00:05.100Z")),
            ("c".to_string(), mk("2025-12-31T23:00:00+00:00")),
        ];
        sort_by_time(&mut v);
        let order: Vec<&str> = v.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(order, ["c", "b", "a"]);
    }
}
