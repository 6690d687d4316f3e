//! VHD ("Virtual Hard Disk Image Format Specification") reader and writer: fixed, dynamic and
//! differencing disks, with parent chains.
//!
//! Why our own: the VHD crates we found read fixed and dynamic disks at best; none handles
//! differencing chains with linkage checks, both locator encodings, damaged-footer recovery or
//! writing, and none bounds its memory against hostile headers.
//!
//! Map of the crate:
//! - [`format`](mod@format): the on-disk structures (footer, dynamic header, locators), checksum, CHS
//!   geometry, time stamps.
//! - [`disk`]: [`Vhd`] (open, read, map, info, write, create, create_child, reparent) and
//!   [`CreateOptions`].
//! - `parent`: finding and checking a differencing disk's parent.
//! - [`check`](mod@check): [`check()`](fn@check), the structural checker.
//!
//! Rules worth knowing:
//! - Size: CurrentSize is the disk's size, except for files whose creator is `qemu` whose CHS
//!   geometry is not the maximum and disagrees with CurrentSize: qemu sizes those by CHS, and so
//!   do we, so that our reads equal `qemu-img convert`. (qemu itself always writes matching
//!   values, or `qem2` with `force_size`.) We write creator `win ` so that qemu sizes our files by
//!   CurrentSize (see [`disk::CREATOR_APP`]).
//! - Dynamic disks: a present block is read whole; its sector bitmap is informational (qemu
//!   ignores it too). New blocks get every bit set. Writing zeros to an absent block allocates
//!   nothing.
//! - Differencing disks: sector bitmaps (MSB first) decide per sector between this layer and the
//!   parent. Writes set only the written sectors' bits; partial sectors are merged with the
//!   parent's bytes first. Parents are opened read-only and never modified.
//! - Parent linkage: the parent's unique id must equal the child's parent unique id; a time stamp
//!   mismatch is only a warning from [`check`](fn@check) (copying a file changes it).
//! - A damaged trailing footer with a good copy at offset 0 is recovered (and reported by
//!   [`check`](fn@check)); the next write puts a good footer back (likewise a damaged copy at 0).
//! - Memory: the block table is held in memory only after checking that it lies inside the file
//!   and has at most [`format::MAX_BAT_ENTRIES`] entries (16 MiB); bitmaps are read per access
//!   (at most 64 KiB, for the largest block size we accept, 256 MiB).
//! - Parents are searched by the override, `W2ru`, `W2ku` (also drive letter stripped), the
//!   deprecated `Wi2r`/`Wi2k`, then the parent name next to the child; loops and chains deeper
//!   than `OpenOptions::max_chain_depth` are refused.

pub mod check;
pub mod disk;
pub mod format;
mod parent;

pub use check::check;
pub use disk::{CreateOptions, Vhd, CREATOR_APP, DEFAULT_BLOCK_SIZE};
pub use format::DiskType;

/// True if these bytes (the first and last 512 bytes of a file) look like a VHD: a `conectix`
/// footer at the end, or a valid footer copy of a dynamic or differencing disk at the start (one
/// whose trailing footer is damaged). A bare cookie at the start is not enough: a raw disk could
/// begin with one by chance, and opening it as a VHD would then fail instead of reading it raw.
pub fn is_vhd(first_512: &[u8], last_512: &[u8]) -> bool {
    if last_512.starts_with(format::FOOTER_COOKIE) {
        return true;
    }
    matches!(
        format::Footer::parse(first_512).map(|f| format::DiskType::from_u32(f.disk_type)),
        Ok(Some(
            format::DiskType::Dynamic | format::DiskType::Differencing
        ))
    )
}
