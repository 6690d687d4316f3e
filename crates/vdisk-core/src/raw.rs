//! Raw images: the file is the disk. Holes in a sparse file are reported as `Unallocated`
//! (via `SEEK_DATA`/`SEEK_HOLE` where the OS has them), so raw images are read sparsely too.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::disk::{check_range, push_extent};
use crate::{
    DiskFormat, DiskInfo, Error, Extent, ExtentState, Geometry, MapScope, ReadAt, Result,
    Subformat, VirtualDisk, VirtualDiskMut, WriteAt,
};

pub struct RawDisk {
    file: File,
    path: Option<PathBuf>,
    size: u64,
    writable: bool,
}

impl RawDisk {
    pub fn open(path: &Path, writable: bool) -> Result<RawDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?
            .len();
        Ok(RawDisk {
            file,
            path: Some(path.to_path_buf()),
            size,
            writable,
        })
    }

    /// Create (or truncate) a raw image of `size` bytes; it starts as one big hole.
    pub fn create(path: &Path, size: u64) -> Result<RawDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        Ok(RawDisk {
            file,
            path: Some(path.to_path_buf()),
            size,
            writable: true,
        })
    }

    fn ctx(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "raw image".into())
    }

    #[cfg(target_os = "linux")]
    fn data_extents(&self, offset: u64, end: u64, out: &mut Vec<Extent>) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        const SEEK_DATA: i32 = 3;
        const SEEK_HOLE: i32 = 4;
        extern "C" {
            fn lseek(fd: i32, offset: i64, whence: i32) -> i64;
        }
        let fd = self.file.as_raw_fd();
        let mut pos = offset;
        while pos < end {
            // SAFETY: lseek on a file descriptor we own; it does not touch memory.
            let data = unsafe { lseek(fd, pos as i64, SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(6) {
                    // ENXIO: no data after pos.
                    push_extent(out, pos, end - pos, ExtentState::Unallocated);
                    return Ok(());
                }
                // Filesystem without SEEK_DATA: everything is data.
                push_extent(out, pos, end - pos, ExtentState::Data);
                return Ok(());
            }
            let data = (data as u64).min(end);
            push_extent(out, pos, data - pos, ExtentState::Unallocated);
            if data >= end {
                return Ok(());
            }
            // SAFETY: as above.
            let hole = unsafe { lseek(fd, data as i64, SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            push_extent(out, data, hole - data, ExtentState::Data);
            pos = hole;
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn data_extents(&self, offset: u64, end: u64, out: &mut Vec<Extent>) -> Result<()> {
        push_extent(out, offset, end - offset, ExtentState::Data);
        Ok(())
    }
}

impl VirtualDisk for RawDisk {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("read error in {}", self.ctx()), e))
    }

    fn map(&self, offset: u64, length: u64, _scope: MapScope) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        if offset < end {
            self.data_extents(offset, end, &mut out)?;
        }
        Ok(out)
    }

    fn info(&self) -> DiskInfo {
        let allocated = self
            .map(0, self.size, MapScope::View)
            .map(|m| {
                m.iter()
                    .filter(|e| e.state == ExtentState::Data)
                    .map(|e| e.length)
                    .sum()
            })
            .unwrap_or(self.size);
        DiskInfo {
            path: self.path.clone(),
            format: DiskFormat::Raw,
            subformat: Subformat::Fixed,
            virtual_size: self.size,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 512,
            file_size: self.size,
            allocated_bytes: allocated,
            identifier: None,
            details: Vec::new(),
            parent: None,
        }
    }
}

impl VirtualDiskMut for RawDisk {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(format!("{} is open read-only", self.ctx())));
        }
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(format!("write error in {}", self.ctx()), e))
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<()> {
        check_range(offset, length, self.size)?;
        // A fresh image is one hole, so zeroing the part that is already a hole is free.
        let map = self.map(offset, length, MapScope::View)?;
        let zero = vec![0u8; 1 << 20];
        for e in map.iter().filter(|e| e.state == ExtentState::Data) {
            let mut pos = e.offset;
            while pos < e.end() {
                let n = (e.end() - pos).min(zero.len() as u64) as usize;
                self.write_at(&zero[..n], pos)?;
                pos += n as u64;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| Error::io(format!("cannot flush {}", self.ctx()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_raw_reports_holes() {
        let dir = std::env::temp_dir().join(format!("vdisk-raw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.raw");
        let mut d = RawDisk::create(&p, 64 << 20).unwrap();
        d.write_at(&[7u8; 4096], 16 << 20).unwrap();
        d.flush().unwrap();
        let map = d.map(0, 64 << 20, MapScope::View).unwrap();
        let data: u64 = map
            .iter()
            .filter(|e| e.state == ExtentState::Data)
            .map(|e| e.length)
            .sum();
        assert!((4096..(64 << 20)).contains(&data), "map = {map:?}");
        assert_eq!(map.first().unwrap().offset, 0);
        assert_eq!(map.last().unwrap().end(), 64 << 20);
        let mut b = [0u8; 8];
        d.read_at(&mut b, (16 << 20) + 100).unwrap();
        assert_eq!(b, [7u8; 8]);
        assert!(d.read_at(&mut b, (64 << 20) - 4).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
