//! Runlists ("mapping pairs"): how a non-resident attribute's virtual clusters map to the volume.

/// One run: `len` clusters starting at virtual cluster `vcn`, stored at `lcn` (None = sparse, reads
/// as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub vcn: u64,
    pub lcn: Option<u64>,
    pub len: u64,
}

/// Decode the mapping pairs of one attribute extent starting at `start_vcn`. Every run must lie
/// inside `total_clusters`; the error text says what is wrong (the caller adds the record).
pub fn decode(data: &[u8], start_vcn: u64, total_clusters: u64) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    let mut pos = 0usize;
    let mut vcn = start_vcn;
    let mut lcn: i64 = 0;
    while pos < data.len() {
        let header = data[pos];
        if header == 0 {
            return Ok(runs);
        }
        let len_bytes = (header & 0x0F) as usize;
        let off_bytes = (header >> 4) as usize;
        if len_bytes == 0 || len_bytes > 8 || off_bytes > 8 {
            return Err(format!(
                "runlist header byte {header:#04x} at {pos} is invalid"
            ));
        }
        let end = pos + 1 + len_bytes + off_bytes;
        if end > data.len() {
            return Err("runlist runs past the end of its attribute".into());
        }
        let mut len: u64 = 0;
        for i in 0..len_bytes {
            len |= (data[pos + 1 + i] as u64) << (8 * i);
        }
        if len == 0 || len > total_clusters {
            return Err(format!(
                "run of {len} clusters is impossible on a volume of {total_clusters} clusters"
            ));
        }
        let run_lcn = if off_bytes == 0 {
            None
        } else {
            let mut delta: i64 = 0;
            for i in 0..off_bytes {
                delta |= (data[pos + 1 + len_bytes + i] as i64) << (8 * i);
            }
            // Sign-extend the delta from its stored width.
            let shift = 64 - 8 * off_bytes as u32;
            if shift < 64 {
                delta = (delta << shift) >> shift;
            }
            lcn = lcn
                .checked_add(delta)
                .ok_or_else(|| "runlist delta overflows".to_string())?;
            if lcn < 0
                || (lcn as u64)
                    .checked_add(len)
                    .is_none_or(|e| e > total_clusters)
            {
                return Err(format!(
                    "run of {len} clusters at cluster {lcn} lies outside the volume ({total_clusters} clusters)"
                ));
            }
            Some(lcn as u64)
        };
        runs.push(Run {
            vcn,
            lcn: run_lcn,
            len,
        });
        vcn = vcn
            .checked_add(len)
            .ok_or_else(|| "runlist VCN overflows".to_string())?;
        pos = end;
    }
    Err("runlist has no terminator".into())
}

/// Runs of one attribute must not share clusters: a hostile image could otherwise make one file
/// read another's data, or a "loop" of runs read the same clusters again and again.
pub fn check_no_overlap(runs: &[Run]) -> Result<(), String> {
    let mut allocated: Vec<(u64, u64)> = runs
        .iter()
        .filter_map(|r| r.lcn.map(|l| (l, r.len)))
        .collect();
    allocated.sort_unstable();
    for w in allocated.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(format!(
                "runs at clusters {} (+{}) and {} overlap",
                w[0].0, w[0].1, w[1].0
            ));
        }
    }
    Ok(())
}

/// Index of the run holding `vcn` (runs sorted and contiguous).
pub fn find(runs: &[Run], vcn: u64) -> Option<usize> {
    let i = runs.partition_point(|r| r.vcn + r.len <= vcn);
    (i < runs.len() && runs[i].vcn <= vcn).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_signed_and_sparse_runs() {
        // 0x10 clusters at 0x100, sparse 8, 4 clusters at 0x100-0x20 = 0xE0.
        let data = [0x21, 0x10, 0x00, 0x01, 0x01, 0x08, 0x11, 0x04, 0xE0, 0x00];
        let runs = decode(&data, 0, 1 << 20).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    vcn: 0,
                    lcn: Some(0x100),
                    len: 0x10
                },
                Run {
                    vcn: 0x10,
                    lcn: None,
                    len: 8
                },
                Run {
                    vcn: 0x18,
                    lcn: Some(0xE0),
                    len: 4
                },
            ]
        );
        assert_eq!(find(&runs, 0x17), Some(1));
        assert_eq!(find(&runs, 0x1C), None);
        check_no_overlap(&runs).unwrap();
    }

    #[test]
    fn rejects_out_of_volume_and_overlap() {
        assert!(decode(&[0x21, 0x10, 0x00, 0x01, 0x00], 0, 0x105).is_err());
        assert!(decode(&[0x21, 0x10], 0, 0x1000).is_err());
        let runs = decode(&[0x11, 0x10, 0x20, 0x11, 0x10, 0x08, 0x00], 0, 0x1000).unwrap();
        assert!(check_no_overlap(&runs).is_err());
    }
}
