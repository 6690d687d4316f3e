//! Virtual disks of every format behind one interface.
//!
//! `vdisk` is what the rest of hyperkeep uses: it recognises a file's format by its content,
//! opens it (with its differencing chain) as a [`VirtualDisk`], and implements the operations that
//! work on any disk: convert, check, create a differencing child, merge a child into its parent.
//! The formats live in their own crates: `vdisk-vhdx`, `vdisk-vhd`, and raw images in
//! `vdisk-core`.
//!
//! Map of the crate:
//! - `detect`: [`detect`], [`open`], [`open_mut`]: format by content, dispatch to the format crate.
//! - `create`: [`create`], [`create_child`].
//! - `convert`: [`convert`], a pipelined copy (parallel readers, one in-order writer) that reads
//!   only allocated data and keeps memory flat whatever the disk size.
//! - `merge`: [`merge`] a differencing child into its parent.
//! - `check`: [`check`] a file and its parent chain.
//! - `formats`: the one place that knows each format crate's API.
//!
//! The signatures in this file are the contract other crates and tests code against.

pub use vdisk_core::*;

mod check;
mod convert;
mod create;
mod detect;
mod formats;
mod merge;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Recognise a file's format by its content: VHDX by its `vhdxfile` identifier, VHD by a
/// `conectix` footer (or header copy), anything else is raw.
pub fn detect(path: &Path) -> Result<DiskFormat> {
    detect::detect(path)
}

/// Open any disk read-only (or writable with `opts.writable`), with its parent chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn VirtualDisk>> {
    detect::open(path, opts)
}

/// Open any disk for writing (`opts.writable` is forced on).
pub fn open_mut(path: &Path, opts: &OpenOptions) -> Result<Box<dyn VirtualDiskMut>> {
    detect::open_mut(path, opts)
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub format: DiskFormat,
    pub virtual_size: u64,
    /// Fixed (fully allocated) instead of dynamic. Raw images are always "fixed" but sparse.
    pub fixed: bool,
    /// Block size; `None` = the format's default (VHDX 32 MiB as Hyper-V does, VHD 2 MiB).
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

impl CreateOptions {
    pub fn new(format: DiskFormat, virtual_size: u64) -> Self {
        CreateOptions {
            format,
            virtual_size,
            fixed: false,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        }
    }
}

/// Create a new, empty disk. Refuses to overwrite an existing file.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<Box<dyn VirtualDiskMut>> {
    create::create(path, opts)
}

/// Create a differencing child of `parent` (same format as the parent), open for writing.
pub fn create_child(parent: &Path, child: &Path) -> Result<Box<dyn VirtualDiskMut>> {
    create::create_child(parent, child)
}

#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    pub child: PathBuf,
    pub parent: PathBuf,
    /// Guest bytes copied from the child into the parent.
    pub bytes_merged: u64,
}

/// Merge a differencing child into its parent; afterwards the parent shows what the chain
/// showed, and the child file is deleted (as Hyper-V's Merge-VHD does: the parent's identity
/// changes, so the child could no longer be opened anyway).
pub fn merge(child: &Path, opts: &OpenOptions) -> Result<MergeReport> {
    merge::merge(child, opts)
}

/// How [`merge_with`] merges.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// VHDX: the DataWriteGuid the parent gets (its header changes to it before any data is
    /// written); `None` = a random one, as Hyper-V does. Tell the child first with
    /// [`accept_parent_identity`], and the child stays readable during and after the merge.
    /// VHD: ignored; writing a VHD does not change its identity (unique id).
    pub parent_identity: Option<Guid>,
    /// Keep the child file instead of deleting it (it must accept the parent's new identity,
    /// see above, or it can no longer be opened).
    pub keep_child: bool,
}

/// [`merge`] with options: choose the parent's new identity, keep the child.
pub fn merge_with(child: &Path, opts: &OpenOptions, mopts: &MergeOptions) -> Result<MergeReport> {
    merge::merge_with(child, opts, mopts)
}

/// Make differencing disk `child` also accept a parent with identity `g` (VHDX:
/// `parent_linkage2` = `g`; VHD: nothing to do, a VHD's identity does not change when written).
/// The locator change goes through the VHDX log; the child's own identity stays.
pub fn accept_parent_identity(child: &Path, g: Guid) -> Result<()> {
    match detect::detect(child)? {
        DiskFormat::Vhdx => vdisk_vhdx::Vhdx::set_parent_linkage2(child, g),
        DiskFormat::Vhd => Ok(()),
        DiskFormat::Raw => Err(Error::InvalidArgument(format!(
            "{} is a raw image, which has no parent",
            child.display()
        ))),
    }
}

/// Point differencing disk `child` at `parent` (paths and linkage to the parent's current
/// identity). For a parent that shows what the old one showed, e.g. after a merge; only the
/// geometry is checked. The child's own identity stays, so its children stay linked.
pub fn reparent(child: &Path, parent: &Path) -> Result<()> {
    let (cf, pf) = (detect::detect(child)?, detect::detect(parent)?);
    if cf != pf {
        return Err(Error::Parent(format!(
            "{} is {cf} and {} is {pf}: a differencing chain has one format",
            child.display(),
            parent.display()
        )));
    }
    match cf {
        DiskFormat::Vhdx => vdisk_vhdx::Vhdx::reparent(child, parent),
        DiskFormat::Vhd => vdisk_vhd::Vhd::reparent(child, parent),
        DiskFormat::Raw => Err(Error::InvalidArgument(format!(
            "{} is a raw image, which has no parent",
            child.display()
        ))),
    }
}

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub format: DiskFormat,
    pub fixed: bool,
    pub block_size: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub virtual_size: u64,
    /// Guest bytes read from the source (allocated ranges only).
    pub bytes_read: u64,
    /// Guest bytes written to the output. All-zero 4 KiB ranges are never written (a new disk
    /// already reads as zeros), so dynamic outputs leave them unallocated and raw outputs sparse.
    pub bytes_written: u64,
}

/// Copy the guest view of `src` into a new disk at `dst`. Only allocated ranges of the source are
/// read; unallocated and all-zero ranges stay unallocated in a dynamic output.
pub fn convert(
    src: &dyn VirtualDisk,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<ConvertReport> {
    convert::convert(src, dst, opts, progress)
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Every problem found; empty means the file is clean.
    pub problems: Vec<String>,
    /// Findings that do not make the file unusable (e.g. a VHD parent's time stamp differs
    /// because the parent was copied); shown, but the file still counts as clean.
    pub warnings: Vec<String>,
}

/// Check a disk file's structure (and its parent chain) without modifying it.
pub fn check(path: &Path, opts: &OpenOptions) -> Result<CheckReport> {
    check::check(path, opts)
}
