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
//! - `ntfs`, [`fat`] (FAT12/16/32), [`exfat`], [`ext`] (ext2/3/4): the filesystems.
//! - [`probe`]: recognise the filesystem in a volume and open it.
//! - [`error`] holds the error type.

pub mod error;
pub mod exfat;
pub mod ext;
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
