//! Recognise the filesystem in a volume by its boot sector or superblock, and open it.

use crate::fs::GuestFs;
use crate::volume::Volume;
use crate::{Error, Result};

/// The filesystems [`open_fs`] tries, in order, for error messages.
pub const TRIED: &str = "NTFS, exFAT, FAT12/16/32, ext2/3/4";

/// Open the filesystem in `volume`. NTFS and exFAT are recognised by their OEM names, FAT by a
/// sane BIOS parameter block, ext by the superblock magic at byte 1080.
pub fn open_fs(volume: Volume) -> Result<Box<dyn GuestFs>> {
    let mut head = vec![0u8; 2048.min(volume.len()) as usize];
    volume.read_exact_at(&mut head, 0)?;
    if head.len() >= 512 {
        if crate::ntfs::probe(&head[..512]) {
            return Ok(Box::new(crate::ntfs::open(volume)?));
        }
        if crate::exfat::probe(&head) {
            return Ok(Box::new(crate::exfat::open(volume)?));
        }
        if crate::fat::probe(&head) {
            return Ok(Box::new(crate::fat::open(volume)?));
        }
    }
    if head.len() >= 2048 && crate::ext::probe(&head[1024..2048]) {
        return Ok(Box::new(crate::ext::open(volume)?));
    }
    Err(Error::unsupported(
        "guest",
        format!(
            "no known filesystem in this volume of {} bytes (tried {TRIED}); it may be swap, LVM, \
             BitLocker, an unformatted partition, or a filesystem hyperkeep cannot read",
            volume.len()
        ),
    ))
}
