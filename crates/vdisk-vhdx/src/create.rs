//! Creating VHDX files: dynamic, fixed, and differencing children.
//!
//! Ours because no Rust crate creates VHDX files (the `vhdx` crates only read, and none makes
//! differencing disks), and qemu-img cannot make differencing VHDX at all.
//!
//! The layout follows what Hyper-V writes, so that every consumer (Hyper-V, qemu, libvhdi) sees a
//! familiar file: a 1 MiB header section (file identifier, two headers, two region tables), the
//! 1 MiB log at 1 MiB, the 1 MiB metadata region at 2 MiB, the BAT region (1 MiB aligned) at
//! 3 MiB, and payload blocks after it, every structure 1 MiB aligned.
//!
//! A new file is written completely and flushed before it is opened through the normal
//! (writable) open path, so a crash during creation leaves at worst an incomplete file that
//! nothing mistakes for a good one (its headers are written last).

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use vdisk_core::{Error, Guid, OpenOptions, Result, WriteAt};

use crate::Vhdx;

use crate::format::{
    BatGeometry, FileIdentifier, Header, Metadata, ParentLocator, RegionTable, Regions,
    HEADER_OFFSETS, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIB, MIN_BLOCK_SIZE, PAYLOAD_FULLY_PRESENT,
    REGION_TABLE_OFFSETS,
};

/// Hyper-V's default block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;

pub(crate) const LOG_OFFSET: u64 = MIB;
pub(crate) const LOG_LENGTH: u32 = MIB as u32;
pub(crate) const METADATA_OFFSET: u64 = 2 * MIB;
pub(crate) const METADATA_LENGTH: u32 = MIB as u32;
pub(crate) const BAT_OFFSET: u64 = 3 * MIB;

/// How to create a new VHDX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Size of the disk the guest sees, in bytes; a multiple of the logical sector size.
    pub virtual_size: u64,
    /// Payload block size: a power of two from 1 MiB to 256 MiB (default 32 MiB, as Hyper-V).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Allocate every block up front (a sparse file on Linux, but fully mapped in the BAT).
    pub fixed: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            virtual_size: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            fixed: false,
        }
    }
}

impl CreateOptions {
    /// Refuse what MS-VHDX does not allow, saying what would be allowed.
    pub fn validate(&self) -> Result<()> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(Error::InvalidArgument(format!(
                "VHDX block size {bs} is not allowed: use a power of two from 1 MiB to 256 MiB"
            )));
        }
        for (what, v) in [
            ("logical", self.logical_sector_size),
            ("physical", self.physical_sector_size),
        ] {
            if v != 512 && v != 4096 {
                return Err(Error::InvalidArgument(format!(
                    "VHDX {what} sector size {v} is not allowed: use 512 or 4096"
                )));
            }
        }
        if self.virtual_size == 0 {
            return Err(Error::InvalidArgument(
                "a VHDX needs a virtual size larger than zero".into(),
            ));
        }
        if !self
            .virtual_size
            .is_multiple_of(u64::from(self.logical_sector_size))
        {
            return Err(Error::InvalidArgument(format!(
                "VHDX virtual size {} is not a multiple of the logical sector size {}",
                self.virtual_size, self.logical_sector_size
            )));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "VHDX virtual size {} is larger than the format's limit of 64 TiB",
                self.virtual_size
            )));
        }
        Ok(())
    }
}

/// The BAT geometry a new file is laid out for. The BAT region is always sized as for a
/// differencing disk (every chunk's bitmap entry present), which is at least what a dynamic disk
/// needs, so a file can change type without moving its BAT.
pub(crate) fn region_geometry(opts: &CreateOptions) -> BatGeometry {
    BatGeometry::from_params(
        opts.block_size,
        opts.logical_sector_size,
        opts.virtual_size,
        true,
    )
}

/// Where a differencing child finds its parent, and the parent's facts the child copies.
#[derive(Clone, Debug)]
pub(crate) struct ParentLink {
    /// The parent's DataWriteGuid at the time the child was made.
    pub(crate) data_write_guid: Guid,
    pub(crate) relative_path: String,
    pub(crate) absolute_path: String,
    /// The parent's Virtual Disk ID (a virtual-disk item: children keep it, MS-VHDX 2.6.1.2).
    pub(crate) disk_id: Guid,
}

