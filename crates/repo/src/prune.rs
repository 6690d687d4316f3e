//! `prune`: free the space of data no snapshot references any more.
//!
//! # What it does
//! 1. Takes the exclusive lock (no backup, check or other prune runs meanwhile; a backup that
//!    starts later fails to get its shared lock and says so).
//! 2. Loads every snapshot and every index file. If any snapshot or index cannot be read, or a
//!    referenced blob is not in the index, prune refuses: deciding "unused" from incomplete
//!    information would delete data a snapshot still needs.
//! 3. The *used set*: every blob a snapshot references (chunk-table tree blobs, the data chunks
//!    those tables list, file chunks). Each used blob gets one *canonical copy* (when a blob
//!    sits in several packs, the copy in the pack that is otherwise most used).
//! 4. Classifies packs by the bytes of canonical copies they hold: none -> delete; less than
//!    the threshold (80% of the pack's blob bytes by default) -> repack; else keep.
//! 5. Repacks: copies the sealed bytes of canonical blobs verbatim into new packs (no
//!    decryption needed: a blob's sealed bytes and its [`BlobEntry`] fields other than the
//!    offset stay valid in any pack). Before copying, the old pack's content must hash to its
//!    name, so damage is never copied forward silently.
//! 6. Writes the new index (every blob of kept and new packs), split into files of bounded
//!    size; only the last file written carries `supersedes` (all old index files).
//! 7. Deletes the old index files, then the unused and repacked packs, then orphan packs
//!    (stored, but in no index) whose age exceeds the grace period (1 hour by default).
//!
//! # Crash safety (killing prune at any instant leaves every snapshot restorable)
//! Invariant: every blob a snapshot needs is listed by some index file that readers honour,
//! pointing into a pack that exists. Snapshots are never touched by prune.
//! - During 1-5 nothing is deleted or superseded. New packs written by step 5 are orphans (in
//!   no index): harmless, and a later prune deletes them once older than the grace.
//! - During 6, new index files appear. Until the last one (the only one with `supersedes`) is
//!   stored, readers honour all old index files, which still point at packs that all exist.
//!   Once it is stored, the new files together list every needed blob, each in a kept pack or
//!   in a new pack that was fully stored (puts are atomic and durable) before any index was
//!   written. Readers that do not honour `supersedes` see duplicates, which are allowed.
//! - During 7a (deleting old index files) the new index alone is complete, so any subset of the
//!   old files may remain: their extra entries point at packs not yet deleted.
//! - During 7b/7c only packs that the new index does not list are deleted. Every old index that
//!   listed them is already gone (7a finished), so nothing refers to them; a pack whose delete
//!   did not happen is an orphan for the next prune.
//! - A stale exclusive lock left by a killed prune is recognised (dead pid on this host, or
//!   older than the staleness limit) and removed by the next locker or `hyperkeep unlock`.
//!
//! # Why the grace period, with locks already in place
//! Orphan packs are normally leftovers of killed backups or prunes. But a backup on another
//! host whose lock went stale (suspended machine, clock trouble) may still be uploading packs
//! whose index is not written yet; deleting young orphans would then lose its data. Packs are
//! only deleted as orphans when their stored time is older than the grace; a backend that cannot
//! tell an object's age never gets its orphans deleted (they are reported).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::{ObjectInfo, ObjectKind};
use crate::backup::{NoProgress, Progress};
use crate::crypto::{self, Id};
use crate::index::{Index, IndexFile, IndexPack};
use crate::pack::{BlobEntry, PackWriter};
use crate::repository::Repository;
use crate::snapshot::{self, Snapshot};
use crate::{Error, Result};

/// Most blobs per new index file (about 10 MB of JSON), so huge repositories never produce one
/// giant object.
const MAX_BLOBS_PER_INDEX_FILE: usize = 50_000;

#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Report what would happen, change nothing.
    pub dry_run: bool,
    /// Packs whose used bytes are below this fraction of their size are repacked (0.0 = never
    /// repack, only delete wholly unused packs; 1.0 = repack every pack with any waste).
    pub repack_threshold: f64,
    /// Orphan packs (in no index) younger than this are left alone.
    pub orphan_grace: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            dry_run: false,
            repack_threshold: 0.8,
            orphan_grace: Duration::from_secs(3600),
        }
    }
}

