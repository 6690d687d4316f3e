//! The interface every disk in hyperkeep implements.
//!
//! Anything that is a disk (a VHDX or VHD file, a differencing chain, a raw image, later a disk
//! inside a repository snapshot) implements [`VirtualDisk`]: geometry, random-access reads, and an
//! allocation map ([`VirtualDisk::map`]) so that callers read only the ranges that hold data and can
//! ask a differencing layer what it changes. Writable disks also implement [`VirtualDiskMut`].
//!
//! Map of the crate:
//! - [`disk`]: the traits, [`Geometry`], [`Extent`], [`DiskInfo`].
//! - [`io`]: positioned I/O over files and memory ([`ReadAt`], [`WriteAt`]), so parsers run on
//!   untrusted bytes in fuzzers and tests exactly as on files.
//! - [`raw`]: raw images.
//! - [`guid`]: GUIDs in Microsoft's mixed-endian layout.
//! - [`error`]: one error type whose messages say what is wrong and what to do.

pub mod disk;
pub mod error;
pub mod guid;
pub mod io;
pub mod raw;

pub use disk::{
    DiskFormat, DiskInfo, Extent, ExtentState, Geometry, MapScope, OpenOptions, Subformat,
    VirtualDisk, VirtualDiskMut, DEFAULT_MAX_CHAIN_DEPTH,
};
pub use error::{Error, Result};
pub use guid::Guid;
pub use io::{MemBacking, ReadAt, WriteAt};
