//! `hyperkeep mount SNAPSHOT|DISKFILE MOUNTPOINT`: a read-only FUSE view of a backup's disks,
//! partitions and guest files, read through the snapshot's chunk table (only the chunks a read
//! touches are fetched), or of a live disk file.
//!
//! Layout under the mount point:
//! - `/<file>`: the snapshot's other files (`.vmcx`, `.vmrs`, ...), as backed up;
//! - `/<disk name>/disk`: the whole virtual disk, one read-only file of its virtual size;
//! - `/<disk name>/p<N>/`: partition N's guest filesystem (only partitions whose filesystem we
//!   recognise), with sizes, times, modes (ext) and symlink/junction targets as stored in the
//!   guest (never resolved on the host). A disk without a partition table shows its filesystem
//!   as `p1`.
//!
//! Extended attributes: ext xattrs keep their names (`user.comment`); NTFS alternate data streams
//! appear as `user.<stream name>` (the convention of ntfs-3g's `streams_interface=xattr`). The
//! kernel caps an xattr value at 64 KiB: a larger stream answers `E2BIG`; read it with
//! `hyperkeep restore --include`.
//!
//! Inodes are handed out on first sight from a table keyed by (disk, partition, guest node), so
//! a file keeps its inode for the life of the mount and hard links share one. fuser's session
//! loop is single-threaded; every request that may touch the disk is handed to a small worker
//! pool with its reply, so a slow read does not stall `ls` in another window.
//!
//! A damaged image or repository never takes the mount down: a failing read answers `EIO`
//! (`EOPNOTSUPP` for an encoding hyperkeep cannot decode, such as WOF-compressed files) and the
//! reason is logged on stderr. The snapshot stays locked (shared) while mounted, so a prune
//! cannot delete packs under a reader.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fuser::{
    FileAttr, FileType as FuseType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use guestfs::fs::{FileType, GuestFs, Metadata, NodeId};
use repo::crypto::Id;
use repo::index::Index;
use repo::repository::Repository;
use serde::Serialize;
use vdisk::VirtualDisk;

use crate::cli::Cli;
use crate::EXIT_OK;

/// How long the kernel may cache names and attributes: the view never changes while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Worker threads serving requests (the machine's reads are mostly I/O and decryption).
const WORKERS: usize = 4;
/// Directory listings kept for lookups; beyond this the cache is emptied (bounded memory on a
/// volume with millions of directories).
const MAX_CACHED_DIRS: usize = 1024;
/// The kernel's largest extended-attribute value.
const XATTR_SIZE_MAX: usize = 65536;
/// Largest single read the kernel asks for is far below this; a guard against absurd sizes.
const MAX_READ: u32 = 16 << 20;

/// What `--json` prints once the filesystem is mounted.
#[derive(Serialize, Debug)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    /// `snapshot` or `disk file`.
    pub source_kind: &'static str,
    pub source: String,
    pub vm: Option<String>,
    pub time: Option<String>,
    pub disks: Vec<DiskInfoOut>,
    pub files: Vec<FileOut>,
}