/// What prune found and did (or would do, with `dry_run`). Byte counts are stored bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: u64,
    /// Distinct blobs the snapshots reference.
    pub used_blobs: u64,
    pub packs_before: u64,
    pub bytes_before: u64,
    /// Packs with no used blob, deleted.
    pub packs_unused: u64,
    /// Packs with some waste, whose used blobs were copied into new packs and then deleted.
    pub packs_repacked: u64,
    pub packs_kept: u64,
    /// New packs written by repacking (with `dry_run`: an estimate).
    pub packs_written: u64,
    pub bytes_written: u64,
    /// Packs in no index, older than the grace, deleted.
    pub orphans_deleted: u64,
    /// Packs in no index kept because they are younger than the grace (or of unknown age).
    pub orphans_kept: u64,
    /// Indexed packs that do not exist (nothing needed was in them; dropped from the index).
    pub packs_missing: u64,
    pub index_files_deleted: u64,
    pub index_files_written: u64,
    /// Blobs no longer stored anywhere.
    pub blobs_removed: u64,
    /// Stored bytes deleted (unused, repacked and orphan packs).
    pub bytes_deleted: u64,
    pub packs_after: u64,
    pub bytes_after: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Keep,
    Repack,
    Delete,
}

/// Run prune. See the module documentation for the steps and their crash safety.
pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    prune_with_progress(repo, opts, &NoProgress)
}

