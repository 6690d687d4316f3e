//! `check`: is every snapshot restorable, and if not, what exactly is lost?
//!
//! # What is checked
//! Structure (always, reads only small objects and chunk tables):
//! - every key slot parses; every index file opens (hash of its bytes = its name, authenticated,
//!   valid JSON) and its entries are plausible (blobs inside the pack, not overlapping);
//! - every pack an index lists exists with exactly the size the index implies (blobs + trailer);
//!   index files that list the same pack agree about it;
//! - every snapshot manifest opens, its disk entries are sane, its chunk tables (tree blobs) load,
//!   and every chunk it references (tables, disk chunks, file chunks) is in the index.
//!
//! With `--read-data` (or a subset), per selected pack: the content hashes to the pack's name
//! (this alone proves the pack is intact, without the key), the trailer opens and lists exactly
//! the blobs the index lists, and every blob opens, decompresses to its recorded length and has
//! the keyed hash its id claims.
//!
//! Packs that no index mentions are not errors: an interrupted backup or prune leaves them, and
//! nothing refers to them. They are reported as warnings; `prune` removes them after its grace.
//!
//! # Subsets
//! `--read-data-subset N%` reads the packs whose *hashed name* falls in a window of N% of the hash
//! space. Selection is deterministic (same repository, same seed, same packs) and independent of
//! listing order. The window starts at `seed × N%` (wrapping), so seeds 0, 1, 2, … read disjoint
//! sets that together cover every pack after ⌈100 / N⌉ runs; a scheduler can pass the day number
//! as the seed to rotate through the repository. `n/t` (restic's form) reads group n of t.
//!
//! # Repair
//! Index files are a cache of the pack trailers. When one is lost or damaged, check says so and
//! tells "data present, index incomplete" (the needed blobs sit in packs no index lists) from
//! "data lost"; [`repair_index`] then rebuilds the index from the trailers.
//!
//! # Reporting
//! Every [`Problem`] names the object (`pack <id>`, `index <id>`, `snapshot <id>`, `key <id>`)
//! and, where data is damaged or missing, lists the snapshots and the disks/files inside them
//! that can no longer be restored completely. Damaged objects never make `check` stop or panic;
//! only failing to list the repository at all is an `Err`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::backend::{ObjectInfo, ObjectKind};
use crate::backup::{NoProgress, Progress};
use crate::crypto::{self, Id, KeySlot};
use crate::index::{Index, IndexFile};
use crate::pack::{self, BlobEntry};
use crate::repository::Repository;
use crate::snapshot::{self, Snapshot};
use crate::{Error, Result};

/// How much pack data to read and verify.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum ReadData {
    /// Structure only.
    #[default]
    None,
    /// Every pack.
    All,
    /// Packs whose hashed name falls in the window `[seed × percent, (seed + 1) × percent)`
    /// (in percent of the hash space, wrapping).
    Subset { percent: f64, seed: u64 },
}

