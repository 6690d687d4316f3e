//! Guest filesystems inside virtual disks, read without mounting and without an agent.
//!
//! Works on anything that implements [`vdisk::VirtualDisk`]: a live VHDX/VHD/raw file or a disk
//! inside a repository snapshot (where only the chunks a read touches are fetched).
//!
//! Map of the crate:
//! - [`fs`]: the [`fs::GuestFs`] trait every filesystem implements, entries, metadata, streams.
//! - [`volume`]: a byte range of a disk (a partition) as positioned I/O for the filesystems;
//!   [`volume::MemDisk`] holds a disk in memory for fuzzers and tests.
//! - [`partition`]: MBR (primary, extended/logical) and GPT (with backup-header fallback), and
//!   bare filesystems without a table.
//! - [`ntfs`], [`fat`] (FAT12/16/32), [`exfat`], [`ext`] (ext2/3/4, with in-memory journal
//!   replay): the filesystems. Each module doc says how its node ids are made.
//! - [`extract`]: copy guest files to a host directory safely (name escaping, no escapes).
//! - [`probe`]: recognise the filesystem in a volume and open it ([`open_fs`]).
//! - `util` (private): field access, DOS times, the FAT/exFAT cluster-chain walker.
//! - [`error`] holds the error type.
//!
//! Typical use:
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let disk: Arc<dyn vdisk::VirtualDisk> =
//!     Arc::from(vdisk::open("vm.vhdx".as_ref(), &vdisk::OpenOptions::default())?);
//! let table = guestfs::partitions(disk.as_ref())?;
//! let part = table.get(2).ok_or("no partition 2")?;
//! let fs = guestfs::open_fs(part.volume(disk.clone())?)?;
//! let node = fs.lookup("/Windows/System32/drivers/etc/hosts")?;
//! let mut buf = vec![0u8; fs.metadata(node)?.size as usize];
//! fs.read_at(node, None, &mut buf, 0)?;
//! # Ok(())
//! # }
//! ```
//!
//! Walking a tree: use [`fs::walk`]. On a damaged volume a directory can contain its own
//! ancestor; the walker recognises it by [`fs::GuestFs::dir_key`], reports it and does not enter
//! it, and it never recurses (hostile depth cannot exhaust the stack).

pub mod error;
pub mod exfat;
pub mod ext;
pub mod extract;
pub mod fat;
pub mod fs;
pub mod ntfs;
pub mod partition;
pub mod probe;
pub(crate) mod util;
pub mod volume;
pub use error::{Error, Result};
pub use partition::{partitions, Partition, PartitionKind, PartitionTable, TableKind};
pub use probe::open_fs;
