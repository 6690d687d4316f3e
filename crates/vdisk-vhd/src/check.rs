//! `check`: look for everything structurally wrong in a VHD file without modifying it.
//!
//! Unlike [`Vhd::open`](crate::Vhd::open), which stops at the first thing that makes the disk
//! unreadable, the checker keeps going and lists every problem it can see.

use std::fs::File;
use std::path::Path;

use vdisk_core::{Error, OpenOptions, ReadAt, Result};

use crate::disk::Vhd;
use crate::format::*;

/// Most problems of one kind we list one by one; the rest are counted.
const MAX_LISTED: usize = 20;

struct Problems {
    list: Vec<String>,
    suppressed: usize,
}

impl Problems {
    fn push(&mut self, s: String) {
        self.list.push(s);
    }
    /// For problems that can repeat per block: list the first few, count the rest.
    fn push_many(&mut self, count: &mut usize, s: String) {
        *count += 1;
        if *count <= MAX_LISTED {
            self.list.push(s);
        } else {
            self.suppressed += 1;
        }
    }
}

/// Check the structure of the VHD at `path` (and its parent linkage). Returns every problem
/// found, empty if the file is clean; entries starting with `warning:` are not errors (a parent
/// time stamp that differs from the parent file's modification time, e.g. after a copy). Fails
/// only if the file cannot be read at all.
pub fn check(path: &Path) -> Result<Vec<String>> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?
        .len();
    let mut p = Problems {
        list: Vec::new(),
        suppressed: 0,
    };
    check_structure(&file, size, &mut p)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if p.list.is_empty() {
        // Linkage, and anything the opener refuses that the structure walk did not see.
        match Vhd::open(path, &OpenOptions::default()) {
            Err(e) => p.push(e.to_string()),
            Ok(v) => {
                for n in v.notes() {
                    p.push(n.clone());
                }
                if let (Some(ts), Some(parent)) = (v.parent_timestamp(), v.parent()) {
                    if let Some(pp) = parent.path() {
                        let mtime = std::fs::metadata(pp)
                            .and_then(|m| m.modified())
                            .map(vhd_timestamp)
                            .ok();
                        if let Some(m) = mtime.filter(|&m| m != ts) {
                            p.push(format!(
                                "warning: parent time stamp {ts} recorded in {} differs from the modification \
                                 time of {} ({m}, seconds since 2000-01-01); the parent may have been modified \
                                 or only copied",
                                path.display(),
                                pp.display()
                            ));
                        }
                    }
                }
            }
        }
    }
    if p.suppressed > 0 {
        p.list.push(format!(
            "... and {} more problems of the kinds above",
            p.suppressed
        ));
    }
    Ok(p.list)
}