impl ReadData {
    /// Parse a `--read-data-subset` argument: `N%` (with `seed`), or `n/t` (group n of t,
    /// 1-based, as restic), which is `100/t %` with seed `n - 1`.
    pub fn parse_subset(text: &str, seed: u64) -> Result<ReadData> {
        let bad = || {
            Error::InvalidArgument(format!(
                "invalid --read-data-subset {text:?}: give a percentage like 10% (0 < N <= 100) or \
                 a group like 2/5"
            ))
        };
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let percent: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(percent > 0.0 && percent <= 100.0) {
                return Err(bad());
            }
            return Ok(ReadData::Subset { percent, seed });
        }
        if let Some((n, total)) = t.split_once('/') {
            let n: u64 = n.trim().parse().map_err(|_| bad())?;
            let total: u64 = total.trim().parse().map_err(|_| bad())?;
            if total == 0 || n == 0 || n > total {
                return Err(bad());
            }
            return Ok(ReadData::Subset {
                percent: 100.0 / total as f64,
                seed: n - 1,
            });
        }
        Err(bad())
    }

    /// Whether the pack named `name` is read.
    pub fn selects(&self, name: &str) -> bool {
        match *self {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Subset { percent, seed } => {
                if percent >= 100.0 {
                    return true;
                }
                // Pack names are already hashes, but hashing the name again keeps the selection
                // uniform even for foreign names and independent of how packs were named.
                let h = crypto::hash(name.as_bytes());
                let mut b = [0u8; 8];
                b.copy_from_slice(&h.0[..8]);
                let position = u64::from_be_bytes(b);
                // Integer windows, so consecutive seeds tile the hash space exactly.
                let width = (percent / 100.0 * 18_446_744_073_709_551_616.0) as u64;
                let start = (u128::from(seed) * u128::from(width)) as u64;
                position.wrapping_sub(start) < width
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    pub read_data: ReadData,
}

/// A snapshot part that cannot be restored completely.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affected {
    pub snapshot: String,
    pub vm: String,
    pub time: String,
    /// Disk or file name inside the snapshot (empty when the manifest itself is lost).
    pub item: String,
    /// Chunks of that disk/file that are lost (tree blobs count as the whole table).
    pub chunks: u64,
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `pack <id>`, `index <id>`, `snapshot <id>`, `key <id>`, `config`.
    pub object: String,
    pub detail: String,
    /// Snapshots and their disks/files that this problem makes unrestorable.
    pub affected: Vec<Affected>,
    /// Blobs this problem makes unreadable (internal, for computing `affected`).
    #[serde(skip)]
    lost: Vec<Id>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.detail)?;
        for a in &self.affected {
            if a.item.is_empty() {
                write!(
                    f,
                    "\n  affects snapshot {} ({} {})",
                    snapshot::short_id(&a.snapshot),
                    a.vm,
                    a.time
                )?;
            } else {
                write!(
                    f,
                    "\n  affects snapshot {} ({} {}): {} ({} chunk{} lost)",
                    snapshot::short_id(&a.snapshot),
                    a.vm,
                    a.time,
                    a.item,
                    a.chunks,
                    if a.chunks == 1 { "" } else { "s" }
                )?;
            }
        }
        Ok(())
    }
}

/// What `check` found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckReport {
    pub problems: Vec<Problem>,
    /// Not errors: things worth knowing (unreferenced packs and the like).
    pub warnings: Vec<String>,
    pub snapshots: u64,
    pub index_files: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub bytes_read: u64,
    pub blobs_verified: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What we know about one indexed pack.
struct PackRecord {
    entries: Vec<BlobEntry>,
    /// Index files listing it.
    indexes: Vec<String>,
}

/// Packs larger than this are not read whole (no pack hyperkeep writes comes close: packs end
/// just past the configured pack size).
fn read_cap(repo: &Repository) -> u64 {
    repo.config()
        .pack_size
        .saturating_mul(2)
        .saturating_add(64 << 20)
}

/// Run the check. `Err` only when the repository cannot be listed or locked; everything else
/// lands in the report.
pub fn check(repo: &Repository, opts: &CheckOptions) -> Result<CheckReport> {
    check_with_progress(repo, opts, &NoProgress)
}

