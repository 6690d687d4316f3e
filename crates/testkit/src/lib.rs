//! Sample VM disks for tests, benchmarks and the quickstart.
//!
//! [`write_sample_disk`] builds, entirely in Rust, what a small VM disk looks like: a GPT
//! partition table (with its protective MBR) and one EFI system partition at 1 MiB holding a
//! FAT32 filesystem with a few real files, one of them megabytes of deterministic pseudo-random
//! bytes (so compression and zero-detection cannot cheat). The image is a sparse raw file: free
//! space stays a hole, as on a real thin-provisioned disk. The returned [`SampleManifest`] says
//! where everything is and what each file holds, so tests can find the files again after
//! conversions, backups and restores.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Where the partition starts: 1 MiB, as every modern partitioner aligns.
pub const PARTITION_OFFSET: u64 = 1 << 20;
/// The smallest sample: FAT32 needs at least 65525 clusters; with 512-byte clusters that is
/// about 33 MiB of partition.
pub const MIN_SIZE: u64 = 40 << 20;

/// One file written into the sample filesystem.
#[derive(Clone, Debug)]
pub struct SampleFile {
    /// Path inside the filesystem, `/`-separated, e.g. `docs/notes.txt`.
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    pub content: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct SampleManifest {
    pub disk_size: u64,
    /// Byte offset and length of the FAT32 partition in the image.
    pub partition_offset: u64,
    pub partition_size: u64,
    pub volume_label: String,
    pub files: Vec<SampleFile>,
}

/// Deterministic pseudo-random bytes (xorshift64*): the same on every machine and every run.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sample_files() -> Vec<(String, Vec<u8>)> {
    let readme = "This disk was made by hyperkeep's testkit (make-sample-disk).\r\n\
                  It is a GPT disk with one FAT32 partition, like a small VM's EFI system disk.\r\n"
        .as_bytes()
        .to_vec();
    let notes: Vec<u8> = (1..=200)
        .map(|i| format!("line {i}: backups are only as good as their restores\r\n"))
        .collect::<String>()
        .into_bytes();
    vec![
        ("README.TXT".to_string(), readme),
        (
            "DOCS/HELLO.TXT".to_string(),
            b"Hello from inside a virtual disk.\r\n".to_vec(),
        ),
        ("DOCS/NOTES.TXT".to_string(), notes),
        (
            "DATA/RANDOM.BIN".to_string(),
            pseudo_random_bytes(0x6879_7065_726b_6565, (2 << 20) + 12345),
        ),
    ]
}