/// [`prune`], reporting the bytes of packs read for repacking to `progress`.
pub fn prune_with_progress(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    // A dry run changes nothing, so a shared lock suffices (it may run beside backups; their
    // packs then show up as young orphans).
    let _lock = crate::lock::acquire(repo, !opts.dry_run, "prune")?;
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let now = SystemTime::now();

    // Everything as stored, listed once: under the exclusive lock nothing else changes it.
    let stored: HashMap<Id, ObjectInfo> = repo
        .backend()
        .list(ObjectKind::Pack)?
        .into_iter()
        .filter_map(|i| Id::from_hex(&i.name).ok().map(|id| (id, i)))
        .collect();
    report.packs_before = stored.len() as u64;
    report.bytes_before = stored.values().map(|i| i.size).sum();

    let (index_names, index) = load_all_indexes(repo)?;
    let snaps = load_all_snapshots(repo)?;
    report.snapshots = snaps.len() as u64;

    // The used set.
    let mut used: HashSet<Id> = HashSet::new();
    for (sid, snap) in &snaps {
        let refs = snapshot::referenced_blobs(repo, &index, snap).map_err(|e| {
            refuse(format!(
                "the chunk tables of snapshot {sid} cannot be read ({e}), so prune cannot tell \
                 which data it needs"
            ))
        })?;
        if let Some(missing) = refs.iter().find(|id| !index.contains(id)) {
            return Err(refuse(format!(
                "snapshot {sid} references blob {missing}, which no index lists: the repository \
                 is damaged or an index file is missing"
            )));
        }
        used.extend(refs);
    }
    report.used_blobs = used.len() as u64;

    // Packs as the index describes them; drop those that do not exist, unless they hold the
    // only copy of a used blob (then the repository is damaged and prune refuses).
    let mut by_pack: HashMap<Id, Vec<BlobEntry>> = index.blobs_by_pack();
    let missing: Vec<Id> = by_pack
        .keys()
        .filter(|p| !stored.contains_key(p))
        .copied()
        .collect();
    for p in &missing {
        by_pack.remove(p);
    }
    report.packs_missing = missing.len() as u64;
    if !missing.is_empty() {
        let present: HashSet<Id> = by_pack.values().flatten().map(|e| e.id).collect();
        if let Some(lost) = used.iter().find(|id| !present.contains(id)) {
            return Err(refuse(format!(
                "used blob {lost} is only in packs that are missing ({} missing pack(s), e.g. \
                 {}); run `hyperkeep check` to see which snapshots are affected",
                missing.len(),
                missing[0]
            )));
        }
    }

    // Canonical copies: rank packs by how many used blobs they hold, give each used blob to the
    // best-ranked pack holding it, so duplicates end up in packs that are kept anyway.
    let mut ranked: Vec<(Id, usize)> = by_pack
        .iter()
        .map(|(p, blobs)| (*p, blobs.iter().filter(|b| used.contains(&b.id)).count()))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut assigned: HashSet<Id> = HashSet::new();
    // pack -> its canonical blobs
    let mut canonical: HashMap<Id, Vec<BlobEntry>> = HashMap::new();
    for (p, _) in &ranked {
        for b in &by_pack[p] {
            if used.contains(&b.id) && assigned.insert(b.id) {
                canonical.entry(*p).or_default().push(*b);
            }
        }
    }

    // Above 1.0 every pack would be repacked on every run; NaN repacks nothing.
    let threshold = opts.repack_threshold.clamp(0.0, 1.0);
    let mut fates: Vec<(Id, Fate)> = Vec::new();
    for (p, _) in &ranked {
        // Waste is measured against the blob bytes, not the file size: the trailer is overhead
        // every pack has, and counting it would repack small, fully used packs on every run.
        let size: u64 = by_pack[p]
            .iter()
            .map(|b| u64::from(b.stored_len))
            .sum::<u64>()
            .max(1);
        let used_bytes: u64 = canonical
            .get(p)
            .map_or(0, |v| v.iter().map(|b| u64::from(b.stored_len)).sum());
        let fate = if used_bytes == 0 {
            Fate::Delete
        } else if (used_bytes as f64) < threshold * size as f64 {
            Fate::Repack
        } else {
            Fate::Keep
        };
        fates.push((*p, fate));
    }
    report.packs_unused = fates.iter().filter(|f| f.1 == Fate::Delete).count() as u64;
    report.packs_repacked = fates.iter().filter(|f| f.1 == Fate::Repack).count() as u64;
    report.packs_kept = fates.iter().filter(|f| f.1 == Fate::Keep).count() as u64;

    // Orphans: stored packs no index lists.
    let mut orphans_old: Vec<Id> = Vec::new();
    for (p, info) in &stored {
        if by_pack.contains_key(p) || index.has_pack(p) {
            continue;
        }
        let old_enough = info
            .modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= opts.orphan_grace);
        if old_enough {
            orphans_old.push(*p);
        } else {
            report.orphans_kept += 1;
        }
    }
    orphans_old.sort();
    report.orphans_deleted = orphans_old.len() as u64;

    // Blobs removed: blobs of deleted/repacked packs that survive in no kept or new pack.
    let mut surviving: HashSet<Id> = assigned.clone();
    for (p, f) in &fates {
        if *f == Fate::Keep {
            surviving.extend(by_pack[p].iter().map(|b| b.id));
        }
    }
    let mut gone: HashSet<Id> = HashSet::new();
    for (p, f) in &fates {
        if *f != Fate::Keep {
            gone.extend(
                by_pack[p]
                    .iter()
                    .map(|b| b.id)
                    .filter(|id| !surviving.contains(id)),
            );
        }
    }
    report.blobs_removed = gone.len() as u64;

    let to_delete: Vec<Id> = fates
        .iter()
        .filter(|(_, f)| *f != Fate::Keep)
        .map(|(p, _)| *p)
        .collect();
    report.bytes_deleted = to_delete
        .iter()
        .chain(&orphans_old)
        .map(|p| stored[p].size)
        .sum();

    let repack: Vec<Id> = fates
        .iter()
        .filter(|(_, f)| *f == Fate::Repack)
        .map(|(p, _)| *p)
        .collect();

    if opts.dry_run {
        let (packs, bytes) = estimate_repack(repo, &repack, &canonical);
        report.packs_written = packs;
        report.bytes_written = bytes;
        let written_index = usize::from(!to_delete.is_empty() || !missing.is_empty());
        report.index_files_written = written_index as u64;
        report.index_files_deleted = if written_index > 0 {
            index_names.len() as u64
        } else {
            0
        };
        finish_counts(&mut report);
        return Ok(report);
    }

    // Step 5: repack.
    let mut new_packs: Vec<IndexPack> = Vec::new();
    let mut writer = PackWriter::new(repo.config().pack_size);
    progress.start(repack.iter().map(|p| stored[p].size).sum());
    for p in &repack {
        let name = p.to_hex();
        // Bounded memory: packs end just past the configured size; anything far larger is not
        // a pack we wrote, and is not read whole.
        let cap = repo
            .config()
            .pack_size
            .saturating_mul(2)
            .saturating_add(64 << 20);
        if stored[p].size > cap {
            return Err(refuse(format!(
                "pack {name} is {} bytes, far larger than any pack hyperkeep writes; run \
                 `hyperkeep check --read-data`",
                stored[p].size
            )));
        }
        let bytes = repo.backend().get(ObjectKind::Pack, &name)?;
        progress.advance(bytes.len() as u64);
        if crypto::hash(&bytes) != *p {
            return Err(refuse(format!(
                "pack {name} is damaged (its content does not match its name), so its blobs \
                 cannot be copied safely; run `hyperkeep check --read-data` to see which \
                 snapshots are affected, forget those, and prune again"
            )));
        }
        for b in canonical.get(p).into_iter().flatten() {
            let start = b.offset as usize;
            let end = start + b.stored_len as usize;
            let sealed = bytes.get(start..end).ok_or_else(|| {
                Error::corrupt(
                    ObjectKind::Pack.key(&name),
                    format!("blob {} extends past the end of the pack", b.id),
                )
            })?;
            writer.add_slice(*b, sealed);
            if writer.is_full() {
                let full = std::mem::replace(&mut writer, PackWriter::new(repo.config().pack_size));
                new_packs.push(store_pack(repo, full, &mut report)?);
            }
        }
    }
    if !writer.is_empty() {
        new_packs.push(store_pack(repo, writer, &mut report)?);
    }
    progress.finish();

    // Step 6: the new index, only if anything changes.
    if to_delete.is_empty() && missing.is_empty() && new_packs.is_empty() {
        report.index_files_written = 0;
    } else {
        let mut packs: Vec<IndexPack> = fates
            .iter()
            .filter(|(_, f)| *f == Fate::Keep)
            .map(|(p, _)| IndexPack {
                id: *p,
                blobs: by_pack[p].clone(),
            })
            .collect();
        packs.sort_by_key(|p| p.id);
        packs.extend(new_packs);
        let supersedes: Vec<Id> = index_names
            .iter()
            .filter_map(|n| Id::from_hex(n).ok())
            .collect();
        let files = split_index(packs, supersedes);
        for f in &files {
            repo.save_json(ObjectKind::Index, f)?;
            report.index_files_written += 1;
        }
        // Step 7a: old index files.
        for n in &index_names {
            repo.backend().delete(ObjectKind::Index, n)?;
            report.index_files_deleted += 1;
        }
    }

    // Step 7b, 7c: unused and repacked packs, then old orphans.
    for p in to_delete.iter().chain(&orphans_old) {
        repo.backend().delete(ObjectKind::Pack, &p.to_hex())?;
    }
    finish_counts(&mut report);
    Ok(report)
}