/// [`check`], reporting the bytes of pack data read (`--read-data`) to `progress`.
pub fn check_with_progress(
    repo: &Repository,
    opts: &CheckOptions,
    progress: &dyn Progress,
) -> Result<CheckReport> {
    // A shared lock: prune (exclusive) must not delete packs under our feet, which would show
    // up as false "missing pack" errors. Backups may run beside us; the objects they add are
    // written packs first, so an index never names a pack that does not exist yet.
    let _lock = crate::lock::acquire(repo, false, "check")?;
    let mut report = CheckReport::default();
    let mut problems: Vec<Problem> = Vec::new();

    // Listing order matters beside a running backup, which writes packs, then an index, then
    // the snapshot: snapshots are listed first, then indexes, then packs, so everything a
    // listed snapshot needs was already written when its listing happened.
    let snapshot_names = repo.backend().list(ObjectKind::Snapshot)?;

    // Key slots.
    for info in repo.backend().list(ObjectKind::Key)? {
        let ok = repo
            .backend()
            .get(ObjectKind::Key, &info.name)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<KeySlot>(&b).map_err(|e| e.to_string()));
        if let Err(e) = ok {
            push(
                &mut problems,
                format!("key {}", info.name),
                format!("key slot unreadable: {e}"),
                vec![],
            );
        }
    }

    // Index files.
    let mut packs: BTreeMap<Id, PackRecord> = BTreeMap::new();
    let index_names = repo.backend().list(ObjectKind::Index)?;
    report.index_files = index_names.len() as u64;
    for info in &index_names {
        let file: IndexFile = match repo.load_json(ObjectKind::Index, &info.name) {
            Ok(f) => f,
            Err(e) => {
                push(
                    &mut problems,
                    format!("index {}", info.name),
                    describe(&e),
                    vec![],
                );
                continue;
            }
        };
        for p in file.packs {
            let mut entries = p.blobs;
            entries.sort_by_key(|e| e.offset);
            match packs.get_mut(&p.id) {
                Some(rec) => {
                    if !same_entries(&rec.entries, &entries) {
                        push(
                            &mut problems,
                            format!("index {}", info.name),
                            format!(
                                "lists pack {} with other blobs than index {} does",
                                p.id, rec.indexes[0]
                            ),
                            vec![],
                        );
                    }
                    rec.indexes.push(info.name.clone());
                }
                None => {
                    packs.insert(
                        p.id,
                        PackRecord {
                            entries,
                            indexes: vec![info.name.clone()],
                        },
                    );
                }
            }
        }
    }

    // Packs as stored.
    let stored: HashMap<String, ObjectInfo> = repo
        .backend()
        .list(ObjectKind::Pack)?
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    report.packs = stored.len() as u64;
    let mut index = Index::default();
    // Packs whose blobs cannot be trusted at all (missing, wrong size): every blob is lost.
    let mut bad_packs: HashSet<Id> = HashSet::new();
    for (id, rec) in &packs {
        let name = id.to_hex();
        let lost: Vec<Id> = rec.entries.iter().map(|e| e.id).collect();
        let Some(info) = stored.get(&name) else {
            push(
                &mut problems,
                format!("pack {name}"),
                format!("missing (listed in index {})", rec.indexes.join(", ")),
                lost,
            );
            bad_packs.insert(*id);
            continue;
        };
        match expected_pack_size(&rec.entries) {
            Err(why) => {
                push(
                    &mut problems,
                    format!("index {}", rec.indexes[0]),
                    format!("entries for pack {name} are impossible: {why}"),
                    lost,
                );
                bad_packs.insert(*id);
                continue;
            }
            Ok(size) if size != info.size => {
                push(
                    &mut problems,
                    format!("pack {name}"),
                    format!(
                        "is {} bytes, its index entries imply {size} (truncated or extended)",
                        info.size
                    ),
                    lost,
                );
                bad_packs.insert(*id);
                continue;
            }
            Ok(_) => {}
        }
        index.insert_pack(*id, &rec.entries);
    }
    index.finalize();
    let mut unindexed: Vec<&String> = stored
        .keys()
        .filter(|n| Id::from_hex(n).map_or(true, |id| !packs.contains_key(&id)))
        .collect();
    unindexed.sort();
    for n in &unindexed {
        report.warnings.push(format!(
            "pack {n} is not in any index (left by an interrupted backup or prune; `hyperkeep \
             prune` removes it once it is old enough)"
        ));
    }

    // Snapshots.
    let mut snaps: Vec<(String, Snapshot)> = Vec::new();
    for info in snapshot_names {
        match snapshot::load_snapshot(repo, &info.name) {
            Ok(s) => snaps.push((info.name, s)),
            Err(Error::Missing(_)) => {} // forgotten while we listed
            Err(e) => problems.push(Problem {
                object: format!("snapshot {}", info.name),
                detail: format!("{} (the whole snapshot is lost)", describe(&e)),
                affected: vec![Affected {
                    snapshot: info.name.clone(),
                    vm: String::new(),
                    time: String::new(),
                    item: String::new(),
                    chunks: 0,
                }],
                lost: vec![],
            }),
        }
    }
    snapshot::sort_by_time(&mut snaps);
    report.snapshots = snaps.len() as u64;
    for (sid, snap) in &snaps {
        for disk in &snap.disks {
            let object = format!("snapshot {sid}");
            let missing_tables: Vec<Id> = disk
                .tables
                .iter()
                .filter(|t| !index.contains(t))
                .copied()
                .collect();
            if !missing_tables.is_empty() {
                // A pack-level problem may already explain it; name the snapshot anyway, since
                // that is where the reference lives.
                problems.push(Problem {
                    object,
                    detail: format!(
                        "disk '{}': {} chunk table blob(s) are not in any usable index entry (first {})",
                        disk.name,
                        missing_tables.len(),
                        missing_tables[0]
                    ),
                    affected: vec![],
                    lost: missing_tables,
                });
                continue;
            }
            match snapshot::load_table(repo, &index, disk) {
                Ok(table) => {
                    let missing: Vec<(usize, Id)> = table
                        .iter()
                        .enumerate()
                        .filter(|(_, id)| !id.is_zero() && !index.contains(id))
                        .map(|(i, id)| (i, *id))
                        .collect();
                    if let Some(&(first, _)) = missing.first() {
                        problems.push(Problem {
                            object,
                            detail: format!(
                                "disk '{}': {} chunk(s) are not in any usable index entry (first at \
                                 offset {})",
                                disk.name,
                                missing.len(),
                                disk.chunk_range(first as u64).0
                            ),
                            affected: vec![],
                            lost: missing.into_iter().map(|(_, id)| id).collect(),
                        });
                    }
                }
                Err(e) => problems.push(Problem {
                    object,
                    detail: format!(
                        "disk '{}': chunk table unreadable: {}",
                        disk.name,
                        describe(&e)
                    ),
                    affected: vec![],
                    lost: disk.tables.clone(),
                }),
            }
        }
        for f in &snap.files {
            let missing: Vec<Id> = f
                .chunks
                .iter()
                .filter(|id| !id.is_zero() && !index.contains(id))
                .copied()
                .collect();
            if !missing.is_empty() {
                problems.push(Problem {
                    object: format!("snapshot {sid}"),
                    detail: format!(
                        "file '{}': {} chunk(s) are not in any usable index entry",
                        f.name,
                        missing.len()
                    ),
                    affected: vec![],
                    lost: missing,
                });
            }
        }
    }

    // Blobs that snapshots need but no usable index lists may still sit in packs that no index
    // mentions (an index file was lost or damaged). Their trailers say so, at two small reads
    // per pack; the report then tells "data present, index incomplete" from "data lost".
    let needed: HashSet<Id> = problems
        .iter()
        .filter(|p| p.object.starts_with("snapshot "))
        .flat_map(|p| p.lost.iter().copied())
        .collect();
    if !needed.is_empty() && !unindexed.is_empty() {
        let mut found: HashMap<Id, String> = HashMap::new();
        for n in &unindexed {
            let (Ok(id), Some(info)) = (Id::from_hex(n), stored.get(*n)) else {
                continue;
            };
            if let Ok(entries) = repo.read_pack_trailer(&id, info.size) {
                for e in entries {
                    if needed.contains(&e.id) {
                        found.entry(e.id).or_insert_with(|| (*n).clone());
                    }
                }
            }
        }
        for p in problems
            .iter_mut()
            .filter(|p| p.object.starts_with("snapshot "))
        {
            let present: Vec<&String> = p.lost.iter().filter_map(|id| found.get(id)).collect();
            if let Some(first) = present.first() {
                p.detail.push_str(&format!(
                    "; {} of them are present in packs that no index lists (e.g. pack {first}): \
                     the data exists, the index is incomplete and can be rebuilt from the pack \
                     trailers",
                    present.len()
                ));
            }
        }
    }

    // Pack contents.
    if opts.read_data != ReadData::None {
        let cap = read_cap(repo);
        let selected = |id: &Id| !bad_packs.contains(id) && opts.read_data.selects(&id.to_hex());
        progress.start(
            packs
                .keys()
                .filter(|id| selected(id))
                .filter_map(|id| stored.get(&id.to_hex()))
                .map(|i| i.size)
                .sum(),
        );
        for (id, rec) in &packs {
            let name = id.to_hex();
            if bad_packs.contains(id) || !opts.read_data.selects(&name) {
                continue;
            }
            let Some(info) = stored.get(&name) else {
                continue;
            };
            if info.size > cap {
                problems.push(Problem {
                    object: format!("pack {name}"),
                    detail: format!(
                        "is {} bytes, far larger than any pack hyperkeep writes",
                        info.size
                    ),
                    affected: vec![],
                    lost: rec.entries.iter().map(|e| e.id).collect(),
                });
                continue;
            }
            let bytes = match repo.backend().get(ObjectKind::Pack, &name) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(Problem {
                        object: format!("pack {name}"),
                        detail: format!("cannot be read: {}", describe(&e)),
                        affected: vec![],
                        lost: rec.entries.iter().map(|e| e.id).collect(),
                    });
                    continue;
                }
            };
            report.packs_read += 1;
            report.bytes_read += bytes.len() as u64;
            progress.advance(bytes.len() as u64);
            let (verified, mut found) = verify_pack(repo, &name, &bytes, &rec.entries);
            report.blobs_verified += verified;
            problems.append(&mut found);
        }
        progress.finish();
    }

    attribute(repo, &index, &snaps, &mut problems);
    report.problems = problems;
    Ok(report)
}

