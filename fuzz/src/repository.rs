//! The `repository` fuzz target: a real repository (two snapshots of a small VM, several packs)
//! damaged as the fuzz input says, then opened, checked with `--read-data`, its index rebuilt
//! from the pack trailers (dry run), and every snapshot's disks read through `SnapshotDisk`:
//! whatever a repository holds, hyperkeep reports errors and never panics, hangs or allocates
//! what a damaged object claims.
//!
//! Damage is of two kinds, so that both sides of authentication are reached:
//! - raw: bytes of a stored object overwritten, or the object truncated (what a bad disk or a
//!   hostile store does; stopped by hashes and authentication);
//! - authentic: an index file, snapshot or pack trailer decrypted, its plaintext edited and
//!   sealed again with the repository's key (what only a key holder could write: it reaches the
//!   JSON, table and trailer parsers with hostile content). Index files and snapshots are stored
//!   under their new hash so that they pass the name check; packs keep their name (the index
//!   refers to it).
//!
//! Key slots are never edited (see `apply`). The base repository is built once per process, in
//! memory (`MemBackend`), so an input costs one repository open (argon2id at the test
//! parameters) and a check: ~150 inputs per second here.
//!
//! Input: a sequence of 5-byte edit headers, each followed by its bytes:
//! `object u8 | op u8 | offset u16 LE | len u8 | bytes[len]`. `object` picks one of the
//! repository's objects (sorted by key), `op % 4`: 0 raw overwrite, 1 raw truncate to
//! `offset`, 2 authentic overwrite of the plaintext, 3 authentic truncate of the plaintext.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use repo::backend::{Backend, ObjectInfo, ObjectKind};
use repo::check::{check, CheckOptions, ReadData};
use repo::crypto::{hash, KdfParams, MasterKey};
use repo::repository::{InitOptions, Repository};
use repo::restore::SnapshotDisk;
use vdisk_core::{MapScope, VirtualDisk};

const PASSWORD: &str = "fuzz";
const KINDS: [ObjectKind; 6] = [
    ObjectKind::Config,
    ObjectKind::Key,
    ObjectKind::Pack,
    ObjectKind::Index,
    ObjectKind::Snapshot,
    ObjectKind::Lock,
];

type Objects = BTreeMap<(usize, String), Vec<u8>>;

/// The undamaged repository's objects and its master key (for authentic edits).
struct Base {
    objects: Objects,
    key: MasterKey,
    /// The disk's content at the first and at the second backup (for the tests' read-back).
    #[cfg_attr(not(test), allow(dead_code))]
    versions: [Vec<u8>; 2],
}

fn kind_index(kind: ObjectKind) -> usize {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is listed")
}

/// Objects in memory: the fuzz target must not touch the disk per input.
struct MemBackend(Mutex<Objects>);

impl Backend for MemBackend {
    fn location(&self) -> String {
        "memory".into()
    }
    fn put(&self, kind: ObjectKind, name: &str, data: &[u8]) -> repo::Result<()> {
        let mut m = self.0.lock().unwrap();
        m.insert((kind_index(kind), name.to_string()), data.to_vec());
        Ok(())
    }
    fn get(&self, kind: ObjectKind, name: &str) -> repo::Result<Vec<u8>> {
        let m = self.0.lock().unwrap();
        m.get(&(kind_index(kind), name.to_string()))
            .cloned()
            .ok_or_else(|| repo::Error::Missing(kind.key(name)))
    }
    fn get_range(
        &self,
        kind: ObjectKind,
        name: &str,
        offset: u64,
        length: u64,
    ) -> repo::Result<Vec<u8>> {
        let m = self.0.lock().unwrap();
        let data = m
            .get(&(kind_index(kind), name.to_string()))
            .ok_or_else(|| repo::Error::Missing(kind.key(name)))?;
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= data.len() as u64);
        match end {
            Some(end) => Ok(data[offset as usize..end as usize].to_vec()),
            None => Err(repo::Error::corrupt(
                kind.key(name),
                "shorter than the range",
            )),
        }
    }
    fn list(&self, kind: ObjectKind) -> repo::Result<Vec<ObjectInfo>> {
        let m = self.0.lock().unwrap();
        Ok(m.iter()
            .filter(|((k, _), _)| *k == kind_index(kind))
            .map(|((_, name), data)| ObjectInfo {
                name: name.clone(),
                size: data.len() as u64,
                modified: None,
            })
            .collect())
    }
    fn delete(&self, kind: ObjectKind, name: &str) -> repo::Result<()> {
        self.0
            .lock()
            .unwrap()
            .remove(&(kind_index(kind), name.to_string()));
        Ok(())
    }
    fn exists(&self, kind: ObjectKind, name: &str) -> repo::Result<bool> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .contains_key(&(kind_index(kind), name.to_string())))
    }
}

