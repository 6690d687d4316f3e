//! Files inside virtual disks: `ls`, `cat`, `find` and `restore --include`, on a live disk file
//! or directly on a repository snapshot (only the chunks a read touches are fetched).
//!
//! This module holds what the commands share: [`open_source`] turns `SNAPSHOT|DISKFILE` into
//! disks, [`select`] picks one filesystem (`--disk N`, `--partition N`, or the only one there
//! is) and otherwise returns the [`Layout`] for the user to choose from, and a backend wrapper
//! that counts the pack bytes read (reported by `restore --include`, and how we measure that a
//! file extract reads little more than the file).

pub mod cat;
pub mod find;
pub mod ls;
pub mod restore;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use guestfs::fs::GuestFs;
use repo::backend::{Backend, ObjectInfo, ObjectKind, CONFIG_NAME};
use repo::index::Index;
use repo::lock::LockGuard;
use repo::repository::Repository;
use repo::restore::SnapshotDisk;
use repo::snapshot::{find_snapshot, short_id, Snapshot};
use serde::Serialize;
use vdisk::VirtualDisk;

use crate::cli::Cli;
use crate::size::human;

/// Counts the bytes of pack data read from the repository (chunk fetches).
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    pack_bytes: AtomicU64,
}

impl Backend for CountingBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, kind: ObjectKind, name: &str, data: &[u8]) -> repo::Result<()> {
        self.inner.put(kind, name, data)
    }
    fn get(&self, kind: ObjectKind, name: &str) -> repo::Result<Vec<u8>> {
        let v = self.inner.get(kind, name)?;
        if kind == ObjectKind::Pack {
            self.pack_bytes.fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        Ok(v)
    }
    fn get_range(
        &self,
        kind: ObjectKind,
        name: &str,
        offset: u64,
        length: u64,
    ) -> repo::Result<Vec<u8>> {
        let v = self.inner.get_range(kind, name, offset, length)?;
        if kind == ObjectKind::Pack {
            self.pack_bytes.fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        Ok(v)
    }
    fn list(&self, kind: ObjectKind) -> repo::Result<Vec<ObjectInfo>> {
        self.inner.list(kind)
    }
    fn delete(&self, kind: ObjectKind, name: &str) -> repo::Result<()> {
        self.inner.delete(kind, name)
    }
    fn exists(&self, kind: ObjectKind, name: &str) -> repo::Result<bool> {
        self.inner.exists(kind, name)
    }
}

/// An open repository for reading snapshots' disks. The repository and index are leaked: the
/// snapshot disks borrow them and must be `'static` to be shared as `Arc<dyn VirtualDisk>` by the
/// filesystems; a command opens one repository once per process, so nothing accumulates.
pub struct OpenRepo {
    pub repo: &'static Repository,
    pub index: &'static Index,
    pub counter: Arc<CountingBackend>,
    _lock: LockGuard,
}

impl OpenRepo {
    pub fn open(cli: &Cli) -> Result<OpenRepo> {
        let backend = crate::repo_open::backend(cli)?;
        if !backend.exists(ObjectKind::Config, CONFIG_NAME)? {
            return Err(repo::Error::NoRepository(backend.location()).into());
        }
        let password = crate::repo_open::password(cli, false)?;
        let counter = Arc::new(CountingBackend {
            inner: backend,
            pack_bytes: AtomicU64::new(0),
        });
        let repo = Repository::open(counter.clone(), &password)?;
        let repo: &'static Repository = Box::leak(Box::new(repo));
        // Shared lock: a prune cannot delete packs while we read them.
        let lock = repo::lock::acquire(repo, false, "granular read")?;
        let index: &'static Index = Box::leak(Box::new(repo.load_index()?));
        Ok(OpenRepo {
            repo,
            index,
            counter,
            _lock: lock,
        })
    }

    /// Bytes of pack data read so far.
    pub fn pack_bytes(&self) -> u64 {
        self.counter.pack_bytes.load(Ordering::Relaxed)
    }

    /// The disks of a snapshot, in manifest order.
    pub fn disks(&self, snap: &Snapshot) -> Result<Vec<NamedDisk>> {
        snap.disks
            .iter()
            .map(|d| {
                let disk = SnapshotDisk::open(self.repo, self.index, d)?;
                Ok(NamedDisk {
                    name: d.name.clone(),
                    disk: Arc::new(disk),
                })
            })
            .collect()
    }
}

pub struct NamedDisk {
    pub name: String,
    pub disk: Arc<dyn VirtualDisk>,
}

/// What `SNAPSHOT|DISKFILE` named.
pub struct Source {
    /// "snapshot 1a2b3c4d (VM x)" or the file's path, for messages.
    pub describe: String,
    pub disks: Vec<NamedDisk>,
    pub repo: Option<OpenRepo>,
}

/// An existing file is a disk file (any format vdisk reads); anything else is a snapshot spec.
pub fn open_source(cli: &Cli, spec: &str, vm: Option<&str>) -> Result<Source> {
    let path = Path::new(spec);
    if path.is_file() {
        let disk = vdisk::open(path, &vdisk::OpenOptions::default())?;
        return Ok(Source {
            describe: path.display().to_string(),
            disks: vec![NamedDisk {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.to_string()),
                disk: Arc::from(disk),
            }],
            repo: None,
        });
    }
    if path.exists() {
        bail!("{spec} is not a disk file (a directory?)\nhint: give a disk file (VHDX, VHD, raw) or a snapshot id / `latest`");
    }
    let repo = OpenRepo::open(cli).map_err(|e| {
        if cli.repo.is_none() {
            anyhow!("{spec} is neither an existing disk file nor, without --repo, a snapshot\nhint: give a disk file, or --repo LOCATION with a snapshot id or `latest`")
        } else {
            e
        }
    })?;
    let (id, snap) = find_snapshot(repo.repo, spec, vm)?;
    Ok(Source {
        describe: format!("snapshot {} (VM {})", short_id(&id), snap.vm),
        disks: repo.disks(&snap)?,
        repo: Some(repo),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct LayoutPartition {
    pub partition: u32,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub type_name: String,
    /// Filesystem recognised, or null.
    pub filesystem: Option<guestfs::fs::FsKind>,
    pub label: Option<String>,
    /// Why no filesystem was recognised.
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayoutDisk {
    pub disk: usize,
    pub name: String,
    pub size: u64,
    pub table: guestfs::TableKind,
    pub partitions: Vec<LayoutPartition>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Layout {
    pub source: String,
    pub disks: Vec<LayoutDisk>,
}

impl Layout {
    pub fn render(&self) -> String {
        let mut cols = crate::repo_cmd::Columns::new(
            &[
                "DISK",
                "PART",
                "START",
                "SIZE",
                "TYPE",
                "FILESYSTEM",
                "LABEL",
            ],
            &[0, 1, 2, 3],
        );
        for d in &self.disks {
            for p in &d.partitions {
                cols.push(vec![
                    d.disk.to_string(),
                    p.partition.to_string(),
                    p.start.to_string(),
                    human(p.size),
                    p.type_name.clone(),
                    p.filesystem
                        .map(|k| format!("{k:?}").to_lowercase())
                        .unwrap_or_else(|| "-".into()),
                    p.label.clone().unwrap_or_default(),
                ]);
            }
        }
        let names: Vec<String> = self
            .disks
            .iter()
            .map(|d| format!("disk {}: {} ({})", d.disk, d.name, human(d.size)))
            .collect();
        format!("{}\n{}", names.join("\n"), cols.render())
    }
}

/// The filesystem picked, and where it is.
pub struct Picked {
    pub fs: Box<dyn GuestFs>,
    pub disk: usize,
    pub partition: u32,
}

pub enum Selection {
    One(Picked),
    /// Several filesystems (or none): the user must choose.
    Choose(Layout),
}

/// Pick the filesystem: `--disk N` (1-based, in the snapshot's order) and `--partition N` (as
/// `ls` lists them); either may be left out when only one candidate has a filesystem.
pub fn select(src: &Source, disk: Option<usize>, partition: Option<u32>) -> Result<Selection> {
    if let Some(d) = disk {
        if d == 0 || d > src.disks.len() {
            bail!(
                "{} has {} disk(s); --disk {d} does not exist (disks count from 1)",
                src.describe,
                src.disks.len()
            );
        }
    }
    let mut layout = Layout {
        source: src.describe.clone(),
        disks: Vec::new(),
    };
    let mut found: Vec<Picked> = Vec::new();
    for (i, nd) in src.disks.iter().enumerate() {
        let num = i + 1;
        if disk.is_some_and(|d| d != num) {
            continue;
        }
        let table = guestfs::partitions(nd.disk.as_ref())?;
        if let Some(p) = partition {
            if table.get(p).is_none() {
                bail!(
                    "disk {num} ({}) has no partition {p}; it has {}",
                    nd.name,
                    table
                        .partitions
                        .iter()
                        .map(|p| p.index.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let mut ld = LayoutDisk {
            disk: num,
            name: nd.name.clone(),
            size: nd.disk.geometry().virtual_size,
            table: table.kind,
            partitions: Vec::new(),
        };
        for p in &table.partitions {
            if partition.is_some_and(|n| n != p.index) {
                continue;
            }
            let opened = p.volume(nd.disk.clone()).and_then(guestfs::open_fs);
            let (filesystem, label, note) = match &opened {
                Ok(fs) => (Some(fs.kind()), fs.label(), None),
                Err(e) => (None, None, Some(e.to_string())),
            };
            ld.partitions.push(LayoutPartition {
                partition: p.index,
                start: p.start,
                size: p.length,
                type_name: p.type_description(),
                filesystem,
                label,
                note,
            });
            if let Ok(fs) = opened {
                found.push(Picked {
                    fs,
                    disk: num,
                    partition: p.index,
                });
            } else if let (Some(_), Err(e)) = (partition, opened) {
                // The user named this partition: say why it cannot be read.
                return Err(anyhow::Error::new(e)
                    .context(format!("partition {} of disk {num} ({})", p.index, nd.name)));
            }
        }
        layout.disks.push(ld);
    }
    if found.len() == 1 {
        return Ok(Selection::One(found.pop().expect("one")));
    }
    Ok(Selection::Choose(layout))
}

/// [`select`], but a command that needs one filesystem fails with the layout in its message.
pub fn select_one(src: &Source, disk: Option<usize>, partition: Option<u32>) -> Result<Picked> {
    match select(src, disk, partition)? {
        Selection::One(p) => Ok(p),
        Selection::Choose(layout) => {
            let n: usize = layout
                .disks
                .iter()
                .flat_map(|d| &d.partitions)
                .filter(|p| p.filesystem.is_some())
                .count();
            let what = if n == 0 {
                "no readable filesystem was found"
            } else {
                "several filesystems were found"
            };
            bail!(
                "{}: {what}\n{}\nhint: pick one with --disk N and --partition N",
                src.describe,
                layout.render().trim_end()
            )
        }
    }
}

/// Nanoseconds since the epoch as RFC 3339 (UTC), for JSON.
pub fn rfc3339(ns: Option<i128>) -> Option<String> {
    let ns = ns?;
    let secs = i64::try_from(ns.div_euclid(1_000_000_000)).ok()?;
    let sub = ns.rem_euclid(1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, sub)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// Nanoseconds since the epoch in local time, to the second, for people.
pub fn local(ns: Option<i128>) -> String {
    match rfc3339(ns) {
        Some(s) => crate::repo_cmd::local_time(&s),
        None => "-".into(),
    }
}
