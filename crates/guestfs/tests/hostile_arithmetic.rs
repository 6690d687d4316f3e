//! Hand-made images whose on-disk numbers made the parsers overflow (a panic with overflow
//! checks, wrong offsets without) or recurse without end: each must now give an error or a
//! sane answer. The fuzz targets found the first two (fuzz/regressions/); the rest are the same
//! class of bug found by reading the parsers.

use std::sync::Arc;

use guestfs::fs::GuestFs;
use guestfs::volume::{MemDisk, Volume};

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// ext

const EXT_BS: usize = 1024;
/// Inode table at block 5; 16 inodes of 256 bytes (4 blocks).
const EXT_ITABLE: usize = 5;
const EXT_INODE_SIZE: usize = 256;

/// A minimal ext4-style volume of 64 1 KiB blocks: one group, 16 inodes of 256 bytes, the
/// group descriptor at block 2, the inode table at block 5, every inode empty.
fn ext_image() -> Vec<u8> {
    let mut img = vec![0u8; 64 * EXT_BS];
    let sb = &mut img[1024..2048];
    put32(sb, 0, 16); // inodes
    put32(sb, 4, 64); // blocks
    put32(sb, 20, 1); // first data block
    put32(sb, 24, 0); // 1 KiB blocks
    put32(sb, 32, 8192); // blocks per group
    put32(sb, 40, 16); // inodes per group
    put16(sb, 56, 0xEF53);
    put32(sb, 76, 1); // dynamic revision
    put16(sb, 88, EXT_INODE_SIZE as u16);
    put32(sb, 96, 0x2 | 0x40 | 0x8000); // filetype, extents, inline_data
    put32(&mut img, 2 * EXT_BS + 8, EXT_ITABLE as u32);
    img
}

fn ext_inode(img: &mut [u8], ino: usize) -> &mut [u8] {
    let o = EXT_ITABLE * EXT_BS + (ino - 1) * EXT_INODE_SIZE;
    &mut img[o..o + EXT_INODE_SIZE]
}

fn ext_open(img: Vec<u8>) -> guestfs::Result<guestfs::ext::ExtFs> {
    guestfs::ext::open(Volume::from_bytes(img))
}

/// fuzz/regressions/*/ext-read-dir-hole-mul-overflow: a directory whose extent tree maps
/// nothing is one hole "to the end of the address space" (u64::MAX - l blocks); the block loop
/// of `read_dir` multiplied the block number past it by the block size.
#[test]
fn ext_directory_that_is_one_endless_hole() {
    let mut img = ext_image();
    let root = ext_inode(&mut img, 2);
    put16(root, 0, 0o040755);
    put32(root, 4, 4096); // 4 blocks, none mapped
    put32(root, 32, 0x80000); // extents
    put16(root, 40, 0xF30A); // extent header: 0 entries, max 4, depth 0
    put16(root, 44, 4);
    let fs = ext_open(img).unwrap();
    assert!(fs.read_dir(fs.root()).unwrap().is_empty());
}

/// A block count of 2^50 in groups of one block and 2^31 inodes per group: the capacity check
/// `groups * inodes_per_group` overflowed at open.
#[test]
fn ext_group_count_times_inodes_per_group_overflows() {
    let mut img = ext_image();
    let sb = &mut img[1024..2048];
    put32(sb, 96, 0x2 | 0x40 | 0x80); // 64bit
    put16(sb, 254, 64); // descriptor size
    put32(sb, 4, 0);
    put32(sb, 336, 1 << 18); // blocks_count = 2^50
    put32(sb, 32, 1); // blocks per group
    put32(sb, 40, 1 << 31); // inodes per group
    let Err(err) = ext_open(img) else {
        panic!("must not open");
    };
    assert!(err.to_string().contains("inodes do not fit"), "{err}");
}

/// A 64-bit block count whose byte size exceeds 2^64: refused at open, so that no block number
/// the volume accepts can overflow `block * block_size` later.
#[test]
fn ext_block_count_beyond_the_byte_address_space() {
    let mut img = ext_image();
    let sb = &mut img[1024..2048];
    put32(sb, 96, 0x2 | 0x40 | 0x80);
    put16(sb, 254, 64);
    put32(sb, 4, u32::MAX);
    put32(sb, 336, u32::MAX);
    let Err(err) = ext_open(img) else {
        panic!("must not open");
    };
    assert!(err.to_string().contains("exceed 2^64 bytes"), "{err}");
}