/// Read-data checks of one pack already in memory. Returns blobs verified and problems.
fn verify_pack(
    repo: &Repository,
    name: &str,
    bytes: &[u8],
    entries: &[BlobEntry],
) -> (u64, Vec<Problem>) {
    let mut problems = Vec::new();
    let object = format!("pack {name}");
    let hash_ok = crypto::hash(bytes).to_hex() == name;
    let pack_id = Id::from_hex(name).unwrap_or_default();
    match pack::parse_pack(repo.key(), &pack_id, bytes) {
        Ok(mut trailer) => {
            trailer.sort_by_key(|e| e.offset);
            if !same_entries(&trailer, entries) {
                problems.push(Problem {
                    object: object.clone(),
                    detail: "its trailer lists other blobs than the index does".into(),
                    affected: vec![],
                    lost: vec![],
                });
            }
        }
        Err(e) => problems.push(Problem {
            object: object.clone(),
            detail: format!("trailer unreadable: {}", describe(&e)),
            affected: vec![],
            lost: vec![],
        }),
    }
    let mut verified = 0;
    let mut bad: Vec<(Id, String)> = Vec::new();
    for e in entries {
        match verify_blob(repo, &pack_id, bytes, e) {
            Ok(()) => verified += 1,
            Err(why) => bad.push((e.id, format!("blob {} at offset {}: {why}", e.id, e.offset))),
        }
    }
    if !bad.is_empty() {
        let shown: Vec<&str> = bad.iter().take(3).map(|(_, s)| s.as_str()).collect();
        problems.push(Problem {
            object: object.clone(),
            detail: format!(
                "{} of {} blobs damaged: {}{}",
                bad.len(),
                entries.len(),
                shown.join("; "),
                if bad.len() > 3 { "; …" } else { "" }
            ),
            affected: vec![],
            lost: bad.into_iter().map(|(id, _)| id).collect(),
        });
    } else if !hash_ok {
        problems.push(Problem {
            object,
            detail: "content does not match its name (damaged outside the blobs; every blob still \
                     verifies)"
                .into(),
            affected: vec![],
            lost: vec![],
        });
    }
    (verified, problems)
}

