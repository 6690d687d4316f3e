//! The NTFS boot sector: geometry of the volume and where `$MFT` starts.

use super::corrupt;
use crate::Result;

/// Largest cluster NTFS allows (Windows 10 1709+ formats up to 2 MiB clusters).
const MAX_CLUSTER_SIZE: u64 = 2 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Boot {
    pub bytes_per_sector: u32,
    pub cluster_size: u64,
    pub total_sectors: u64,
    pub mft_lcn: u64,
    pub record_size: u32,
    pub index_record_size: u32,
    pub serial: u64,
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// "Clusters per record" byte: positive = that many clusters, negative = 2^-v bytes (used when a
/// record is smaller than a cluster, e.g. 1 KiB records on 4 KiB clusters).
fn record_size(v: u8, cluster: u64) -> Option<u64> {
    let s = v as i8;
    if s > 0 {
        Some(s as u64 * cluster)
    } else if (-31..0).contains(&s) {
        Some(1u64 << (-(s as i32)))
    } else {
        None
    }
}

pub fn parse(bs: &[u8]) -> Result<Boot> {
    if bs.len() < 512 || &bs[3..11] != b"NTFS    " {
        return Err(corrupt("no NTFS signature in the boot sector"));
    }
    let bytes_per_sector = le16(bs, 0x0B) as u32;
    if !bytes_per_sector.is_power_of_two() || !(256..=4096).contains(&bytes_per_sector) {
        return Err(corrupt(format!(
            "boot sector: bytes per sector {bytes_per_sector} is not a power of two in 256..4096"
        )));
    }
    // Sectors per cluster: values above 0x80 encode 2^(256-v) (clusters over 64 KiB).
    let spc = bs[0x0D];
    let sectors_per_cluster: u64 = if spc <= 0x80 {
        spc as u64
    } else {
        let shift = 256 - spc as u32;
        if shift > 20 {
            0
        } else {
            1u64 << shift
        }
    };
    let cluster_size = sectors_per_cluster * bytes_per_sector as u64;
    if sectors_per_cluster == 0
        || !sectors_per_cluster.is_power_of_two()
        || cluster_size > MAX_CLUSTER_SIZE
    {
        return Err(corrupt(format!(
            "boot sector: sectors per cluster byte {spc:#x} is invalid"
        )));
    }
    let total_sectors = le64(bs, 0x28);
    let mft_lcn = le64(bs, 0x30);
    let rs = record_size(bs[0x40], cluster_size);
    let irs = record_size(bs[0x44], cluster_size);
    let (record_size, index_record_size) = match (rs, irs) {
        (Some(r), Some(i))
            if r.is_power_of_two()
                && (512..=65536).contains(&r)
                && i.is_power_of_two()
                && (512..=65536).contains(&i) =>
        {
            (r as u32, i as u32)
        }
        _ => {
            return Err(corrupt(format!(
                "boot sector: file record size byte {:#x} / index record size byte {:#x} invalid",
                bs[0x40], bs[0x44]
            )))
        }
    };
    let total_clusters = total_sectors / sectors_per_cluster;
    if total_sectors == 0 || mft_lcn == 0 || mft_lcn >= total_clusters {
        return Err(corrupt(format!(
            "boot sector: $MFT at cluster {mft_lcn} is outside the volume of {total_clusters} clusters"
        )));
    }
    Ok(Boot {
        bytes_per_sector,
        cluster_size,
        total_sectors,
        mft_lcn,
        record_size,
        index_record_size,
        serial: le64(bs, 0x48),
    })
}

/// True if `boot_sector` (the first 512 bytes of a volume) is a plausible NTFS boot sector.
pub fn probe(boot_sector: &[u8]) -> bool {
    boot_sector.len() >= 512
        && boot_sector[510] == 0x55
        && boot_sector[511] == 0xAA
        && parse(boot_sector).is_ok()
}