/// An inline-data file whose `system.data` xattr names an EA inode that is the file itself: the
/// read followed the chain (inline data -> system.data in an EA inode -> its inline data -> ...)
/// until the stack overflowed.
#[test]
fn ext_inline_data_continued_in_an_ea_inode_loop() {
    let mut img = ext_image();
    let f = ext_inode(&mut img, 12);
    put16(f, 0, 0o100644);
    put32(f, 4, 100); // more than the 60 bytes of i_block
    put16(f, 26, 1);
    put32(f, 32, 0x1000_0000); // inline data
    f[40..44].copy_from_slice(b"abcd");
    put16(f, 128, 32); // i_extra_isize
                       // In-inode xattrs after the extra fields: magic, then "system.data" stored in inode 12.
    put32(f, 160, 0xEA02_0000);
    let e = &mut f[164..];
    e[0] = 4; // name length
    e[1] = 7; // "system."
    put32(e, 4, 12); // value inode: itself
    put32(e, 8, 40); // value size
    e[16..20].copy_from_slice(b"data");
    let fs = ext_open(img).unwrap();
    let mut buf = [0u8; 100];
    let Err(err) = fs.read_at(12, None, &mut buf, 0) else {
        panic!("must fail");
    };
    assert!(err.to_string().contains("EA inode"), "{err}");
    // The xattr is still listed and readable as a value of its own (one level, no loop).
    let _ = fs.metadata(12).unwrap();
    let _ = fs.read_at(12, Some("system.data"), &mut buf, 0);
}

// ---------------------------------------------------------------------------------------------
// exFAT

const EX_SECTOR: usize = 512;
const EX_HEAP: usize = 32; // sector of cluster 2
const EX_CLUSTERS: u32 = 16;

fn rotate_sum32(data: &[u8], skip: &[usize]) -> u32 {
    let mut c = 0u32;
    for (i, &b) in data.iter().enumerate() {
        if !skip.contains(&i) {
            c = c.rotate_right(1).wrapping_add(b as u32);
        }
    }
    c
}

fn set_checksum(set: &mut [u8]) {
    let mut c = 0u16;
    for (i, &b) in set.iter().enumerate() {
        if i != 2 && i != 3 {
            c = c.rotate_right(1).wrapping_add(b as u16);
        }
    }
    put16(set, 2, c);
}

fn ex_cluster(c: u32) -> usize {
    (EX_HEAP + (c as usize - 2)) * EX_SECTOR
}

/// A file entry set (file, stream extension, one name entry) named `name` (one character).
fn ex_entry_set(attrs: u16, first_cluster: u32, data_len: u64, valid_len: u64) -> [u8; 96] {
    let mut s = [0u8; 96];
    s[0] = 0x85;
    s[1] = 2;
    put16(&mut s, 4, attrs);
    s[32] = 0xC0;
    s[33] = 0x01; // allocation possible, FAT chain
    s[35] = 1; // name length
    put64(&mut s, 40, valid_len);
    put32(&mut s, 52, first_cluster);
    put64(&mut s, 56, data_len);
    s[64] = 0xC1;
    put16(&mut s, 66, b'x' as u16);
    set_checksum(&mut s);
    s
}

