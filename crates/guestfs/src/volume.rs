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