fn finish_counts(r: &mut PruneReport) {
    r.packs_after = (r.packs_before + r.packs_written)
        .saturating_sub(r.packs_unused + r.packs_repacked + r.orphans_deleted);
    r.bytes_after = (r.bytes_before + r.bytes_written).saturating_sub(r.bytes_deleted);
}

fn refuse(why: String) -> Error {
    Error::InvalidArgument(format!("prune refused, nothing was deleted: {why}"))
}

fn store_pack(repo: &Repository, w: PackWriter, report: &mut PruneReport) -> Result<IndexPack> {
    let (id, size, blobs) = repo.save_pack(w)?;
    report.packs_written += 1;
    report.bytes_written += size;
    Ok(IndexPack { id, blobs })
}

/// Packs and bytes repacking would write (same packing rule as the real run).
fn estimate_repack(
    repo: &Repository,
    repack: &[Id],
    canonical: &HashMap<Id, Vec<BlobEntry>>,
) -> (u64, u64) {
    let target = repo.config().pack_size;
    let (mut packs, mut bytes) = (0u64, 0u64);
    let (mut cur, mut count) = (0u64, 0usize);
    let mut close = |cur: &mut u64, count: &mut usize| {
        if *count > 0 {
            packs += 1;
            bytes += *cur + trailer_bytes(*count);
        }
        *cur = 0;
        *count = 0;
    };
    for p in repack {
        for b in canonical.get(p).into_iter().flatten() {
            cur += u64::from(b.stored_len);
            count += 1;
            if cur >= target {
                close(&mut cur, &mut count);
            }
        }
    }
    close(&mut cur, &mut count);
    (packs, bytes)
}

