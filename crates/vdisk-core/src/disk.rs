//! The disk traits.

use std::path::PathBuf;

use serde::Serialize;

use crate::Result;

/// Longest differencing chain we open. Hyper-V chains are a handful of checkpoints deep; a much
/// deeper chain is a loop or hostile, and every layer costs a file handle and its BAT.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 256;

/// What a guest sees: its size and sector sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Geometry {
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

/// The state of a range of the disk, as reported by [`VirtualDisk::map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentState {
    /// Stored data: it must be read (it may still happen to hold zeros).
    Data,
    /// Explicitly recorded as zeros (e.g. a VHDX block in the ZERO or UNMAPPED state). In a
    /// differencing layer this hides the parent's data.
    Zero,
    /// Never written anywhere: reads as zeros and costs nothing.
    Unallocated,
    /// Only in [`MapScope::Layer`] of a differencing disk: this layer does not hold the range, the
    /// parent's content shows through.
    Inherited,
}

impl ExtentState {
    /// True if reading the range can return something other than zeros.
    pub fn has_data(self) -> bool {
        matches!(self, ExtentState::Data | ExtentState::Inherited)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub state: ExtentState,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Which view [`VirtualDisk::map`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapScope {
    /// What the guest sees: the whole differencing chain flattened. States are `Data`, `Zero`
    /// and `Unallocated`.
    View,
    /// Only what the top layer itself holds ("what does this child change?"). For a disk
    /// without a parent this equals `View`. States are `Data`, `Zero`, `Unallocated` (a base
    /// layer) and `Inherited` (a differencing layer).
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Vhdx,
    Vhd,
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vhd => "vhd",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subformat {
    Fixed,
    Dynamic,
    Differencing,
}

impl std::fmt::Display for Subformat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Subformat::Fixed => "fixed",
            Subformat::Dynamic => "dynamic",
            Subformat::Differencing => "differencing",
        })
    }
}

/// Everything `hyperkeep disk info` shows about one layer, with its parent chain.
#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub path: Option<PathBuf>,
    pub format: DiskFormat,
    pub subformat: Subformat,
    pub virtual_size: u64,
    /// Allocation unit of the format (VHDX/VHD block), `None` for raw.
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Size of the file itself.
    pub file_size: u64,
    /// Bytes of guest data this layer stores (allocated blocks or sectors of this file).
    pub allocated_bytes: u64,
    /// The format's identity for this layer: VHDX DataWriteGuid, VHD unique id.
    pub identifier: Option<String>,
    /// Format-specific facts worth showing (log state, creator, ...), as key/value pairs.
    pub details: Vec<(String, String)>,
    pub parent: Option<Box<DiskInfo>>,
}

/// How to open a disk file.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open for writing. A pending VHDX log is replayed on disk; read-only opens replay in memory
    /// and never modify the file.
    pub writable: bool,
    /// Use this file as the parent of the top layer instead of what its locator says. Linkage
    /// (VHDX DataWriteGuid, VHD unique id) is still checked.
    pub parent_override: Option<PathBuf>,
    /// Refuse chains deeper than this.
    pub max_chain_depth: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            parent_override: None,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
        }
    }
}

/// A disk that can be read. Implemented by every format, by differencing chains (the flattened
/// view) and by disks inside repository snapshots.
///
/// Reads take `&self`: an open disk is shared by parallel readers.
pub trait VirtualDisk: Send + Sync {
    fn geometry(&self) -> Geometry;

    /// Fill `buf` with the guest-visible bytes at `offset`. The whole range must lie inside the
    /// virtual size. Any alignment is allowed; sector-aligned reads are the fast path.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The allocation map of `[offset, offset + length)`, clipped to the virtual size: extents in
    /// ascending order, contiguous, covering the whole range, adjacent extents of the same state
    /// merged. Memory is proportional to the range's blocks, so callers walk big disks in windows.
    fn map(&self, offset: u64, length: u64, scope: MapScope) -> Result<Vec<Extent>>;

    /// Description of this disk and its parent chain.
    fn info(&self) -> DiskInfo;
}

/// A disk that can be written.
pub trait VirtualDiskMut: VirtualDisk {
    /// Write guest-visible bytes. In a differencing layer only the written sectors change.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;

    /// Make `[offset, offset + length)` read as zeros. Formats that can (VHDX, dynamic VHD
    /// blocks) record whole zero blocks without storing them; the rest is written as zeros.
    fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = vec![0u8; CHUNK.min(length) as usize];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = CHUNK.min(end - pos) as usize;
            self.write_at(&zero[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Make every write so far durable and the file consistent for other readers.
    fn flush(&mut self) -> Result<()>;
}

impl<T: VirtualDisk + ?Sized> VirtualDisk for Box<T> {
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn map(&self, offset: u64, length: u64, scope: MapScope) -> Result<Vec<Extent>> {
        (**self).map(offset, length, scope)
    }
    fn info(&self) -> DiskInfo {
        (**self).info()
    }
}

impl<T: VirtualDisk + ?Sized> VirtualDisk for std::sync::Arc<T> {
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn map(&self, offset: u64, length: u64, scope: MapScope) -> Result<Vec<Extent>> {
        (**self).map(offset, length, scope)
    }
    fn info(&self) -> DiskInfo {
        (**self).info()
    }
}

impl<T: VirtualDiskMut + ?Sized> VirtualDiskMut for Box<T> {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        (**self).write_zeroes(offset, length)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
}

/// Check that `[offset, offset+len)` lies inside a disk of `size` bytes; the error every
/// implementation returns for reads and writes past the end.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::InvalidArgument(format!(
            "access of {len} bytes at offset {offset} is outside the disk ({size} bytes)"
        ))),
    }
}

/// Append an extent to a map under construction, merging it with the previous one when both
/// have the same state and touch. Every implementation builds its map through this.
pub fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64, state: ExtentState) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.state == state && last.end() == offset {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        state,
    });
}