/// A 16-cluster exFAT volume (512-byte sectors and clusters): FAT at sector 24, root directory
/// in cluster 2 with the bitmap (cluster 4) and up-case table (cluster 3) entries, then `sets`.
fn exfat_image(sets: &[[u8; 96]]) -> Vec<u8> {
    let total_sectors = EX_HEAP + EX_CLUSTERS as usize;
    let mut img = vec![0u8; total_sectors * EX_SECTOR];
    {
        let b = &mut img[..EX_SECTOR];
        b[0..3].copy_from_slice(&[0xEB, 0x76, 0x90]);
        b[3..11].copy_from_slice(b"EXFAT   ");
        put64(b, 72, total_sectors as u64);
        put32(b, 80, 24); // FAT offset
        put32(b, 84, 1); // FAT length
        put32(b, 88, EX_HEAP as u32);
        put32(b, 92, EX_CLUSTERS);
        put32(b, 96, 2); // root cluster
        put16(b, 104, 0x100); // revision 1.0
        b[108] = 9; // 512-byte sectors
        b[109] = 0; // 1 sector per cluster
        b[110] = 1; // one FAT
        b[510] = 0x55;
        b[511] = 0xAA;
    }
    let sum = rotate_sum32(&img[..11 * EX_SECTOR], &[106, 107, 112]);
    for o in (11 * EX_SECTOR..12 * EX_SECTOR).step_by(4) {
        put32(&mut img, o, sum);
    }
    // FAT: media and reserved entries, then clusters 2 (root), 3 (up-case), 4 (bitmap) and 5
    // (anything a test points at) each a one-cluster chain.
    let fat = 24 * EX_SECTOR;
    put32(&mut img, fat, 0xFFFF_FFF8);
    put32(&mut img, fat + 4, 0xFFFF_FFFF);
    for c in 2..=5 {
        put32(&mut img, fat + 4 * c, 0xFFFF_FFFF);
    }
    // Up-case table: two bytes (maps U+0000 to itself).
    let upcase = [0u8, 0];
    img[ex_cluster(3)..ex_cluster(3) + 2].copy_from_slice(&upcase);
    let root = ex_cluster(2);
    img[root] = 0x81; // allocation bitmap
    put32(&mut img, root + 20, 4);
    put64(&mut img, root + 24, 2);
    img[root + 32] = 0x82; // up-case table
    put32(&mut img, root + 32 + 4, rotate_sum32(&upcase, &[]));
    put32(&mut img, root + 32 + 20, 3);
    put64(&mut img, root + 32 + 24, 2);
    for (i, s) in sets.iter().enumerate() {
        let at = root + 64 + 96 * i;
        img[at..at + 96].copy_from_slice(s);
    }
    img
}

/// A file of u64::MAX bytes: `metadata` rounded its size up to whole clusters and overflowed.
#[test]
fn exfat_file_of_u64_max_bytes() {
    let img = exfat_image(&[ex_entry_set(0x20, 5, u64::MAX, 0)]);
    let fs = guestfs::exfat::open(Volume::from_bytes(img)).unwrap();
    let entries = fs.read_dir(fs.root()).unwrap();
    assert_eq!(entries.len(), 1);
    let m = fs.metadata(entries[0].node).unwrap();
    assert_eq!(m.size, u64::MAX);
    assert_eq!(m.allocated, u64::MAX); // saturated
                                       // Past the valid length everything reads as zeros; the end is never reached.
    let mut buf = [1u8; 16];
    assert_eq!(fs.read_at(entries[0].node, None, &mut buf, 0).unwrap(), 16);
    assert_eq!(buf, [0; 16]);
}

/// A directory claiming 200 MiB over a one-cluster chain: refused before its buffer is
/// allocated (the claimed size is bounded, but far beyond what the volume holds).
#[test]
fn exfat_directory_larger_than_its_chain() {
    let img = exfat_image(&[ex_entry_set(0x10, 5, 200 << 20, 200 << 20)]);
    let fs = guestfs::exfat::open(Volume::from_bytes(img)).unwrap();
    let entries = fs.read_dir(fs.root()).unwrap();
    let Err(err) = fs.read_dir(entries[0].node) else {
        panic!("must fail");
    };
    assert!(err.to_string().contains("bytes of clusters"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Partition tables

/// A protective MBR on a 4Kn disk smaller than two sectors: the last LBA was computed as
/// `size / 4096 - 1` and underflowed.
#[test]
fn gpt_protective_mbr_on_a_disk_smaller_than_two_sectors() {
    let mut d = vec![0u8; 1024];
    d[446 + 4] = 0xEE;
    put32(&mut d, 446 + 8, 1);
    put32(&mut d, 446 + 12, 1);
    d[510] = 0x55;
    d[511] = 0xAA;
    let disk: Arc<dyn vdisk::VirtualDisk> = Arc::new(MemDisk::new(d, 4096));
    let Err(err) = guestfs::partitions(disk.as_ref()) else {
        panic!("must fail");
    };
    assert!(
        err.to_string().contains("no room for a GPT header"),
        "{err}"
    );
}