/// Write a sample disk of `size` bytes to a new raw image at `path` (never overwrites).
pub fn write_sample_disk(path: &Path, size: u64) -> Result<SampleManifest> {
    if size < MIN_SIZE {
        bail!(
            "a sample disk needs at least {} MiB (FAT32's minimum), {size} bytes were asked for",
            MIN_SIZE >> 20
        );
    }
    if !size.is_multiple_of(1 << 20) {
        bail!("the sample disk size must be a whole number of MiB, got {size} bytes");
    }
    if size > (2u64 << 40) {
        bail!("a sample disk larger than 2 TiB makes no sense (FAT32 and this tool's limits)");
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    let result = build(&mut file, size);
    if result.is_err() {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    result
}

fn build(file: &mut File, size: u64) -> Result<SampleManifest> {
    file.set_len(size)?;
    let sectors = size / 512;

    // Protective MBR, then the GPT with one partition from 1 MiB to 1 MiB before the end
    // (the backup GPT lives in the last 33 sectors).
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(file)
        .context("writing the protective MBR")?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(&mut *file, None)
        .context("creating the GPT")?;
    let part_size = size - 2 * PARTITION_OFFSET;
    disk.add_partition_at(
        "EFI system partition",
        1,
        PARTITION_OFFSET / 512,
        part_size / 512,
        gpt::partition_types::EFI,
        0,
    )
    .context("adding the partition")?;
    disk.write().context("writing the GPT")?;

    let label = *b"HYPERKEEP  ";
    let mut part = Slice {
        file,
        start: PARTITION_OFFSET,
        len: part_size,
        pos: 0,
    };
    fatfs::format_volume(
        &mut part,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .volume_id(0x484b_5031)
            .volume_label(label),
    )
    .context("formatting FAT32")?;
    part.pos = 0;
    let fs = fatfs::FileSystem::new(&mut part, fatfs::FsOptions::new())
        .context("mounting the new FAT32 filesystem")?;
    let mut files = Vec::new();
    {
        let root = fs.root_dir();
        for (path, content) in sample_files() {
            if let Some((dir, _)) = path.rsplit_once('/') {
                if root.open_dir(dir).is_err() {
                    root.create_dir(dir)
                        .with_context(|| format!("creating directory {dir}"))?;
                }
            }
            let mut f = root
                .create_file(&path)
                .with_context(|| format!("creating {path}"))?;
            f.write_all(&content)
                .with_context(|| format!("writing {path}"))?;
            f.flush()?;
            files.push(SampleFile {
                sha256: hex(&Sha256::digest(&content)),
                size: content.len() as u64,
                path,
                content,
            });
        }
    }
    fs.unmount().context("unmounting FAT32")?;
    part.pos = 0;
    fix_fat32(&mut part).context("finishing the FAT32 filesystem")?;
    file.sync_all()?;
    Ok(SampleManifest {
        disk_size: size,
        partition_offset: PARTITION_OFFSET,
        partition_size: part_size,
        volume_label: String::from_utf8_lossy(&label).trim_end().to_string(),
        files,
    })
}

/// Repair what the `fatfs` crate (0.3) gets wrong, so that `fsck.fat` finds the filesystem clean:
/// - it writes a long-name entry before the `.` and `..` entries of each new directory (they
///   must be the first two slots), and points `..` of a top-level directory at the root's
///   cluster (FAT32 wants 0 there);
/// - it leaves the FSInfo free-cluster count "unknown".
///
/// Only touches structures that match exactly the pattern fatfs writes.
fn fix_fat32(part: &mut Slice<'_>) -> io::Result<()> {
    let mut boot = [0u8; 512];
    read_exact_at(part, &mut boot, 0)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let sector = u64::from(u16_at(&boot, 11));
    let cluster_size = sector * u64::from(boot[13]);
    let reserved = u64::from(u16_at(&boot, 14));
    let fats = u64::from(boot[16]);
    let fat_sectors = u64::from(u32_at(&boot, 36));
    let root_cluster = u32_at(&boot, 44);
    let fsinfo_sector = u64::from(u16_at(&boot, 48));
    let total_sectors = u64::from(u32_at(&boot, 32));
    let data_start = (reserved + fats * fat_sectors) * sector;
    let cluster_offset = |c: u32| data_start + (u64::from(c) - 2) * cluster_size;

    let mut root = vec![0u8; cluster_size as usize];
    read_exact_at(part, &mut root, cluster_offset(root_cluster))?;
    for entry in root.chunks_exact(32) {
        let (first, attr) = (entry[0], entry[11]);
        if first == 0 {
            break;
        }
        if first == 0xE5 || attr == 0x0F || attr & 0x10 == 0 {
            continue;
        }
        let cluster = (u32::from(u16_at(entry, 20)) << 16) | u32::from(u16_at(entry, 26));
        let mut dir = [0u8; 128];
        read_exact_at(part, &mut dir, cluster_offset(cluster))?;
        let is_lfn = |i: usize| dir[i * 32 + 11] == 0x0F;
        let name = |i: usize| &dir[i * 32..i * 32 + 11];
        if is_lfn(0) && name(1) == b".          " && is_lfn(2) && name(3) == b"..         " {
            let mut fixed = [0u8; 128];
            fixed[..32].copy_from_slice(&dir[32..64]);
            fixed[32..64].copy_from_slice(&dir[96..128]);
            // `..` of a top-level directory names the root as cluster 0.
            fixed[32 + 20..32 + 22].fill(0);
            fixed[32 + 26..32 + 28].fill(0);
            fixed[64] = 0xE5;
            fixed[96] = 0xE5;
            write_all_at(part, &fixed, cluster_offset(cluster))?;
        }
    }

    // FSInfo: count the free clusters in the first FAT.
    let clusters = (total_sectors * sector - data_start) / cluster_size;
    let mut fat = vec![0u8; (fat_sectors * sector) as usize];
    read_exact_at(part, &mut fat, reserved * sector)?;
    let free = fat
        .chunks_exact(4)
        .skip(2)
        .take(clusters as usize)
        .filter(|e| u32_at(e, 0) & 0x0FFF_FFFF == 0)
        .count() as u32;
    let mut info = [0u8; 512];
    read_exact_at(part, &mut info, fsinfo_sector * sector)?;
    if &info[..4] == b"RRaA" && &info[484..488] == b"rrAa" {
        info[488..492].copy_from_slice(&free.to_le_bytes());
        write_all_at(part, &info, fsinfo_sector * sector)?;
    }
    Ok(())
}

fn read_exact_at(s: &mut Slice<'_>, buf: &mut [u8], at: u64) -> io::Result<()> {
    s.seek(SeekFrom::Start(at))?;
    s.read_exact(buf)
}

fn write_all_at(s: &mut Slice<'_>, buf: &[u8], at: u64) -> io::Result<()> {
    s.seek(SeekFrom::Start(at))?;
    s.write_all(buf)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A window of a file, so the filesystem code sees the partition as its whole device.
struct Slice<'a> {
    file: &'a mut File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Slice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.write(&buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Slice<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}