fn check_structure(file: &File, size: u64, p: &mut Problems) -> std::io::Result<()> {
    if size < FOOTER_SIZE as u64 {
        p.push(format!(
            "file is only {size} bytes; a VHD ends with a 512-byte footer"
        ));
        return Ok(());
    }
    let mut tail = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut tail, size - FOOTER_SIZE as u64)?;
    let mut head = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut head, 0)?;
    let tail_f = Footer::parse(&tail);
    let head_f = Footer::parse(&head);
    let is_sparse = |f: &Footer| f.disk_type == 3 || f.disk_type == 4;
    let footer = match (&tail_f, &head_f) {
        (Ok(t), _) => t.clone(),
        (Err(e), Ok(h)) if is_sparse(h) => {
            p.push(format!("footer at the end of the file: {}", detail(e)));
            h.clone()
        }
        (Err(e), _) => {
            p.push(format!(
                "footer at the end of the file: {}; no valid copy at offset 0",
                detail(e)
            ));
            return Ok(());
        }
    };
    let data_end = if tail_f.is_ok() {
        size - FOOTER_SIZE as u64
    } else {
        size
    };
    let Some(kind) = DiskType::from_u32(footer.disk_type) else {
        p.push(format!("unknown disk type {}", footer.disk_type));
        return Ok(());
    };
    if footer.features & FEATURES_RESERVED == 0 {
        p.push("footer features field lacks the always-set reserved bit 0x2".into());
    }
    if kind == DiskType::Fixed {
        if footer.current_size > data_end {
            p.push(format!(
                "fixed disk of {} bytes, but only {data_end} bytes precede the footer (truncated)",
                footer.current_size
            ));
        }
        return Ok(());
    }
    match (&tail_f, &head_f) {
        (Ok(_), Err(e)) => p.push(format!("footer copy at offset 0: {}", detail(e))),
        (Ok(t), Ok(h)) if t != h => {
            p.push("footer copy at offset 0 differs from the footer at the end of the file".into())
        }
        _ => {}
    }
    let ho = footer.data_offset;
    if ho
        .checked_add(DYN_HEADER_SIZE as u64)
        .is_none_or(|e| e > size)
    {
        p.push(format!(
            "dynamic disk header offset {ho} lies outside the file ({size} bytes)"
        ));
        return Ok(());
    }
    let mut hb = vec![0u8; DYN_HEADER_SIZE];
    file.read_exact_at(&mut hb, ho)?;
    let h = match DynHeader::parse(&hb) {
        Ok(h) => h,
        Err(e) => {
            p.push(detail(&e));
            return Ok(());
        }
    };
    if h.header_version != VERSION_1_0 {
        p.push(format!(
            "dynamic header version {:#x} (expected 0x10000)",
            h.header_version
        ));
    }
    let bs = h.block_size as u64;
    if bs == 0 || !bs.is_multiple_of(SECTOR) || bs > MAX_BLOCK_SIZE as u64 {
        p.push(format!(
            "block size {bs} is not a multiple of 512 between 512 bytes and 256 MiB"
        ));
        return Ok(());
    }
    let needed = footer.current_size / SECTOR * SECTOR;
    let needed = needed.div_ceil(bs);
    if (h.max_table_entries as u64) < needed {
        p.push(format!(
            "block table has {} entries; the disk size {} needs {needed}",
            h.max_table_entries, footer.current_size
        ));
    }
    let table_len = h.max_table_entries as u64 * 4;
    let table_end = h.table_offset.saturating_add(table_len);
    if h.table_offset < SECTOR || table_end > data_end {
        p.push(format!(
            "block table at {} ({} entries) does not lie inside the file ({size} bytes)",
            h.table_offset, h.max_table_entries
        ));
        return Ok(());
    }
    if h.max_table_entries as u64 > MAX_BAT_ENTRIES {
        p.push(format!(
            "block table has {} entries, more than the {MAX_BAT_ENTRIES} we examine; not checking the blocks",
            h.max_table_entries
        ));
        return Ok(());
    }
    let bm = bitmap_bytes(h.block_size);
    // Metadata regions blocks must not overlap.
    let mut regions: Vec<(u64, u64, String)> = vec![
        (
            ho,
            ho + DYN_HEADER_SIZE as u64,
            "dynamic disk header".into(),
        ),
        (
            h.table_offset,
            h.table_offset + table_len.div_ceil(SECTOR) * SECTOR,
            "block table".into(),
        ),
    ];
    if ho >= FOOTER_SIZE as u64 {
        regions.push((0, FOOTER_SIZE as u64, "footer copy".into()));
    } else {
        p.push(format!(
            "dynamic header at {ho} overlaps the footer copy at 0"
        ));
    }
    if kind == DiskType::Differencing {
        for (i, l) in h.locators.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
            let code = l.platform_code;
            if ![PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_WI2R, PLATFORM_WI2K].contains(&code) {
                continue;
            }
            let end = l
                .data_offset
                .saturating_add(l.space_bytes().max(l.data_length as u64));
            if end > data_end {
                p.push(format!(
                    "parent locator {i} ({}) data at {} lies past the end of the file",
                    tag_string(&code),
                    l.data_offset
                ));
            } else {
                regions.push((l.data_offset, end, format!("parent locator {i}")));
            }
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.0 < b.1 && b.0 < a.1 {
                p.push(format!("the {} and the {} overlap", a.2, b.2));
            }
        }
    }
    // Block table, read in pieces (it lies inside the file, so it is bounded by the file size).
    let mut blocks: Vec<(u64, u64, u64)> = Vec::new();
    let mut past_eof = 0usize;
    let mut overlaps = 0usize;
    let mut buf = vec![0u8; (1 << 20).min(table_len) as usize];
    let mut idx = 0u64;
    let mut at = h.table_offset;
    while at < table_end {
        let n = (table_end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        for c in buf[..n].chunks_exact(4) {
            let e = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            if e != BAT_ABSENT {
                let start = e as u64 * SECTOR;
                let end = start + bm + bs;
                if end > data_end {
                    p.push_many(
                        &mut past_eof,
                        format!(
                            "block {idx} at offset {start} ends at {end}, past the end of the data ({data_end})"
                        ),
                    );
                } else {
                    for (rs, re, name) in &regions {
                        if start < *re && *rs < end {
                            p.push_many(
                                &mut overlaps,
                                format!("block {idx} at offset {start} overlaps the {name}"),
                            );
                        }
                    }
                    blocks.push((start, end, idx));
                }
            }
            idx += 1;
        }
        at += n as u64;
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[1].0 < w[0].1 {
            p.push_many(
                &mut overlaps,
                format!(
                    "blocks {} (at {}) and {} (at {}) overlap",
                    w[0].2, w[0].0, w[1].2, w[1].0
                ),
            );
        }
    }
    Ok(())
}

fn detail(e: &Error) -> String {
    match e {
        Error::Corrupt { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}
