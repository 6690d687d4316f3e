//! Creating disks and differencing children, for every format.

use std::path::Path;

use crate::{detect, formats, CreateOptions, DiskFormat, Error, Result, VirtualDiskMut};

/// Never overwrite: a disk image is somebody's data, and a typo in a path must not destroy it.
pub(crate) fn refuse_existing(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(Error::InvalidArgument(format!(
            "{} already exists; refusing to overwrite it (delete it first or choose another name)",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot check {}", path.display()), e)),
    }
}

pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn VirtualDiskMut>> {
    refuse_existing(path)?;
    if opts.virtual_size == 0 {
        return Err(Error::InvalidArgument(
            "a disk of 0 bytes cannot be created; give a size such as 10G".into(),
        ));
    }
    for (what, v) in [
        ("logical", opts.logical_sector_size),
        ("physical", opts.physical_sector_size),
    ] {
        if v != 512 && v != 4096 {
            return Err(Error::InvalidArgument(format!(
                "{what} sector size {v} is not supported; use 512 or 4096"
            )));
        }
    }
    // A raw image is just bytes: any size is a valid raw image (and converting one must work).
    if opts.format != DiskFormat::Raw
        && !opts
            .virtual_size
            .is_multiple_of(u64::from(opts.logical_sector_size))
    {
        return Err(Error::InvalidArgument(format!(
            "virtual size {} is not a multiple of the {}-byte logical sector size",
            opts.virtual_size, opts.logical_sector_size
        )));
    }
    formats::create(path, opts).inspect_err(|_| {
        // Whatever the format wrote before failing is not a usable disk.
        let _ = std::fs::remove_file(path);
    })
}

pub(crate) fn create_child(parent: &Path, child: &Path) -> Result<Box<dyn VirtualDiskMut>> {
    let format = detect::detect(parent)?;
    refuse_existing(child)?;
    formats::create_child(format, parent, child).inspect_err(|_| {
        let _ = std::fs::remove_file(child);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VirtualDisk;

    #[test]
    fn raw_create_refuses_overwrite_and_raw_has_no_children() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        let d = crate::create(&p, &CreateOptions::new(DiskFormat::Raw, 8 << 20)).unwrap();
        assert_eq!(d.geometry().virtual_size, 8 << 20);
        drop(d);
        let e = crate::create(&p, &CreateOptions::new(DiskFormat::Raw, 8 << 20))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = crate::create_child(&p, &dir.path().join("c.raw"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("raw image") && e.contains("cannot have a differencing child"),
            "{e}"
        );
        assert!(!dir.path().join("c.raw").exists());
        let e = crate::create(
            &dir.path().join("z"),
            &CreateOptions::new(DiskFormat::Vhd, 1000),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("not a multiple"), "{e}");
        assert!(!dir.path().join("z").exists());
        // Any size is a raw image.
        let odd = crate::create(
            &dir.path().join("odd"),
            &CreateOptions::new(DiskFormat::Raw, 1000),
        );
        assert_eq!(odd.unwrap().geometry().virtual_size, 1000);
    }
}