/// The undamaged repository, built once: a 512 KiB raw disk and a configuration file backed up
/// twice (the second time with a few changed chunks), 64 KiB chunks, 1 MiB packs.
fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hyperkeep-fuzz-repo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("vm.raw");
        let mut data = vec![0u8; 512 << 10];
        for (i, b) in data.iter_mut().enumerate() {
            // Data, zeros and compressible runs, so that every blob shape appears.
            if (i >> 16) % 3 != 1 {
                *b = ((i as u64).wrapping_mul(0x9e37_79b9) >> 13) as u8
                    & if i & 0x8000 != 0 { 0xff } else { 0x0f };
            }
        }
        std::fs::write(&disk, &data).unwrap();
        let config = dir.join("vm.vmcx");
        std::fs::write(&config, b"<configuration/>".repeat(300)).unwrap();
        let backend = Arc::new(MemBackend(Mutex::new(BTreeMap::new())));
        let opts = InitOptions {
            chunk_size: 64 << 10,
            pack_size: 1 << 20,
            kdf: Some(KdfParams::FAST_FOR_TESTS),
            ..Default::default()
        };
        let repo = Repository::init(backend.clone(), PASSWORD, opts).unwrap();
        let backup = |paths: Vec<std::path::PathBuf>| {
            let opts = repo::backup::BackupOptions {
                vm: "vm".into(),
                tags: Default::default(),
                paths,
                threads: 1,
                ..Default::default()
            };
            repo::backup::backup(&repo, &opts, &repo::backup::NoProgress).unwrap();
        };
        backup(vec![disk.clone(), config.clone()]);
        let first = data.clone();
        data[100_000..300_000].fill(0x5a);
        std::fs::write(&disk, &data).unwrap();
        backup(vec![disk, config]);
        let key = repo.key().clone();
        drop(repo);
        std::fs::remove_dir_all(&dir).ok();
        let objects = backend.0.lock().unwrap().clone();
        Base {
            objects,
            key,
            versions: [first, data],
        }
    })
}

/// Decrypt a sealed JSON object or a pack trailer; returns (plaintext, where the sealed part
/// starts and ends in the object).
fn unseal(key: &MasterKey, kind: ObjectKind, bytes: &[u8]) -> Option<(Vec<u8>, usize, usize)> {
    match kind {
        ObjectKind::Index | ObjectKind::Snapshot => {
            let plain = key.open(bytes).ok()?;
            // Sealed JSON may be a zstd frame of the JSON: edit the JSON itself.
            let plain = if plain.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                zstd::bulk::decompress(&plain, 16 << 20).ok()?
            } else {
                plain
            };
            Some((plain, 0, bytes.len()))
        }
        ObjectKind::Pack => {
            let n = bytes.len();
            let len =
                u32::from_le_bytes(bytes.get(n.checked_sub(12)?..n - 8)?.try_into().ok()?) as usize;
            let start = n.checked_sub(12)?.checked_sub(len)?;
            let plain = key.open(&bytes[start..n - 12]).ok()?;
            Some((plain, start, n - 12))
        }
        _ => None,
    }
}

fn apply(objects: &mut Objects, key: &MasterKey, mut input: &[u8]) {
    while input.len() >= 5 {
        let (head, rest) = input.split_at(5);
        let len = (head[4] as usize).min(rest.len());
        let (bytes, rest) = rest.split_at(len);
        input = rest;
        if objects.is_empty() {
            return;
        }
        let name = objects
            .keys()
            .nth(head[0] as usize % objects.len())
            .unwrap()
            .clone();
        let offset = u16::from_le_bytes([head[2], head[3]]) as usize;
        let kind = KINDS[name.0];
        if kind == ObjectKind::Key {
            // Key slots are left alone: a damaged slot's argon2id parameters are bounded (at
            // most 4 GiB, 64 passes: crypto unit tests), and fuzzing them would only measure
            // argon2's cost. Damage to them is covered by the CLI error tests.
            continue;
        }
        let object = objects.get_mut(&name).unwrap();
        match head[1] % 4 {
            0 => overwrite(object, offset, bytes),
            1 => object.truncate(offset),
            op => {
                let Some((mut plain, start, end)) = unseal(key, kind, object) else {
                    continue;
                };
                if op == 2 {
                    overwrite(&mut plain, offset, bytes);
                } else {
                    plain.truncate(offset);
                }
                let sealed = key.seal(&plain);
                let mut new = object[..start].to_vec();
                new.extend_from_slice(&sealed);
                if kind == ObjectKind::Pack {
                    new.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
                }
                new.extend_from_slice(&object[end..]);
                if kind == ObjectKind::Pack {
                    // Keep the pack's name: the index refers to it (check reports the mismatch).
                    *object = new;
                } else {
                    // Content-addressed: stored under its new hash, so loading gets past the
                    // name check to authentication and parsing.
                    objects.remove(&name);
                    objects.insert((name.0, hash(&new).to_hex()), new);
                }
            }
        }
    }
}

fn overwrite(object: &mut [u8], offset: usize, bytes: &[u8]) {
    let offset = offset.min(object.len());
    let end = (offset + bytes.len()).min(object.len());
    object[offset..end].copy_from_slice(&bytes[..end - offset]);
}

