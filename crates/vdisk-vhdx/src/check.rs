//! A read-only structural check of a VHDX file that lists every problem instead of stopping at
//! the first, as `hyperkeep disk check` needs: one damaged header or region table is worth
//! reporting even though the file still opens from the other copy.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use vdisk_core::{Error, OpenOptions, Result};

use crate::format::*;
use crate::reader::VhdxFile;

/// Most overlapping-block problems listed one by one.
const MAX_OVERLAPS_LISTED: usize = 20;

/// Check `path` (and its parent chain) without modifying it. Returns every structural problem
/// found (empty = clean). `Err` only if the file cannot be opened or read at all.
pub fn check(path: &Path) -> Result<Vec<String>> {
    let (mut problems, chain_ok) = check_layer(path)?;
    if !chain_ok {
        return Ok(problems);
    }
    match crate::Vhdx::open(path, &OpenOptions::default()) {
        Err(e) => problems.push(format!("parent chain: {e}")),
        Ok(disk) => {
            // Each parent is checked as a file of its own too.
            let mut layer = disk.parent.as_deref();
            while let Some(p) = layer {
                if let Some(pp) = &p.top.path {
                    let (ps, _) = check_layer(pp)?;
                    problems.extend(
                        ps.into_iter()
                            .map(|x| format!("parent {}: {x}", pp.display())),
                    );
                }
                layer = p.parent.as_deref();
            }
        }
    }
    Ok(problems)
}

/// The problems of one file, and whether its parent chain is worth opening (it is a
/// differencing disk whose own BAT is sound).
fn check_layer(path: &Path) -> Result<(Vec<String>, bool)> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let f = match VhdxFile::parse_lenient(Arc::new(file), Some(path)) {
        Ok(f) => f,
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => return Ok((vec![e.to_string()], false)),
    };
    let mut problems = f.problems.clone();
    let (bat_problems, total) = f.validate_bat();
    problems.extend(bat_problems.iter().cloned());
    if total > bat_problems.len() {
        problems.push(format!(
            "... and {} more BAT problems",
            total - bat_problems.len()
        ));
    }
    problems.extend(overlapping_blocks(&f));
    if !f.has_parent() {
        let stray = (0..f.geo.bitmap_blocks)
            .filter(|&c| {
                let i = f.geo.bitmap_index(c);
                i < f.bat.len() && entry_state(f.bat[i]) == SB_PRESENT
            })
            .count();
        if stray > 0 {
            problems.push(format!(
                "{stray} sector bitmap blocks are marked present in a disk without a parent \
                 (ignored when reading)"
            ));
        }
    }
    Ok((problems, f.has_parent() && total == 0))
}

/// Present blocks that share file space with each other.
fn overlapping_blocks(f: &VhdxFile) -> Vec<String> {
    let bs = f.geo.block_size as u64;
    let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
    for (i, &e) in f.bat.iter().enumerate() {
        let bitmap = f.geo.is_bitmap_index(i as u64);
        let state = entry_state(e);
        let len = match (bitmap, state) {
            (true, SB_PRESENT) => MIB,
            (false, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) => bs,
            _ => continue,
        };
        ranges.push((entry_offset(e), len, i));
    }
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut count = 0usize;
    // Compare each range with the furthest-reaching one before it, so chains of overlaps are
    // all found in one pass.
    let mut reach: Option<(u64, usize)> = None;
    for &(off, len, i) in &ranges {
        if let Some((end, j)) = reach {
            if off < end {
                count += 1;
                if out.len() < MAX_OVERLAPS_LISTED {
                    out.push(format!(
                        "BAT entries {j} and {i} point at overlapping file space (offset {off})"
                    ));
                }
            }
        }
        let end = off.saturating_add(len);
        if reach.is_none_or(|(e, _)| end > e) {
            reach = Some((end, i));
        }
    }
    if count > out.len() {
        out.push(format!(
            "... and {} more overlapping BAT entries",
            count - out.len()
        ));
    }
    out
}