fn metadata(opts: &CreateOptions, parent: Option<&ParentLink>, disk_id: Guid) -> Metadata {
    Metadata {
        block_size: opts.block_size,
        leave_block_allocated: opts.fixed,
        has_parent: parent.is_some(),
        virtual_size: opts.virtual_size,
        page83: disk_id,
        logical_sector_size: opts.logical_sector_size,
        physical_sector_size: opts.physical_sector_size,
        parent_locator: parent.map(|link| ParentLocator {
            entries: vec![
                (
                    "parent_linkage".into(),
                    format!("{:?}", link.data_write_guid),
                ),
                ("relative_path".into(), link.relative_path.clone()),
                ("absolute_win32_path".into(), link.absolute_path.clone()),
            ],
        }),
    }
}

/// First byte after the BAT region: where payload blocks start.
pub(crate) fn payload_start(geo: &BatGeometry) -> u64 {
    BAT_OFFSET + geo.bat_bytes()
}

/// Write a complete new VHDX to `path` (replacing any file there) and flush it.
pub(crate) fn write_new_file(
    path: &Path,
    opts: &CreateOptions,
    parent: Option<&ParentLink>,
) -> Result<()> {
    opts.validate()?;
    let ctx = |what: &str| format!("cannot {what} {}", path.display());
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(ctx("create"), e))?;
    let w = |buf: &[u8], off: u64| {
        file.write_all_at(buf, off)
            .map_err(|e| Error::io(ctx("write"), e))
    };
    let geo = region_geometry(opts);
    let block_size = u64::from(opts.block_size);
    let payload = payload_start(&geo);
    let disk_id = parent.map(|p| p.disk_id).unwrap_or_else(Guid::new_random);
    let creator = format!("hyperkeep {}", env!("CARGO_PKG_VERSION"));
    w(&FileIdentifier { creator }.to_bytes(), 0)?;
    let regions = RegionTable::standard(&Regions {
        bat_offset: BAT_OFFSET,
        bat_length: geo.bat_bytes() as u32,
        metadata_offset: METADATA_OFFSET,
        metadata_length: METADATA_LENGTH,
    })
    .to_bytes();
    for off in REGION_TABLE_OFFSETS {
        w(&regions, off)?;
    }
    let meta = metadata(opts, parent, disk_id).to_region_bytes(METADATA_LENGTH)?;
    w(&meta, METADATA_OFFSET)?;
    let mut end = payload;
    if opts.fixed {
        // Every block present, in order, right after the BAT. Written a BAT page (512 entries)
        // at a time so huge disks need no huge buffer.
        let mut index = 0u64;
        let mut page = Vec::with_capacity(4096);
        let flush_page = |page: &mut Vec<u8>, first_index: u64| -> Result<()> {
            let r = w(page, BAT_OFFSET + first_index * 8);
            page.clear();
            r
        };
        let mut page_first = 0u64;
        for b in 0..geo.data_blocks {
            let want = geo.payload_index(b) as u64;
            while index < want {
                page.extend_from_slice(&0u64.to_le_bytes());
                index += 1;
                if page.len() == 4096 {
                    flush_page(&mut page, page_first)?;
                    page_first = index;
                }
            }
            let off = payload + b * block_size;
            page.extend_from_slice(&(off | u64::from(PAYLOAD_FULLY_PRESENT)).to_le_bytes());
            index += 1;
            if page.len() == 4096 {
                flush_page(&mut page, page_first)?;
                page_first = index;
            }
        }
        if !page.is_empty() {
            flush_page(&mut page, page_first)?;
        }
        end = payload + geo.data_blocks * block_size;
    }
    // The log, the rest of the BAT and (for fixed disks) the payload are holes: zeros.
    file.set_len(end).map_err(|e| Error::io(ctx("size"), e))?;
    file.sync().map_err(|e| Error::io(ctx("flush"), e))?;
    // Headers last: until they exist the file is not a VHDX anyone would open.
    let mut h = Header {
        sequence_number: 1,
        file_write_guid: Guid::new_random(),
        data_write_guid: Guid::new_random(),
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH,
        log_offset: LOG_OFFSET,
    };
    for off in HEADER_OFFSETS {
        w(&h.to_bytes(), off)?;
        h.sequence_number += 1;
    }
    file.sync().map_err(|e| Error::io(ctx("flush"), e))?;
    Ok(())
}