/// Sealed trailer + footer bytes of a pack of `count` blobs.
fn trailer_bytes(count: usize) -> u64 {
    (crypto::SEAL_OVERHEAD + 4 + count * crate::pack::TRAILER_ENTRY_LEN) as u64
        + crate::pack::PACK_FOOTER_LEN
}

/// Split the new index into files of at most [`MAX_BLOBS_PER_INDEX_FILE`] blobs (a pack is never
/// split). Only the last file carries `supersedes`, so readers that honour it ignore the old
/// files only once the whole new index is stored.
fn split_index(packs: Vec<IndexPack>, supersedes: Vec<Id>) -> Vec<IndexFile> {
    let mut files: Vec<IndexFile> = Vec::new();
    let mut cur = IndexFile::default();
    let mut blobs = 0;
    for p in packs {
        if blobs > 0 && blobs + p.blobs.len() > MAX_BLOBS_PER_INDEX_FILE {
            files.push(std::mem::take(&mut cur));
            blobs = 0;
        }
        blobs += p.blobs.len();
        cur.packs.push(p);
    }
    files.push(cur);
    if let Some(last) = files.last_mut() {
        last.supersedes = supersedes;
    }
    files
}

/// Every index file, by name, and their union. Any unreadable one makes prune refuse: its packs
/// would look like orphans and could be deleted with data still in use.
fn load_all_indexes(repo: &Repository) -> Result<(Vec<String>, Index)> {
    let mut names = Vec::new();
    let mut index = Index::new();
    for info in repo.backend().list(ObjectKind::Index)? {
        let file: IndexFile = repo.load_json(ObjectKind::Index, &info.name).map_err(|e| {
            refuse(format!(
                "index file {} cannot be read ({e}); the packs it lists would look unused. Run \
                 `hyperkeep check`",
                info.name
            ))
        })?;
        for p in &file.packs {
            index.insert_pack(p.id, &p.blobs);
        }
        names.push(info.name);
    }
    index.finalize();
    names.sort();
    Ok((names, index))
}

/// Every snapshot. Any unreadable one makes prune refuse (its data would look unused).
fn load_all_snapshots(repo: &Repository) -> Result<Vec<(String, Snapshot)>> {
    let mut out = Vec::new();
    for info in repo.backend().list(ObjectKind::Snapshot)? {
        match snapshot::load_snapshot(repo, &info.name) {
            Ok(s) => out.push((info.name, s)),
            Err(Error::Missing(_)) => {}
            Err(e) => {
                return Err(refuse(format!(
                    "snapshot {} cannot be read ({e}), and the data it references would look \
                     unused. Run `hyperkeep check`; if the snapshot is lost, remove it with \
                     `hyperkeep forget {}`",
                    info.name, info.name
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::BlobKind;

    fn pack_with(n: usize) -> IndexPack {
        IndexPack {
            id: Id([n as u8; 32]),
            blobs: (0..n)
                .map(|i| BlobEntry {
                    id: Id([i as u8; 32]),
                    kind: BlobKind::Data,
                    compressed: false,
                    offset: i as u64 * 100,
                    stored_len: 100,
                    raw_len: 60,
                })
                .collect(),
        }
    }

    #[test]
    fn index_split_keeps_packs_whole_and_supersedes_last() {
        let packs = vec![pack_with(30_000), pack_with(30_000), pack_with(10)];
        let files = split_index(packs, vec![Id([9; 32])]);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].packs.len(), 1);
        assert!(files[0].supersedes.is_empty());
        assert_eq!(files[1].packs.len(), 2);
        assert_eq!(files[1].supersedes, vec![Id([9; 32])]);
        // Empty input still yields one (empty) file carrying supersedes.
        let files = split_index(vec![], vec![Id([1; 32])]);
        assert_eq!(files.len(), 1);
        assert!(files[0].packs.is_empty());
    }
}