fn verify_blob(
    repo: &Repository,
    pack_id: &Id,
    pack_bytes: &[u8],
    e: &BlobEntry,
) -> std::result::Result<(), String> {
    let start = usize::try_from(e.offset).map_err(|_| "offset out of range".to_string())?;
    let end = start
        .checked_add(e.stored_len as usize)
        .filter(|&end| end <= pack_bytes.len())
        .ok_or("extends past the end of the pack")?;
    pack::open_blob(
        repo.key(),
        pack_id,
        e,
        &pack_bytes[start..end],
        repo.max_blob_len(),
    )
    .map(|_| ())
    .map_err(|err| match err {
        // open_blob names the pack and blob already; keep only what went wrong.
        Error::Corrupt { detail, .. } => detail,
        other => other.to_string(),
    })
}

/// Size a pack must have given all its blob entries: the blobs back to back from offset 0,
/// then the sealed trailer, its length and the magic.
fn expected_pack_size(entries: &[BlobEntry]) -> std::result::Result<u64, String> {
    let mut pos = 0u64;
    for e in entries {
        if e.offset != pos {
            return Err(format!(
                "blob {} at offset {} where {pos} was expected (gap or overlap)",
                e.id, e.offset
            ));
        }
        pos += u64::from(e.stored_len);
    }
    let trailer = (crypto::SEAL_OVERHEAD + 4 + entries.len() * pack::TRAILER_ENTRY_LEN) as u64;
    Ok(pos + trailer + pack::PACK_FOOTER_LEN)
}

