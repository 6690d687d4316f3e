//! Format detection by content, and opening any disk.
//!
//! The extension is never trusted: Hyper-V names differencing VHDX files `.avhdx`, users rename
//! files, and a raw image can be called anything. The signatures are unambiguous instead: VHDX
//! starts with `vhdxfile`; VHD ends with a `conectix` footer and dynamic/differencing VHDs also
//! start with a copy of it.

use std::fs::File;
use std::path::Path;

use crate::formats;
use crate::{DiskFormat, Error, OpenOptions, ReadAt, Result, VirtualDisk, VirtualDiskMut};

pub(crate) fn detect(path: &Path) -> Result<DiskFormat> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    if meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} is a directory, not a disk image",
            path.display()
        )));
    }
    let size = meta.len();
    let read = |offset: u64, len: u64| -> Result<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        file.read_exact_at(&mut b, offset)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        Ok(b)
    };
    // The signatures live in the first and last 512 bytes (VHD footer and its copy at 0).
    let n = size.min(512);
    let first = read(0, n)?;
    let last = read(size - n, n)?;
    if vdisk_vhdx::is_vhdx(&first) {
        return Ok(DiskFormat::Vhdx);
    }
    if size >= 512 && vdisk_vhd::is_vhd(&first, &last) {
        return Ok(DiskFormat::Vhd);
    }
    Ok(DiskFormat::Raw)
}

pub(crate) fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn VirtualDisk>> {
    let format = detect(path)?;
    formats::open_ro(format, path, opts)
}

pub(crate) fn open_mut(path: &Path, opts: &OpenOptions) -> Result<Box<dyn VirtualDiskMut>> {
    let format = detect(path)?;
    let opts = OpenOptions {
        writable: true,
        ..opts.clone()
    };
    formats::open_rw(format, path, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
    const VHD_COOKIE: &[u8; 8] = b"conectix";

    #[test]
    fn detects_by_content_not_extension() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("looks-like.vhdx");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert_eq!(detect(&p).unwrap(), DiskFormat::Raw);

        let p = dir.path().join("disk.raw");
        let mut v = vec![0u8; 4096];
        v[..8].copy_from_slice(VHDX_SIGNATURE);
        std::fs::write(&p, &v).unwrap();
        assert_eq!(detect(&p).unwrap(), DiskFormat::Vhdx);

        let p = dir.path().join("fixed.img");
        let mut v = vec![0u8; 4096];
        v[4096 - 512..4096 - 504].copy_from_slice(VHD_COOKIE);
        std::fs::write(&p, &v).unwrap();
        assert_eq!(detect(&p).unwrap(), DiskFormat::Vhd);

        let p = dir.path().join("tiny");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(detect(&p).unwrap(), DiskFormat::Raw);

        let missing = dir.path().join("missing");
        let e = detect(&missing).unwrap_err().to_string();
        assert!(e.contains("cannot open") && e.contains("missing"), "{e}");
    }
}
