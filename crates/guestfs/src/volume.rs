//! A byte range of a virtual disk (a partition, or the whole disk for a bare filesystem), as the
//! positioned I/O the filesystem parsers read through.

use std::sync::Arc;

use vdisk::VirtualDisk;

use crate::{Error, Result};

#[derive(Clone)]
pub struct Volume {
    disk: Arc<dyn VirtualDisk>,
    start: u64,
    length: u64,
}

impl Volume {
    pub fn new(disk: Arc<dyn VirtualDisk>, start: u64, length: u64) -> Result<Volume> {
        let size = disk.geometry().virtual_size;
        match start.checked_add(length) {
            Some(end) if end <= size => Ok(Volume {
                disk,
                start,
                length,
            }),
            _ => Err(Error::InvalidArgument(format!(
                "volume of {length} bytes at {start} does not fit the disk ({size} bytes)"
            ))),
        }
    }

    pub fn whole(disk: Arc<dyn VirtualDisk>) -> Volume {
        let length = disk.geometry().virtual_size;
        Volume {
            disk,
            start: 0,
            length,
        }
    }

    pub fn len(&self) -> u64 {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn disk(&self) -> &Arc<dyn VirtualDisk> {
        &self.disk
    }

    /// Read exactly `buf.len()` bytes at `offset` within the volume; reads past the volume's end
    /// are errors (a filesystem pointing outside its volume is corrupt, and says so).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.length => Ok(self.disk.read_at(buf, self.start + offset)?),
            _ => Err(Error::InvalidArgument(format!(
                "read of {} bytes at volume offset {offset} is outside the volume ({} bytes)",
                buf.len(),
                self.length
            ))),
        }
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("start", &self.start)
            .field("length", &self.length)
            .finish()
    }
}

impl Volume {
    /// A volume over bytes in memory (fuzzers, hostile-image tests): the whole buffer is one
    /// disk with 512-byte sectors.
    pub fn from_bytes(data: Vec<u8>) -> Volume {
        Volume::whole(Arc::new(MemDisk::new(data, 512)))
    }
}

/// A disk held in memory. Parsers take untrusted bytes through it exactly as they take a VHDX.
pub struct MemDisk {
    data: Vec<u8>,
    sector_size: u32,
}

impl MemDisk {
    pub fn new(data: Vec<u8>, sector_size: u32) -> MemDisk {
        MemDisk { data, sector_size }
    }
}

impl VirtualDisk for MemDisk {
    fn geometry(&self) -> vdisk::Geometry {
        vdisk::Geometry {
            virtual_size: self.data.len() as u64,
            logical_sector_size: self.sector_size,
            physical_sector_size: self.sector_size,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk::Result<()> {
        vdisk::disk::check_range(offset, buf.len() as u64, self.data.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    fn map(
        &self,
        offset: u64,
        length: u64,
        _scope: vdisk::MapScope,
    ) -> vdisk::Result<Vec<vdisk::Extent>> {
        let size = self.data.len() as u64;
        let start = offset.min(size);
        let end = offset.saturating_add(length).min(size);
        let mut out = Vec::new();
        vdisk::disk::push_extent(&mut out, start, end - start, vdisk::ExtentState::Data);
        Ok(out)
    }

    fn info(&self) -> vdisk::DiskInfo {
        vdisk::DiskInfo {
            path: None,
            format: vdisk::DiskFormat::Raw,
            subformat: vdisk::Subformat::Fixed,
            virtual_size: self.data.len() as u64,
            block_size: None,
            logical_sector_size: self.sector_size,
            physical_sector_size: self.sector_size,
            file_size: self.data.len() as u64,
            allocated_bytes: self.data.len() as u64,
            identifier: None,
            details: vec![("backing".into(), "memory".into())],
            parent: None,
        }
    }
}