/// One fuzz input: damage the base repository as `data` says, then open, check and read it.
pub fn run(data: &[u8]) {
    let base = base();
    let mut objects = base.objects.clone();
    apply(&mut objects, &base.key, data);
    let backend = Arc::new(MemBackend(Mutex::new(objects)));
    let Ok(repo) = Repository::open(backend, PASSWORD) else {
        return;
    };
    let _ = check(
        &repo,
        &CheckOptions {
            read_data: ReadData::All,
        },
    );
    // Rebuilding the index reads every pack's trailer through the range-read path.
    let _ = repo::check::repair_index(&repo, true);
    let Ok(index) = repo.load_index() else {
        return;
    };
    let Ok(snapshots) = repo::snapshot::list_snapshots(&repo) else {
        return;
    };
    for (_, snap) in &snapshots {
        for entry in &snap.disks {
            let Ok(disk) = SnapshotDisk::open(&repo, &index, entry) else {
                continue;
            };
            // A damaged manifest may claim any size: read at most the first 4 MiB.
            let size = disk.geometry().virtual_size.min(4 << 20);
            let _ = disk.map(0, size, MapScope::View);
            let mut buf = vec![0u8; 64 << 10];
            let mut off = 0;
            while off < size {
                let n = (size - off).min(buf.len() as u64) as usize;
                if disk.read_at(&mut buf[..n], off).is_err() {
                    break;
                }
                off += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(objects: Objects) -> Repository {
        Repository::open(Arc::new(MemBackend(Mutex::new(objects))), PASSWORD).unwrap()
    }

    fn check_all(repo: &Repository) -> repo::check::CheckReport {
        check(
            repo,
            &CheckOptions {
                read_data: ReadData::All,
            },
        )
        .unwrap()
    }

    fn edit(object: u8, op: u8, offset: u16, bytes: &[u8]) -> Vec<u8> {
        let mut e = vec![object, op];
        e.extend_from_slice(&offset.to_le_bytes());
        e.push(bytes.len() as u8);
        e.extend_from_slice(bytes);
        e
    }

    /// The index of the first object of `kind` in the sorted object list.
    fn first_of(kind: ObjectKind) -> u8 {
        let i = base()
            .objects
            .keys()
            .position(|k| k.0 == kind_index(kind))
            .unwrap();
        u8::try_from(i).unwrap()
    }

    #[test]
    fn the_undamaged_repository_checks_clean_and_reads_back_both_versions() {
        let base = base();
        assert!(
            base.objects
                .keys()
                .filter(|k| KINDS[k.0] == ObjectKind::Pack)
                .count()
                >= 2,
            "the base repository should span several packs"
        );
        let repo = open(base.objects.clone());
        assert!(check_all(&repo).is_clean());
        let index = repo.load_index().unwrap();
        let mut snaps = repo::snapshot::list_snapshots(&repo).unwrap();
        repo::snapshot::sort_by_time(&mut snaps);
        assert_eq!(snaps.len(), 2);
        for ((_, snap), want) in snaps.iter().zip(&base.versions) {
            let disk = SnapshotDisk::open(&repo, &index, &snap.disks[0]).unwrap();
            let mut got = vec![0u8; want.len()];
            disk.read_at(&mut got, 0).unwrap();
            assert!(&got == want, "a snapshot reads back different bytes");
        }
        // And the harness on it runs to the end.
        run(b"");
    }

    #[test]
    fn edits_reach_authentication_and_the_parsers_behind_it() {
        let base = base();
        // Raw damage to a pack: check --read-data finds it.
        let mut objects = base.objects.clone();
        apply(
            &mut objects,
            &base.key,
            &edit(first_of(ObjectKind::Pack), 0, 200, b"\xff\xff"),
        );
        assert_ne!(objects, base.objects);
        assert!(!check_all(&open(objects)).is_clean());

        // An authentic, truncated snapshot manifest: stored under its new hash, it passes the
        // name check and authentication, and fails as JSON.
        let mut objects = base.objects.clone();
        apply(
            &mut objects,
            &base.key,
            &edit(first_of(ObjectKind::Snapshot), 3, 10, b""),
        );
        let repo = open(objects);
        let snapshots = repo::snapshot::list_snapshots(&repo).unwrap();
        assert_eq!(
            snapshots.len(),
            1,
            "the damaged manifest is skipped, the other listed"
        );
        assert!(!check_all(&repo).is_clean());

        // An authentic edit of a pack trailer (an entry's offset): the trailer authenticates and
        // its contents are what check refuses.
        let mut objects = base.objects.clone();
        apply(
            &mut objects,
            &base.key,
            &edit(first_of(ObjectKind::Pack), 2, 4 + 34, &[0xff; 8]),
        );
        assert!(!check_all(&open(objects)).is_clean());
    }

    #[test]
    fn seeds_and_regressions_run() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for dir in ["corpus/repository", "regressions/repository"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for e in entries {
                run(&std::fs::read(e.unwrap().path()).unwrap());
                n += 1;
            }
        }
        assert!(
            n >= 5,
            "the seed corpus of the repository target is missing"
        );
    }
}
