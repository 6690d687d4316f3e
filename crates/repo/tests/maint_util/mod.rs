//! Shared helpers of the maintenance tests (forget, prune, check): small repositories with a
//! few raw-disk snapshots whose exact content the test knows.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use repo::backend::{Backend, LocalBackend, ObjectInfo, ObjectKind};
use repo::backup::{backup, BackupOptions, NoProgress};
use repo::crypto::Id;
use repo::repository::{InitOptions, Repository};
use repo::snapshot::{self, Snapshot};
use repo::{Error, Result};

pub const PASSWORD: &str = "correct horse battery staple";
/// Small chunks and packs so that a few MiB make many packs.
pub const CHUNK: u32 = 64 << 10;
pub const PACK: u64 = 1 << 20;
pub const DISK_SIZE: u64 = 8 << 20;

pub fn fast_kdf() {
    std::env::set_var("HYPERKEEP_TEST_FAST_KDF", "1");
}

pub fn init_repo(dir: &Path) -> Repository {
    fast_kdf();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    Repository::init(
        backend,
        PASSWORD,
        InitOptions {
            chunk_size: CHUNK,
            pack_size: PACK,
            ..Default::default()
        },
    )
    .expect("init")
}

pub fn open_repo(dir: &Path) -> Repository {
    fast_kdf();
    Repository::open(Arc::new(LocalBackend::new(dir)), PASSWORD).expect("open")
}

/// Deterministic, incompressible-ish bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A VM whose disk content the test tracks: `disk.raw` plus `vm.vmcx`.
pub struct Vm {
    pub dir: PathBuf,
    pub name: String,
    pub disk: Vec<u8>,
    pub config: Vec<u8>,
}

impl Vm {
    pub fn new(dir: &Path, name: &str) -> Vm {
        Vm::with_size(dir, name, DISK_SIZE)
    }

    pub fn with_size(dir: &Path, name: &str, size: u64) -> Vm {
        let mut disk = vec![0u8; size as usize];
        // Half the disk holds data, the rest stays zero (zero chunks are never stored).
        disk[..(size / 2) as usize].copy_from_slice(&noise(1, (size / 2) as usize));
        let vm = Vm {
            dir: dir.to_path_buf(),
            name: name.into(),
            disk,
            config: format!("<vm name='{name}'/>").into_bytes(),
        };
        std::fs::create_dir_all(dir).unwrap();
        vm.write();
        vm
    }

    fn write(&self) {
        std::fs::write(self.dir.join("disk.raw"), &self.disk).unwrap();
        std::fs::write(self.dir.join("vm.vmcx"), &self.config).unwrap();
    }

    /// Overwrite `len` bytes at `offset` with fresh data.
    pub fn change(&mut self, seed: u64, offset: usize, len: usize) {
        self.disk[offset..offset + len].copy_from_slice(&noise(seed, len));
        self.config = format!("<vm name='{}' generation='{seed}'/>", self.name).into_bytes();
        self.write();
    }

    pub fn backup(&self, repo: &Repository) -> (String, Snapshot) {
        self.backup_tagged(repo, &[])
    }

