//! The one place that knows each format crate's API; everything else in this crate works on
//! `dyn VirtualDisk`.

use std::path::Path;

use vdisk_core::raw::RawDisk;

use crate::{CreateOptions, DiskFormat, Error, OpenOptions, Result, VirtualDisk, VirtualDiskMut};

pub(crate) fn open_ro(
    format: DiskFormat,
    path: &Path,
    opts: &OpenOptions,
) -> Result<Box<dyn VirtualDisk>> {
    Ok(match format {
        DiskFormat::Raw => Box::new(open_raw(path, opts)?),
        DiskFormat::Vhdx => Box::new(vdisk_vhdx::Vhdx::open(path, opts)?),
        DiskFormat::Vhd => Box::new(vdisk_vhd::Vhd::open(path, opts)?),
    })
}

pub(crate) fn open_rw(
    format: DiskFormat,
    path: &Path,
    opts: &OpenOptions,
) -> Result<Box<dyn VirtualDiskMut>> {
    Ok(match format {
        DiskFormat::Raw => Box::new(open_raw(path, opts)?),
        DiskFormat::Vhdx => Box::new(vdisk_vhdx::Vhdx::open(path, opts)?),
        DiskFormat::Vhd => Box::new(vdisk_vhd::Vhd::open(path, opts)?),
    })
}

fn open_raw(path: &Path, opts: &OpenOptions) -> Result<RawDisk> {
    if let Some(p) = &opts.parent_override {
        return Err(Error::InvalidArgument(format!(
            "{} is a raw image, which has no parent; --parent {} does not apply",
            path.display(),
            p.display()
        )));
    }
    RawDisk::open(path, opts.writable)
}

pub(crate) fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn VirtualDiskMut>> {
    Ok(match opts.format {
        DiskFormat::Raw => {
            if opts.fixed {
                // Accepted: a raw image is "fixed" by nature; it simply stays sparse.
            }
            if let Some(b) = opts.block_size {
                return Err(Error::InvalidArgument(format!(
                    "raw images have no blocks; a block size ({b} bytes) only applies to vhdx and vhd"
                )));
            }
            Box::new(RawDisk::create(path, opts.virtual_size)?)
        }
        DiskFormat::Vhdx => Box::new(vdisk_vhdx::Vhdx::create(
            path,
            &vdisk_vhdx::CreateOptions {
                virtual_size: opts.virtual_size,
                block_size: opts
                    .block_size
                    .unwrap_or(vdisk_vhdx::CreateOptions::default().block_size),
                logical_sector_size: opts.logical_sector_size,
                physical_sector_size: opts.physical_sector_size,
                fixed: opts.fixed,
            },
        )?),
        DiskFormat::Vhd => {
            if opts.logical_sector_size != 512 {
                return Err(Error::InvalidArgument(format!(
                    "VHD only has 512-byte sectors, but {} bytes were asked for; use vhdx for \
                     4096-byte sector disks",
                    opts.logical_sector_size
                )));
            }
            Box::new(vdisk_vhd::Vhd::create(
                path,
                &vdisk_vhd::CreateOptions {
                    virtual_size: opts.virtual_size,
                    block_size: opts.block_size.unwrap_or(vdisk_vhd::DEFAULT_BLOCK_SIZE),
                    fixed: opts.fixed,
                },
            )?)
        }
    })
}

pub(crate) fn create_child(
    format: DiskFormat,
    parent: &Path,
    child: &Path,
) -> Result<Box<dyn VirtualDiskMut>> {
    Ok(match format {
        DiskFormat::Raw => {
            return Err(Error::InvalidArgument(format!(
                "{} is a raw image, which cannot have a differencing child; convert it to vhdx \
                 first (hyperkeep disk convert {} base.vhdx)",
                parent.display(),
                parent.display()
            )))
        }
        DiskFormat::Vhdx => Box::new(vdisk_vhdx::Vhdx::create_child(parent, child)?),
        DiskFormat::Vhd => Box::new(vdisk_vhd::Vhd::create_child(parent, child)?),
    })
}

/// Structural problems the format's own checker finds (empty = clean).
pub(crate) fn check(format: DiskFormat, path: &Path) -> Result<Vec<String>> {
    match format {
        // A raw image has no structure: any readable file is a valid raw image.
        DiskFormat::Raw => Ok(Vec::new()),
        DiskFormat::Vhdx => vdisk_vhdx::check(path),
        DiskFormat::Vhd => vdisk_vhd::check(path),
    }
}