fn push(problems: &mut Vec<Problem>, object: String, detail: String, lost: Vec<Id>) {
    problems.push(Problem {
        object,
        detail,
        affected: Vec::new(),
        lost,
    });
}

fn same_entries(a: &[BlobEntry], b: &[BlobEntry]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.id == y.id
                && x.kind == y.kind
                && x.compressed == y.compressed
                && x.offset == y.offset
                && x.stored_len == y.stored_len
                && x.raw_len == y.raw_len
        })
}

fn describe(e: &Error) -> String {
    e.to_string()
}

/// Fill in `affected` for every problem that lost blobs: which snapshots reference them, and
/// in which disk or file.
fn attribute(
    repo: &Repository,
    index: &Index,
    snaps: &[(String, Snapshot)],
    problems: &mut [Problem],
) {
    let lost: HashSet<Id> = problems
        .iter()
        .flat_map(|p| p.lost.iter().copied())
        .collect();
    if lost.is_empty() {
        return;
    }
    // (snapshot no, item name) -> lost blob ids it references
    let mut uses: BTreeMap<(usize, String), BTreeSet<Id>> = BTreeMap::new();
    for (n, (_, snap)) in snaps.iter().enumerate() {
        for disk in &snap.disks {
            let key = (n, disk.name.clone());
            let lost_tables: Vec<Id> = disk
                .tables
                .iter()
                .filter(|t| lost.contains(t))
                .copied()
                .collect();
            if !lost_tables.is_empty() {
                uses.entry(key).or_default().extend(lost_tables);
                continue;
            }
            // Tables load only from intact blobs here (lost ones were handled above); one that
            // still fails was reported in the structure pass.
            if let Ok(table) = snapshot::load_table(repo, index, disk) {
                for id in table {
                    if lost.contains(&id) {
                        uses.entry(key.clone()).or_default().insert(id);
                    }
                }
            }
        }
        for f in &snap.files {
            for id in &f.chunks {
                if lost.contains(id) {
                    uses.entry((n, f.name.clone())).or_default().insert(*id);
                }
            }
        }
    }
    for p in problems.iter_mut() {
        if p.lost.is_empty() {
            continue;
        }
        let mine: HashSet<Id> = p.lost.iter().copied().collect();
        for ((n, item), ids) in &uses {
            let hit = ids.iter().filter(|id| mine.contains(id)).count() as u64;
            if hit == 0 {
                continue;
            }
            let (sid, snap) = &snaps[*n];
            let whole_table = snap
                .disks
                .iter()
                .find(|d| &d.name == item)
                .filter(|d| d.tables.iter().any(|t| mine.contains(t)));
            p.affected.push(Affected {
                snapshot: sid.clone(),
                vm: snap.vm.clone(),
                time: snap.time.clone(),
                item: item.clone(),
                chunks: match whole_table {
                    Some(d) => d.chunk_count(),
                    None => hit,
                },
            });
        }
    }
}