#[derive(Serialize, Debug)]
pub struct DiskInfoOut {
    pub name: String,
    /// The whole-disk file, relative to the mount point.
    pub path: String,
    pub virtual_size: u64,
    /// `gpt`, `mbr`, `none`, or null when the partition table could not be read.
    pub table: Option<String>,
    pub partitions: Vec<PartitionOut>,
    /// Partitions not shown, and why (no recognised filesystem, damaged table...).
    pub skipped: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct PartitionOut {
    pub index: u32,
    pub path: String,
    pub start: u64,
    pub length: u64,
    pub filesystem: guestfs::fs::FsKind,
    pub label: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct FileOut {
    pub name: String,
    pub path: String,
    pub size: u64,
}

struct DiskView {
    name: String,
    disk: Arc<dyn VirtualDisk>,
    parts: Vec<PartView>,
}

struct PartView {
    index: u32,
    fs: Box<dyn GuestFs>,
}

/// A snapshot's non-disk file: its chunks in the repository.
struct ConfigFile {
    name: String,
    size: u64,
    mtime: SystemTime,
    chunks: Vec<Id>,
}

/// The repository a snapshot mount reads its files from. Leaked on purpose: the mount lives until
/// the process ends, and the snapshot disks borrow it.
struct ChunkSource {
    repo: &'static Repository,
    index: &'static Index,
    chunk_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Root,
    Config(usize),
    DiskDir(usize),
    DiskImage(usize),
    Guest {
        disk: usize,
        part: usize,
        node: NodeId,
    },
}

struct InodeTable {
    /// Inode `i + 1` is `kinds[i]`.
    kinds: Vec<Kind>,
    by_kind: HashMap<Kind, u64>,
}

impl InodeTable {
    fn ino(&mut self, kind: Kind) -> u64 {
        if let Some(&i) = self.by_kind.get(&kind) {
            return i;
        }
        self.kinds.push(kind);
        let ino = self.kinds.len() as u64;
        self.by_kind.insert(kind, ino);
        ino
    }
}

struct Listing {
    entries: Vec<(String, u64, FuseType)>,
    by_name: HashMap<String, usize>,
}

impl Listing {
    fn new() -> Listing {
        Listing {
            entries: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    /// Names the host cannot show ('/' or NUL inside, "." and "..") and repeats (a damaged or
    /// case-folded directory) are left out, with a log line.
    fn push(&mut self, name: String, ino: u64, kind: FuseType) {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            tracing::warn!(name = %name.escape_debug(), "guest name cannot be shown on the host; skipped");
            return;
        }
        if self.by_name.contains_key(&name) {
            tracing::warn!(name = %name.escape_debug(), "name appears twice in a guest directory; the first is shown");
            return;
        }
        self.by_name.insert(name.clone(), self.entries.len());
        self.entries.push((name, ino, kind));
    }
}

/// Last repository chunk read for a config file: (file, chunk, bytes); sequential reads of a
/// file come in pieces smaller than a chunk.
type CachedChunk = (usize, u64, Arc<Vec<u8>>);

struct Inner {
    disks: Vec<DiskView>,
    files: Vec<ConfigFile>,
    chunks: Option<ChunkSource>,
    inodes: Mutex<InodeTable>,
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    file_cache: Mutex<Option<CachedChunk>>,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An errno with the reason logged: what the FUSE caller sees is only the number.
fn errno(e: &guestfs::Error, what: &str) -> i32 {
    match e {
        guestfs::Error::NotFound(_) => libc::ENOENT,
        guestfs::Error::NotADirectory(_) => libc::ENOTDIR,
        // An encoding we do not decode (e.g. WOF/CompactOS): say so rather than "I/O error".
        guestfs::Error::Unsupported { .. } => {
            tracing::warn!("{what}: {e}");
            libc::EOPNOTSUPP
        }
        _ => {
            tracing::error!("{what}: {e}");
            libc::EIO
        }
    }
}

fn ns_to_time(ns: Option<i128>) -> Option<SystemTime> {
    let ns = ns?;
    let secs = ns.div_euclid(1_000_000_000);
    let sub = ns.rem_euclid(1_000_000_000) as u32;
    let secs_u = u64::try_from(secs.unsigned_abs()).ok()?;
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs_u, sub))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs_u))?
            .checked_add(Duration::from_nanos(u64::from(sub)))
    }
}

fn fuse_type(ft: FileType, mode: Option<u32>) -> FuseType {
    match ft {
        FileType::File => FuseType::RegularFile,
        FileType::Directory => FuseType::Directory,
        FileType::Symlink | FileType::Junction => FuseType::Symlink,
        FileType::Other => match mode.map(|m| m & libc::S_IFMT) {
            Some(libc::S_IFIFO) => FuseType::NamedPipe,
            Some(libc::S_IFCHR) => FuseType::CharDevice,
            Some(libc::S_IFBLK) => FuseType::BlockDevice,
            Some(libc::S_IFSOCK) => FuseType::Socket,
            // A reparse point we cannot show: an empty file, so it is listed but holds no data.
            _ => FuseType::RegularFile,
        },
    }
}

impl Inner {
    fn kind(&self, ino: u64) -> Option<Kind> {
        let t = lock(&self.inodes);
        ino.checked_sub(1)
            .and_then(|i| t.kinds.get(i as usize))
            .copied()
    }

    fn ino(&self, kind: Kind) -> u64 {
        lock(&self.inodes).ino(kind)
    }

