//! Guest filesystems inside virtual disks, read without mounting and without an agent.
//!
//! Works on anything that implements [`vdisk::VirtualDisk`]: a live VHDX/VHD/raw file or a disk
//! inside a repository snapshot (where only the chunks a read touches are fetched).
//!
//! Map of the crate:
//! - [`fs`]: the [`fs::GuestFs`] trait every filesystem implements, entries, metadata, streams.
//! - [`volume`]: a byte range of a disk (a partition) as positioned I/O for the filesystems.
//! - [`partition`]: MBR (primary, extended/logical) and GPT (with backup-header fallback), and
//!   bare filesystems without a table.
//! - `ntfs`, `fat`, `exfat`, `ext`: the filesystems.
//! - [`probe`]: recognise the filesystem in a volume and open it.
//! - [`error`] holds the error type.

pub mod error;
pub mod fs;
pub mod volume;
pub use error::{Error, Result};