/// What [`repair_index`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    pub dry_run: bool,
    /// Index files that could not be read (replaced).
    pub damaged_index_files: Vec<String>,
    /// Packs no readable index listed, whose trailers were read and indexed again.
    pub packs_reindexed: Vec<String>,
    /// Packs in no readable index whose trailer is unreadable too (their blobs stay lost).
    pub packs_unreadable: Vec<String>,
    /// Indexed packs that do not exist (dropped from the index).
    pub packs_missing: Vec<String>,
    pub index_files_written: u64,
    pub index_files_deleted: u64,
}

/// Rebuild what the index lacks from the pack trailers: index files are a cache of them. Packs
/// that no readable index lists get their trailer read and are indexed again; index entries of
/// packs that no longer exist are dropped; damaged index files are replaced. Nothing is written
/// when nothing is wrong.
///
/// Takes the exclusive lock. Crash-safe like prune: the new index (listing every readable
/// entry of every existing pack) is stored before any old index file is deleted, and packs are
/// never touched.
pub fn repair_index(repo: &Repository, dry_run: bool) -> Result<RepairReport> {
    let _lock = crate::lock::acquire(repo, !dry_run, "repair index")?;
    let mut report = RepairReport {
        dry_run,
        ..Default::default()
    };
    let stored: HashMap<String, ObjectInfo> = repo
        .backend()
        .list(ObjectKind::Pack)?
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    let mut names = Vec::new();
    let mut index = Index::new();
    for info in repo.backend().list(ObjectKind::Index)? {
        match repo.load_json::<IndexFile>(ObjectKind::Index, &info.name) {
            Ok(file) => {
                for p in &file.packs {
                    index.insert_pack(p.id, &p.blobs);
                }
            }
            Err(Error::Missing(_)) => continue,
            Err(_) => report.damaged_index_files.push(info.name.clone()),
        }
        names.push(info.name);
    }
    index.finalize();
    let mut by_pack = index.blobs_by_pack();
    let mut missing: Vec<Id> = by_pack
        .keys()
        .filter(|p| !stored.contains_key(&p.to_hex()))
        .copied()
        .collect();
    missing.sort();
    for p in &missing {
        by_pack.remove(p);
        report.packs_missing.push(p.to_hex());
    }
    let mut unindexed: Vec<(&String, &ObjectInfo)> = stored
        .iter()
        .filter(|(n, _)| Id::from_hex(n).is_ok_and(|id| !index.has_pack(&id)))
        .collect();
    unindexed.sort_by(|a, b| a.0.cmp(b.0));
    for (name, info) in unindexed {
        let Ok(id) = Id::from_hex(name) else { continue };
        match repo.read_pack_trailer(&id, info.size) {
            Ok(mut entries) => {
                entries.sort_by_key(|e| e.offset);
                by_pack.insert(id, entries);
                report.packs_reindexed.push(name.clone());
            }
            Err(_) => report.packs_unreadable.push(name.clone()),
        }
    }
    let changed = !report.damaged_index_files.is_empty()
        || !report.packs_reindexed.is_empty()
        || !report.packs_missing.is_empty();
    if !changed || dry_run {
        if changed {
            report.index_files_written = 1;
            report.index_files_deleted = names.len() as u64;
        }
        return Ok(report);
    }
    let mut packs: Vec<crate::index::IndexPack> = by_pack
        .into_iter()
        .map(|(id, blobs)| crate::index::IndexPack { id, blobs })
        .collect();
    packs.sort_by_key(|p| p.id);
    let supersedes = names.iter().filter_map(|n| Id::from_hex(n).ok()).collect();
    let file = IndexFile { packs, supersedes };
    let written = repo.save_json(ObjectKind::Index, &file)?.to_hex();
    report.index_files_written = 1;
    for n in &names {
        // Identical content hashes to the same name: never delete what was just written.
        if *n != written {
            repo.backend().delete(ObjectKind::Index, n)?;
            report.index_files_deleted += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| crypto::hash(&(i as u64).to_le_bytes()).to_hex())
            .collect()
    }

    #[test]
    fn subsets_are_deterministic_disjoint_and_cover_everything() {
        let names = names(2000);
        for percent in [10.0, 25.0, 33.0, 50.0] {
            let runs = (100.0f64 / percent).ceil() as u64;
            let mut seen = vec![0u32; names.len()];
            for seed in 0..runs {
                let sel = ReadData::Subset { percent, seed };
                let picked: Vec<usize> = (0..names.len())
                    .filter(|&i| sel.selects(&names[i]))
                    .collect();
                // Roughly the requested share (2000 uniform names: well within ±40%).
                let share = picked.len() as f64 / names.len() as f64 * 100.0;
                if seed + 1 < runs || (100.0 % percent) == 0.0 {
                    assert!(
                        (share - percent).abs() < percent * 0.4,
                        "{percent}% seed {seed}: {share}"
                    );
                }
                for i in picked {
                    seen[i] += 1;
                }
                // Deterministic.
                let again: Vec<usize> = (0..names.len())
                    .filter(|&i| sel.selects(&names[i]))
                    .collect();
                let first: Vec<usize> = (0..names.len())
                    .filter(|&i| sel.selects(&names[i]))
                    .collect();
                assert_eq!(again, first);
            }
            // Every pack read at least once over ⌈100/N⌉ seeds; exactly once when N divides 100.
            assert!(
                seen.iter().all(|&c| c >= 1),
                "{percent}%: some pack never selected"
            );
            if 100.0 % percent == 0.0 {
                assert!(seen.iter().all(|&c| c == 1), "{percent}%: overlap");
            }
        }
        assert!(names.iter().all(|n| ReadData::All.selects(n)));
        assert!(!names.iter().any(|n| ReadData::None.selects(n)));
        let all = ReadData::Subset {
            percent: 100.0,
            seed: 7,
        };
        assert!(names.iter().all(|n| all.selects(n)));
    }

    #[test]
    fn expected_pack_size_follows_the_layout() {
        use crate::pack::BlobKind;
        let e = |offset, stored_len| BlobEntry {
            id: Id([offset as u8; 32]),
            kind: BlobKind::Data,
            compressed: true,
            offset,
            stored_len,
            raw_len: 1000,
        };
        assert_eq!(
            expected_pack_size(&[e(0, 100), e(100, 50)]).unwrap(),
            150 + 40 + 4 + 2 * 58 + 12
        );
        assert!(expected_pack_size(&[e(0, 100), e(90, 50)]).is_err());
        assert!(expected_pack_size(&[e(10, 100)]).is_err());
    }
}