    fn synthetic(&self, ino: u64, kind: FuseType, size: u64, mtime: SystemTime) -> FileAttr {
        let dir = kind == FuseType::Directory;
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: if dir { 0o555 } else { 0o444 },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        let kind = self.kind(ino).ok_or(libc::ENOENT)?;
        let t = self.mounted_at;
        Ok(match kind {
            Kind::Root | Kind::DiskDir(_) => self.synthetic(ino, FuseType::Directory, 0, t),
            Kind::Config(i) => {
                let f = &self.files[i];
                self.synthetic(ino, FuseType::RegularFile, f.size, f.mtime)
            }
            Kind::DiskImage(d) => {
                let size = self.disks[d].disk.geometry().virtual_size;
                self.synthetic(ino, FuseType::RegularFile, size, t)
            }
            Kind::Guest { disk, part, node } => {
                let fs = &self.disks[disk].parts[part].fs;
                let md = fs
                    .metadata(node)
                    .map_err(|e| errno(&e, &format!("metadata of guest node {node}")))?;
                self.guest_attr(ino, fs.as_ref(), node, &md)?
            }
        })
    }

    fn guest_attr(
        &self,
        ino: u64,
        fs: &dyn GuestFs,
        node: NodeId,
        md: &Metadata,
    ) -> Result<FileAttr, i32> {
        let kind = fuse_type(md.file_type, md.mode);
        let size = match kind {
            // POSIX: a symlink's size is its target's length.
            FuseType::Symlink => fs
                .read_link(node)
                .map(|l| l.target.len() as u64)
                .unwrap_or(0),
            FuseType::RegularFile | FuseType::Directory => md.size,
            _ => 0,
        };
        let default_perm = match kind {
            FuseType::Directory => 0o555,
            FuseType::Symlink => 0o777,
            _ => 0o444,
        };
        let mtime = ns_to_time(md.mtime).unwrap_or(UNIX_EPOCH);
        Ok(FileAttr {
            ino,
            size,
            blocks: md.allocated.div_ceil(512),
            atime: ns_to_time(md.atime).unwrap_or(mtime),
            mtime,
            ctime: ns_to_time(md.ctime).unwrap_or(mtime),
            crtime: ns_to_time(md.btime).unwrap_or(mtime),
            kind,
            perm: md.mode.map(|m| (m & 0o7777) as u16).unwrap_or(default_perm),
            nlink: md.nlink.max(1),
            uid: md.uid.unwrap_or(self.uid),
            gid: md.gid.unwrap_or(self.gid),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn listing(&self, ino: u64) -> Result<Arc<Listing>, i32> {
        if let Some(l) = lock(&self.dirs).get(&ino) {
            return Ok(l.clone());
        }
        let kind = self.kind(ino).ok_or(libc::ENOENT)?;
        let mut l = Listing::new();
        match kind {
            Kind::Root => {
                for (i, f) in self.files.iter().enumerate() {
                    l.push(
                        f.name.clone(),
                        self.ino(Kind::Config(i)),
                        FuseType::RegularFile,
                    );
                }
                for (i, d) in self.disks.iter().enumerate() {
                    l.push(
                        d.name.clone(),
                        self.ino(Kind::DiskDir(i)),
                        FuseType::Directory,
                    );
                }
            }
            Kind::DiskDir(d) => {
                l.push(
                    "disk".into(),
                    self.ino(Kind::DiskImage(d)),
                    FuseType::RegularFile,
                );
                for (pi, p) in self.disks[d].parts.iter().enumerate() {
                    let root = Kind::Guest {
                        disk: d,
                        part: pi,
                        node: p.fs.root(),
                    };
                    l.push(format!("p{}", p.index), self.ino(root), FuseType::Directory);
                }
            }
            Kind::Guest { disk, part, node } => {
                let fs = &self.disks[disk].parts[part].fs;
                let entries = fs
                    .read_dir(node)
                    .map_err(|e| errno(&e, &format!("listing guest directory {node}")))?;
                for e in entries {
                    let ft = match e.file_type {
                        FileType::Other => fs
                            .metadata(e.node)
                            .map(|m| fuse_type(m.file_type, m.mode))
                            .unwrap_or(FuseType::RegularFile),
                        t => fuse_type(t, None),
                    };
                    let child = self.ino(Kind::Guest {
                        disk,
                        part,
                        node: e.node,
                    });
                    l.push(e.name, child, ft);
                }
            }
            Kind::Config(_) | Kind::DiskImage(_) => return Err(libc::ENOTDIR),
        }
        let l = Arc::new(l);
        let mut dirs = lock(&self.dirs);
        if dirs.len() >= MAX_CACHED_DIRS {
            dirs.clear();
        }
        dirs.insert(ino, l.clone());
        Ok(l)
    }

    fn parent_of(&self, ino: u64) -> u64 {
        // ".." is answered by the kernel from its dentry cache; the readdir entry only needs a
        // plausible inode.
        ino
    }

    fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let kind = self.kind(ino).ok_or(libc::ENOENT)?;
        let size = size.min(MAX_READ) as u64;
        match kind {
            Kind::Root | Kind::DiskDir(_) => Err(libc::EISDIR),
            Kind::DiskImage(d) => {
                let disk = &self.disks[d].disk;
                let end = offset
                    .saturating_add(size)
                    .min(disk.geometry().virtual_size);
                if offset >= end {
                    return Ok(Vec::new());
                }
                let mut buf = vec![0u8; (end - offset) as usize];
                disk.read_at(&mut buf, offset).map_err(|e| {
                    tracing::error!("disk {} at offset {offset}: {e}", self.disks[d].name);
                    libc::EIO
                })?;
                Ok(buf)
            }
            Kind::Config(i) => self.read_config(i, offset, size),
            Kind::Guest { disk, part, node } => {
                let fs = &self.disks[disk].parts[part].fs;
                let mut buf = vec![0u8; size as usize];
                let mut done = 0usize;
                while done < buf.len() {
                    let n = fs
                        .read_at(node, None, &mut buf[done..], offset + done as u64)
                        .map_err(|e| {
                            errno(&e, &format!("reading guest node {node} at {offset}"))
                        })?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                buf.truncate(done);
                Ok(buf)
            }
        }
    }

    fn read_config(&self, i: usize, offset: u64, size: u64) -> Result<Vec<u8>, i32> {
        let f = &self.files[i];
        let src = self.chunks.as_ref().ok_or(libc::EIO)?;
        let end = offset.saturating_add(size).min(f.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let c = pos / src.chunk_size;
            let within = (pos - c * src.chunk_size) as usize;
            let n = ((c + 1) * src.chunk_size).min(end) - pos;
            let id = *f.chunks.get(c as usize).ok_or_else(|| {
                tracing::error!("file {} has no chunk {c} in its manifest", f.name);
                libc::EIO
            })?;
            if id.is_zero() {
                out.resize(out.len() + n as usize, 0);
            } else {
                let cached = match &*lock(&self.file_cache) {
                    Some((fi, ci, d)) if *fi == i && *ci == c => Some(d.clone()),
                    _ => None,
                };
                let data = match cached {
                    Some(d) => d,
                    None => {
                        let d = Arc::new(src.repo.read_chunk(src.index, &id).map_err(|e| {
                            tracing::error!("file {} chunk {c}: {e}", f.name);
                            libc::EIO
                        })?);
                        *lock(&self.file_cache) = Some((i, c, d.clone()));
                        d
                    }
                };
                let piece = data.get(within..within + n as usize).ok_or_else(|| {
                    tracing::error!(
                        "file {} chunk {c} is shorter than the manifest says",
                        f.name
                    );
                    libc::EIO
                })?;
                out.extend_from_slice(piece);
            }
            pos += n;
        }
        Ok(out)
    }

    /// The stream behind an xattr name: ext xattrs by their own name, NTFS streams as
    /// `user.<stream>`.
    fn xattr_names(&self, ino: u64) -> Result<Vec<(String, String)>, i32> {
        let Some(Kind::Guest { disk, part, node }) = self.kind(ino) else {
            return Ok(Vec::new());
        };
        let fs = &self.disks[disk].parts[part].fs;
        let md = fs
            .metadata(node)
            .map_err(|e| errno(&e, &format!("metadata of guest node {node}")))?;
        let mut out: Vec<(String, String)> =
            md.xattrs.iter().map(|x| (x.clone(), x.clone())).collect();
        out.extend(
            md.streams
                .iter()
                .map(|s| (format!("user.{}", s.name), s.name.clone())),
        );
        Ok(out)
    }

    fn xattr_value(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, i32> {
        let name = name.to_str().ok_or(libc::ENODATA)?;
        let names = self.xattr_names(ino)?;
        let (_, stream) = names.iter().find(|(x, _)| x == name).ok_or(libc::ENODATA)?;
        let Some(Kind::Guest { disk, part, node }) = self.kind(ino) else {
            return Err(libc::ENODATA);
        };
        let fs = &self.disks[disk].parts[part].fs;
        // One byte more than the kernel accepts tells us the value is too large.
        let mut buf = vec![0u8; XATTR_SIZE_MAX + 1];
        let mut done = 0;
        while done < buf.len() {
            let n = fs
                .read_at(node, Some(stream), &mut buf[done..], done as u64)
                .map_err(|e| errno(&e, &format!("stream {stream} of guest node {node}")))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        if done > XATTR_SIZE_MAX {
            return Err(libc::E2BIG);
        }
        buf.truncate(done);
        Ok(buf)
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The FUSE side: hands each request with its reply to the worker pool.
struct MountFs {
    inner: Arc<Inner>,
    jobs: mpsc::Sender<Job>,
}

impl MountFs {
    fn new(inner: Arc<Inner>) -> Result<MountFs> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("hyperkeep-mount-{i}"))
                .spawn(move || loop {
                    let job = match lock(&rx).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    // A bug must not kill the worker; the dropped reply answers EIO.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a mount request failed unexpectedly; answered EIO");
                    }
                })
                .context("cannot start the mount's worker threads")?;
        }
        Ok(MountFs { inner, jobs: tx })
    }

    fn spawn(&self, f: impl FnOnce(&Inner) + Send + 'static) {
        let inner = self.inner.clone();
        // The workers live as long as `self`; a failed send can only happen at shutdown and
        // drops the reply, which answers EIO.
        let _ = self.jobs.send(Box::new(move || f(&inner)));
    }
}

impl Filesystem for MountFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn(move |fs| {
            let found = fs.listing(parent).and_then(|l| {
                let name = name.to_str().ok_or(libc::ENOENT)?;
                let i = *l.by_name.get(name).ok_or(libc::ENOENT)?;
                fs.attr(l.entries[i].1)
            });
            match found {
                Ok(attr) => reply.entry(&TTL, &attr, 0),
                Err(e) => reply.error(e),
            }
        });
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.spawn(move |fs| match fs.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        self.spawn(move |fs| match fs.kind(ino) {
            Some(Kind::Guest { disk, part, node }) => {
                match fs.disks[disk].parts[part].fs.read_link(node) {
                    Ok(l) => reply.data(l.target.as_bytes()),
                    Err(e) => reply.error(errno(&e, &format!("link target of node {node}"))),
                }
            }
            Some(_) => reply.error(libc::EINVAL),
            None => reply.error(libc::ENOENT),
        });
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            reply.error(libc::EROFS);
        } else {
            reply.opened(0, 0);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            reply.error(libc::EINVAL);
            return;
        };
        self.spawn(move |fs| match fs.read(ino, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(move |fs| {
            let l = match fs.listing(ino) {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let dots = [
                (".", ino, FuseType::Directory),
                ("..", fs.parent_of(ino), FuseType::Directory),
            ];
            let all = dots
                .iter()
                .map(|(n, i, k)| (*n, *i, *k))
                .chain(l.entries.iter().map(|(n, i, k)| (n.as_str(), *i, *k)));
            for (pos, (name, child, kind)) in all.enumerate().skip(offset.max(0) as usize) {
                if reply.add(child, pos as i64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks: u64 = self
            .inner
            .disks
            .iter()
            .map(|d| d.disk.geometry().virtual_size / 4096)
            .sum();
        let files = lock(&self.inner.inodes).kinds.len() as u64;
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let name = name.to_owned();
        self.spawn(move |fs| match fs.xattr_value(ino, &name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(libc::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        self.spawn(move |fs| match fs.xattr_names(ino) {
            Ok(names) => {
                let mut v = Vec::new();
                for (n, _) in names {
                    v.extend_from_slice(n.as_bytes());
                    v.push(0);
                }
                if size == 0 {
                    reply.size(v.len() as u32);
                } else if v.len() > size as usize {
                    reply.error(libc::ERANGE);
                } else {
                    reply.data(&v);
                }
            }
            Err(e) => reply.error(e),
        });
    }
}

/// Open every partition of a disk that holds a filesystem we read.
fn open_disk(name: String, disk: Arc<dyn VirtualDisk>) -> (DiskView, DiskInfoOut) {
    let mut out = DiskInfoOut {
        path: format!("{name}/disk"),
        name: name.clone(),
        virtual_size: disk.geometry().virtual_size,
        table: None,
        partitions: Vec::new(),
        skipped: Vec::new(),
    };
    let mut parts = Vec::new();
    match guestfs::partitions(disk.as_ref()) {
        Ok(table) => {
            out.table = Some(
                match table.kind {
                    guestfs::TableKind::Gpt => "gpt",
                    guestfs::TableKind::Mbr => "mbr",
                    guestfs::TableKind::None => "none",
                }
                .to_string(),
            );
            out.skipped.extend(table.warnings.iter().cloned());
            for p in &table.partitions {
                let opened = p.volume(disk.clone()).and_then(guestfs::open_fs);
                match opened {
                    Ok(fs) => {
                        out.partitions.push(PartitionOut {
                            index: p.index,
                            path: format!("{name}/p{}", p.index),
                            start: p.start,
                            length: p.length,
                            filesystem: fs.kind(),
                            label: fs.label(),
                        });
                        parts.push(PartView { index: p.index, fs });
                    }
                    Err(e) => {
                        tracing::info!("disk {name} partition {}: {e}", p.index);
                        out.skipped.push(format!(
                            "partition {} ({}): {e}",
                            p.index,
                            p.type_description()
                        ));
                    }
                }
            }
        }
        Err(e) => out
            .skipped
            .push(format!("partition table cannot be read: {e}")),
    }
    (DiskView { name, disk, parts }, out)
}

/// Block the termination signals in this thread and every thread started after it, so that
/// [`wait_for_signal`] receives them instead of the default action killing us mid-mount.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        // A shell starts background jobs with SIGINT ignored; an ignored signal is discarded,
        // never pending, so restore the default action (it stays blocked, so it never runs).
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is initialised; a null info pointer is allowed.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// Mount and serve until unmounted (`fusermount3 -u`, `umount`) or interrupted.
pub fn run(cli: &Cli, source: &str, mountpoint: &Path, vm: Option<&str>) -> Result<u8> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse does not exist: FUSE is not available here\nhint: load the fuse module (modprobe fuse) or run where FUSE is allowed");
    }
    if !mountpoint.is_dir() {
        bail!(
            "mount point {} is not a directory\nhint: create an empty directory and name it",
            mountpoint.display()
        );
    }
    let mut _lock = None;
    let mut disks = Vec::new();
    let mut files = Vec::new();
    let mut info = MountInfo {
        mountpoint: std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_path_buf()),
        source_kind: "snapshot",
        source: source.to_string(),
        vm: None,
        time: None,
        disks: Vec::new(),
        files: Vec::new(),
    };
    let source_path = Path::new(source);
    let chunks;
    let signals;
    if source_path.is_file() {
        signals = block_signals();
        info.source_kind = "disk file";
        let disk = vdisk::open(source_path, &vdisk::OpenOptions::default())
            .with_context(|| format!("cannot open the disk {source}"))?;
        let name = source_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let (view, out) = open_disk(name, Arc::from(disk));
        disks.push(view);
        info.disks.push(out);
        chunks = None;
    } else {
        let repo = crate::repo_open::open(cli)?;
        // Before the lock's refresher thread starts: every later thread inherits the mask.
        signals = block_signals();
        let repo: &'static Repository = Box::leak(Box::new(repo));
        _lock = Some(repo::lock::Lock::acquire(repo, false, "mount")?);
        let (id, snap) = repo::snapshot::find_snapshot(repo, source, vm)?;
        let index: &'static Index = Box::leak(Box::new(repo.load_index()?));
        info.source = id.clone();
        info.vm = Some(snap.vm.clone());
        info.time = Some(snap.time.clone());
        for entry in &snap.disks {
            let disk = repo::restore::SnapshotDisk::open(repo, index, entry)?;
            let (view, out) = open_disk(entry.name.clone(), Arc::new(disk));
            disks.push(view);
            info.disks.push(out);
        }
        for f in &snap.files {
            let mtime = f
                .mtime
                .as_deref()
                .and_then(repo::snapshot::parse_time)
                .map(SystemTime::from)
                .unwrap_or(UNIX_EPOCH);
            info.files.push(FileOut {
                name: f.name.clone(),
                path: f.name.clone(),
                size: f.size,
            });
            files.push(ConfigFile {
                name: f.name.clone(),
                size: f.size,
                mtime,
                chunks: f.chunks.clone(),
            });
        }
        chunks = Some(ChunkSource {
            repo,
            index,
            chunk_size: u64::from(repo.config().chunk_size.max(1)),
        });
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let inner = Arc::new(Inner {
        disks,
        files,
        chunks,
        inodes: Mutex::new(InodeTable {
            kinds: vec![Kind::Root],
            by_kind: HashMap::from([(Kind::Root, 1)]),
        }),
        dirs: Mutex::new(HashMap::new()),
        file_cache: Mutex::new(None),
        mounted_at: SystemTime::now(),
        uid,
        gid,
    });
    let fs = MountFs::new(inner)?;
    let options = [
        MountOption::RO,
        MountOption::FSName("hyperkeep".into()),
        MountOption::Subtype("hyperkeep".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::DefaultPermissions,
    ];
    let mut session = fuser::Session::new(fs, mountpoint, &options).with_context(|| {
        format!(
            "cannot mount on {}\nhint: FUSE needs the fusermount3 program (Debian package fuse3) and an empty directory you own",
            mountpoint.display()
        )
    })?;
    let mut unmounter = session.unmount_callable();
    let serving = std::thread::Builder::new()
        .name("hyperkeep-mount".into())
        .spawn(move || {
            let r = session.run();
            if r.is_ok() {
                // Unmounted from outside (fusermount3 -u): dropping the session would try to
                // unmount again and log a spurious error; the process ends right after.
                std::mem::forget(session);
            }
            r
        })
        .context("cannot start the mount's session thread")?;

    if cli.json {
        crate::repo_cmd::print_json(&info)?;
    } else {
        print_human(&info);
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let mut unmount_asked: Option<Instant> = None;
    let mut lazy_done = false;
    while !serving.is_finished() {
        if let Some(sig) = wait_for_signal(&signals, Duration::from_millis(200)) {
            if unmount_asked.is_some() {
                eprintln!("second signal {sig}: leaving now (lazy unmount)");
                lazy_unmount(&info.mountpoint);
                return Ok(crate::EXIT_ERROR);
            }
            tracing::info!(signal = sig, "unmounting");
            let _ = unmounter.unmount();
            unmount_asked = Some(Instant::now());
        }
        // A busy mount point (a shell inside it) refuses a plain unmount: detach it instead so
        // the process can end; the kernel finishes once the last user leaves.
        if let Some(t) = unmount_asked {
            if !lazy_done && t.elapsed() > Duration::from_secs(3) {
                lazy_unmount(&info.mountpoint);
                lazy_done = true;
            }
        }
    }
    match serving.join() {
        Ok(Ok(())) => Ok(EXIT_OK),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the FUSE session failed")),
        Err(_) => bail!("the FUSE session thread failed unexpectedly"),
    }
}

fn lazy_unmount(mountpoint: &Path) {
    for prog in ["fusermount3", "fusermount"] {
        if std::process::Command::new(prog)
            .args(["-u", "-z"])
            .arg(mountpoint)
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
    }
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(mountpoint)
        .status();
}

fn print_human(info: &MountInfo) {
    let vm = info
        .vm
        .as_deref()
        .map(|v| format!(" (VM {v})"))
        .unwrap_or_default();
    println!(
        "mounted {} {}{} read-only on {}",
        info.source_kind,
        info.source,
        vm,
        info.mountpoint.display()
    );
    for f in &info.files {
        println!("  {}  ({})", f.path, crate::size::human(f.size));
    }
    for d in &info.disks {
        println!(
            "  {}  (whole disk, {})",
            d.path,
            crate::size::human(d.virtual_size)
        );
        for p in &d.partitions {
            let label = p
                .label
                .as_deref()
                .map(|l| format!(", label {l}"))
                .unwrap_or_default();
            println!(
                "  {}/  ({:?}{}, {})",
                p.path,
                p.filesystem,
                label,
                crate::size::human(p.length)
            );
        }
        for s in &d.skipped {
            println!("  {}: not shown: {s}", d.name);
        }
    }
    println!(
        "press Ctrl-C or run `fusermount3 -u {}` to unmount",
        info.mountpoint.display()
    );
}
