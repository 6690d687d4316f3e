//! The interface every guest filesystem implements.

use serde::Serialize;

use crate::Result;

/// A file's identity inside one filesystem (NTFS MFT record number, ext inode, FAT: first
/// cluster/dirent position encoded by the implementation). Stable for the life of the open
/// filesystem.
pub type NodeId = u64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    #[default]
    File,
    Directory,
    Symlink,
    /// NTFS junction / mount point.
    Junction,
    /// Devices, fifos, sockets (ext) and other reparse points: listed, never restored as data.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirEntry {
    /// The name as stored, converted to UTF-8 (unpaired UTF-16 surrogates become U+FFFD and the
    /// entry is flagged by `name_lossy`).
    pub name: String,
    pub name_lossy: bool,
    pub node: NodeId,
    pub file_type: FileType,
}

/// Timestamps as nanoseconds since the Unix epoch (UTC); `None` when the filesystem has none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub node: NodeId,
    pub file_type: FileType,
    /// Size of the main data stream in bytes.
    pub size: u64,
    /// Bytes actually allocated on the volume (sparse/compressed files use less).
    pub allocated: u64,
    pub mtime: Option<i128>,
    pub atime: Option<i128>,
    pub ctime: Option<i128>,
    pub btime: Option<i128>,
    /// Unix mode bits (ext) or None.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Windows attribute bits (NTFS/FAT/exFAT: read-only 0x1, hidden 0x2, system 0x4, archive
    /// 0x20, sparse 0x200, reparse 0x400, compressed 0x800, ...).
    pub windows_attributes: Option<u32>,
    pub nlink: u32,
    /// Alternate data streams (NTFS) / extended attributes (ext) names, for listing.
    pub streams: Vec<StreamInfo>,
    pub xattrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub size: u64,
}

/// Where a symlink or junction points, as stored in the guest (never resolved on the host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkTarget {
    pub target: String,
    /// NTFS: the substitute name/print name distinction, relative flag, junction vs symlink.
    pub detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ntfs,
    Fat12,
    Fat16,
    Fat32,
    Exfat,
    Ext2,
    Ext3,
    Ext4,
}

/// A guest filesystem opened read-only. All methods take `&self` (implementations cache with
/// interior locking) so one open filesystem serves many readers (FUSE, parallel restore).
pub trait GuestFs: Send + Sync {
    fn kind(&self) -> FsKind;
    fn label(&self) -> Option<String>;
    fn root(&self) -> NodeId;
    /// Entries of a directory, without "." and "..", in the filesystem's order.
    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>>;
    fn metadata(&self, node: NodeId) -> Result<Metadata>;
    /// Read the main data stream (`stream` = None) or a named stream / xattr value at `offset`;
    /// returns bytes read (0 at end). Never returns bytes it could not decode correctly: an
    /// unsupported encoding is `Error::Unsupported`.
    fn read_at(
        &self,
        node: NodeId,
        stream: Option<&str>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize>;
    fn read_link(&self, node: NodeId) -> Result<LinkTarget>;

    /// Identity of a directory's *content*: two directory nodes with the same key list the same
    /// entries. On a corrupt or hostile volume a directory entry can point back at an ancestor
    /// (a loop); recursive walkers keep the keys of the directories on their current path and
    /// skip an entry whose key is already there. Usually the node itself; FAT/exFAT, whose node
    /// ids are directory-entry positions, return the directory's first cluster.
    fn dir_key(&self, node: NodeId) -> Result<u64> {
        Ok(node)
    }

    /// Resolve a guest path ("/" or "\\" separated, case rules of the filesystem) from the root,
    /// without following symlinks in the last component.
    fn lookup(&self, path: &str) -> Result<NodeId> {
        crate::fs::lookup_path(self, path)
    }
}

/// Generic path walk over `read_dir`; filesystems with indexed directories override `lookup`.
pub fn lookup_path<F: GuestFs + ?Sized>(fs: &F, path: &str) -> Result<NodeId> {
    let mut node = fs.root();
    for comp in path
        .split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
    {
        let entries = fs.read_dir(node)?;
        let found = entries
            .iter()
            .find(|e| e.name == comp)
            .or_else(|| {
                if matches!(fs.kind(), FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4) {
                    None
                } else {
                    entries.iter().find(|e| e.name.eq_ignore_ascii_case(comp))
                }
            })
            .ok_or_else(|| crate::Error::NotFound(path.to_string()))?;
        node = found.node;
    }
    Ok(node)
}

/// Deepest directory nesting [`walk`] enters; deeper trees are hostile (or a loop whose keys
/// differ at every level) and end with an error.
pub const MAX_WALK_DEPTH: usize = 4096;

/// One entry seen by [`walk`].
#[derive(Clone, Debug)]
pub struct WalkEntry {
    /// Path below the walk's start, components joined by '/' exactly as stored (callers that
    /// write to a host filesystem must still sanitise each component).
    pub path: String,
    pub entry: DirEntry,
    /// 1 for the start directory's own entries.
    pub depth: usize,
    /// A directory whose [`GuestFs::dir_key`] is already on the current path: a loop on a
    /// damaged volume. Reported, never entered.
    pub is_loop: bool,
}

/// Visit every entry below `dir`, depth-first, parents before children, without recursion
/// (so a deep hostile tree cannot exhaust the stack) and with loop protection. `visit` returns
/// whether to enter the entry if it is a directory.
pub fn walk<F: GuestFs + ?Sized>(
    fs: &F,
    dir: NodeId,
    visit: &mut dyn FnMut(&WalkEntry) -> Result<bool>,
) -> Result<()> {
    struct Frame {
        key: u64,
        prefix: String,
        entries: std::vec::IntoIter<DirEntry>,
    }
    let key = fs.dir_key(dir)?;
    let mut on_path = std::collections::HashSet::from([key]);
    let mut stack = vec![Frame {
        key,
        prefix: String::new(),
        entries: fs.read_dir(dir)?.into_iter(),
    }];
    while let Some(top) = stack.last_mut() {
        let Some(entry) = top.entries.next() else {
            let done = stack.pop().expect("non-empty");
            on_path.remove(&done.key);
            continue;
        };
        let path = if top.prefix.is_empty() {
            entry.name.clone()
        } else {
            format!("{}/{}", top.prefix, entry.name)
        };
        let is_dir = entry.file_type == FileType::Directory;
        let key = if is_dir {
            Some(fs.dir_key(entry.node)?)
        } else {
            None
        };
        let is_loop = key.is_some_and(|k| on_path.contains(&k));
        let item = WalkEntry {
            path,
            entry,
            depth: stack.len(),
            is_loop,
        };
        let enter = visit(&item)?;
        if let (Some(k), true, false) = (key, enter, is_loop) {
            if stack.len() >= MAX_WALK_DEPTH {
                return Err(crate::Error::corrupt(
                    "guest",
                    format!(
                        "directories nest deeper than {MAX_WALK_DEPTH} levels at {}",
                        item.path
                    ),
                ));
            }
            let entries = fs.read_dir(item.entry.node)?.into_iter();
            on_path.insert(k);
            stack.push(Frame {
                key: k,
                prefix: item.path,
                entries,
            });
        }
    }
    Ok(())
}