    pub fn backup_tagged(&self, repo: &Repository, tags: &[(&str, &str)]) -> (String, Snapshot) {
        let opts = BackupOptions {
            vm: self.name.clone(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            paths: vec![self.dir.join("disk.raw"), self.dir.join("vm.vmcx")],
            threads: 2,
            ..Default::default()
        };
        backup(repo, &opts, &NoProgress).expect("backup")
    }
}

/// The content a snapshot must restore to.
#[derive(Clone)]
pub struct Expected {
    pub id: String,
    pub disk: Vec<u8>,
    pub config: Vec<u8>,
}

impl Expected {
    pub fn of(vm: &Vm, id: &str) -> Expected {
        Expected {
            id: id.into(),
            disk: vm.disk.clone(),
            config: vm.config.clone(),
        }
    }
}

/// Restore `id` into a fresh directory under `scratch`; the result or the error.
pub fn restore_to(repo: &Repository, id: &str, scratch: &Path) -> Result<PathBuf> {
    let (full, snap) = snapshot::find_snapshot(repo, id, None)?;
    let target = scratch.join(format!("restore-{}", &full[..12]));
    if target.exists() {
        std::fs::remove_dir_all(&target).unwrap();
    }
    repo::restore::restore(repo, &full, &snap, &target, None, &NoProgress)?;
    Ok(target)
}

/// Restore and compare byte for byte.
pub fn assert_restores(repo: &Repository, e: &Expected, scratch: &Path) {
    let target = restore_to(repo, &e.id, scratch)
        .unwrap_or_else(|err| panic!("restoring {} failed: {err}", e.id));
    let disk = std::fs::read(target.join("disk.raw")).unwrap();
    assert!(disk == e.disk, "snapshot {}: restored disk differs", e.id);
    let config = std::fs::read(target.join("vm.vmcx")).unwrap();
    assert_eq!(
        config, e.config,
        "snapshot {}: restored config differs",
        e.id
    );
    std::fs::remove_dir_all(&target).unwrap();
}

/// Every stored object (kind, name, size), sorted.
pub fn listing(repo: &Repository) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for kind in [
        ObjectKind::Key,
        ObjectKind::Pack,
        ObjectKind::Index,
        ObjectKind::Snapshot,
        ObjectKind::Lock,
    ] {
        for i in repo.backend().list(kind).unwrap() {
            out.push((kind.prefix().to_string(), i.name, i.size));
        }
    }
    out.sort();
    out
}

pub fn pack_bytes(repo: &Repository) -> u64 {
    repo.backend()
        .list(ObjectKind::Pack)
        .unwrap()
        .iter()
        .map(|i| i.size)
        .sum()
}

/// Union of every snapshot's referenced blobs.
pub fn used_blobs(repo: &Repository) -> HashSet<Id> {
    let index = repo.load_index().unwrap();
    let mut used = HashSet::new();
    for (_, s) in snapshot::list_snapshots(repo).unwrap() {
        used.extend(snapshot::referenced_blobs(repo, &index, &s).unwrap());
    }
    used
}

/// A repository with one VM and `n` snapshots, each changing a different 256 KiB region
/// (plus a shared base), and the expected content of each.
pub fn repo_with_history(dir: &Path, n: usize) -> (Repository, Vec<Expected>) {
    repo_with_history_sized(dir, n, DISK_SIZE)
}

/// [`repo_with_history`] with another disk size (at least 1 MiB).
pub fn repo_with_history_sized(dir: &Path, n: usize, size: u64) -> (Repository, Vec<Expected>) {
    let repo = init_repo(&dir.join("repo"));
    let mut vm = Vm::with_size(&dir.join("vm"), "web", size);
    let mut expected = Vec::new();
    for i in 0..n {
        if i > 0 {
            let off = ((i * 300) << 10) % (size as usize - (256 << 10));
            vm.change(100 + i as u64, off, 256 << 10);
        }
        let (id, _) = vm.backup(&repo);
        expected.push(Expected::of(&vm, &id));
    }
    (repo, expected)
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Path of an object of the local backend.
pub fn object_path(root: &Path, kind: ObjectKind, name: &str) -> PathBuf {
    root.join(kind.key(name))
}

/// A backend that behaves like the local one until `budget` mutating operations (put/delete)
/// have happened, then fails every further one: the repository as a process killed at that
/// moment would leave it.
pub struct CrashingBackend {
    pub inner: LocalBackend,
    pub budget: AtomicI64,
}

impl CrashingBackend {
    fn spend(&self, what: &str) -> Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(Error::io(
                format!("simulated crash before {what}"),
                std::io::Error::other("crash"),
            ));
        }
        Ok(())
    }
}

impl Backend for CrashingBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, kind: ObjectKind, name: &str, data: &[u8]) -> Result<()> {
        self.spend(&format!("put {}", kind.key(name)))?;
        self.inner.put(kind, name, data)
    }
    fn get(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        self.inner.get(kind, name)
    }
    fn get_range(&self, kind: ObjectKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.inner.get_range(kind, name, offset, length)
    }
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        self.inner.list(kind)
    }
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()> {
        self.spend(&format!("delete {}", kind.key(name)))?;
        self.inner.delete(kind, name)
    }
    fn exists(&self, kind: ObjectKind, name: &str) -> Result<bool> {
        self.inner.exists(kind, name)
    }
}