impl Vhdx {
    /// Create a new, empty VHDX at `path` (replacing any file there) and open it for writing.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Vhdx> {
        write_new_file(path, opts, None)?;
        Vhdx::open(
            path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
    }

    /// Create a differencing VHDX at `child` whose parent is `parent` (any VHDX, itself possibly
    /// differencing), and open it for writing with its chain. The child takes the parent's
    /// geometry (size, block size, sector sizes, disk id); the parent is only read.
    pub fn create_child(parent: &Path, child: &Path) -> Result<Vhdx> {
        let p = Vhdx::open(parent, &OpenOptions::default())?;
        let m = &p.top.metadata;
        let opts = CreateOptions {
            virtual_size: m.virtual_size,
            block_size: m.block_size,
            logical_sector_size: m.logical_sector_size,
            physical_sector_size: m.physical_sector_size,
            fixed: false,
        };
        let link = parent_link(parent, child, p.top.header.data_write_guid, m.page83)?;
        drop(p);
        if absolute(child)? == absolute(parent)? {
            return Err(Error::InvalidArgument(format!(
                "{} cannot be its own parent",
                child.display()
            )));
        }
        write_new_file(child, &opts, Some(&link))?;
        Vhdx::open(
            child,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
    }
}

/// `target` relative to directory `from`, in Windows form (`..\dir\file.vhdx`), as the
/// `relative_path` locator entry wants it. Both paths must be absolute.
pub(crate) fn windows_relative_path(from_dir: &Path, target: &Path) -> String {
    let a: Vec<Component> = from_dir.components().collect();
    let b: Vec<Component> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    parts.join("\\")
}

/// The locator a child at `child` needs to find `parent` (whose current DataWriteGuid and
/// Virtual Disk ID are given).
pub(crate) fn parent_link(
    parent: &Path,
    child: &Path,
    parent_data_write_guid: Guid,
    parent_disk_id: Guid,
) -> Result<ParentLink> {
    let parent_abs = parent
        .canonicalize()
        .map_err(|e| Error::io(format!("cannot resolve {}", parent.display()), e))?;
    let child_abs = absolute(child)?;
    let child_dir = child_abs.parent().unwrap_or(Path::new("/"));
    Ok(ParentLink {
        data_write_guid: parent_data_write_guid,
        relative_path: windows_relative_path(child_dir, &parent_abs),
        // On Windows this is the \\?\-prefixed Win32 path; elsewhere the path as the OS knows
        // it, which is what a reader on the same machine can use.
        absolute_path: parent_abs.to_string_lossy().into_owned(),
        disk_id: parent_disk_id,
    })
}

/// Absolute form of a path without requiring it to exist (the child does not yet).
pub(crate) fn absolute(p: &Path) -> Result<PathBuf> {
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = match dir {
        Some(d) => d.canonicalize(),
        None => std::env::current_dir(),
    }
    .map_err(|e| {
        Error::io(
            format!("cannot resolve the directory of {}", p.display()),
            e,
        )
    })?;
    let name = p
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file name", p.display())))?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages() {
        let ok = CreateOptions {
            virtual_size: 64 * MIB,
            ..Default::default()
        };
        ok.validate().unwrap();
        for (bad, needle) in [
            (
                CreateOptions {
                    block_size: 3 * MIB as u32,
                    ..ok.clone()
                },
                "power of two",
            ),
            (
                CreateOptions {
                    block_size: 512 * MIB as u32,
                    ..ok.clone()
                },
                "256 MiB",
            ),
            (
                CreateOptions {
                    virtual_size: 1000,
                    ..ok.clone()
                },
                "multiple of the logical sector",
            ),
            (
                CreateOptions {
                    virtual_size: 65 << 40,
                    ..ok.clone()
                },
                "64 TiB",
            ),
            (
                CreateOptions {
                    logical_sector_size: 1024,
                    ..ok.clone()
                },
                "512 or 4096",
            ),
            (CreateOptions::default(), "larger than zero"),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn relative_paths_in_windows_form() {
        assert_eq!(
            windows_relative_path(Path::new("/a/b/c"), Path::new("/a/x/p.vhdx")),
            "..\\..\\x\\p.vhdx"
        );
        assert_eq!(
            windows_relative_path(Path::new("/a"), Path::new("/a/p.vhdx")),
            "p.vhdx"
        );
    }
}
