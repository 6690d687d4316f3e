//! Reading file data: plain (resident, sparse, partly initialized), LZNT1-compressed units,
//! and WOF/CompactOS XPRESS chunks.

use std::sync::Arc;

use super::record::*;
use super::{corrupt, lznt1, runlist, xpress, File, NtfsFs, Stream, MAX_COMPRESSION_UNIT};
use crate::{Error, Result};

impl NtfsFs {
    /// A WOF-compressed file: the main stream is a sparse placeholder of the real size; the
    /// data is in the `WofCompressedData` stream as a table of chunk offsets (one per chunk but
    /// the first, relative to the end of the table) followed by XPRESS Huffman chunks, a chunk
    /// as long as its output being stored uncompressed.
    pub(super) fn read_wof(
        &self,
        f: &File,
        chunk_size: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize> {
        let what = || {
            format!(
                "'{}' (MFT record {}) WofCompressedData",
                f.display_name(),
                f.num
            )
        };
        let size = f
            .data
            .iter()
            .find(|s| s.name.is_empty())
            .map_or(0, |s| s.data_size);
        let comp = f
            .stream("WofCompressedData")
            .ok_or_else(|| corrupt(format!("{}: stream missing", what())))?;
        if offset >= size {
            return Ok(0);
        }
        let chunks = size.div_ceil(chunk_size);
        let entry = if size > u32::MAX as u64 { 8 } else { 4 };
        let table_len = (chunks - 1) * entry;
        if table_len > comp.data_size {
            return Err(corrupt(format!(
                "{}: chunk table of {chunks} chunks is larger than the stream",
                what()
            )));
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let c = pos / chunk_size;
            let in_chunk = (pos % chunk_size) as usize;
            let chunk_len = chunk_size.min(size - c * chunk_size) as usize;
            let take = (chunk_len - in_chunk).min(n - done);
            let key = (f.num, None, c);
            let cached = self
                .units
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key);
            let data = match cached {
                Some(d) => d,
                None => {
                    let entry_at = |i: u64| -> Result<u64> {
                        if i == 0 {
                            return Ok(0);
                        }
                        let mut b = [0u8; 8];
                        let got =
                            self.read_stream(f, comp, &mut b[..entry as usize], (i - 1) * entry)?;
                        if got != entry as usize {
                            return Err(corrupt(format!("{}: chunk table truncated", what())));
                        }
                        Ok(u64::from_le_bytes(b))
                    };
                    let start = table_len.saturating_add(entry_at(c)?);
                    let end = if c + 1 == chunks {
                        comp.data_size
                    } else {
                        table_len.saturating_add(entry_at(c + 1)?)
                    };
                    if end < start || end > comp.data_size || end - start > chunk_len as u64 {
                        return Err(corrupt(format!(
                            "{}: chunk {c} spans bytes {start}..{end} of a {}-byte stream",
                            what(),
                            comp.data_size
                        )));
                    }
                    let mut src = vec![0u8; (end - start) as usize];
                    self.read_stream(f, comp, &mut src, start)?;
                    let mut out = vec![0u8; chunk_len];
                    if src.len() == chunk_len {
                        out.copy_from_slice(&src);
                    } else {
                        xpress::decompress(&src, &mut out)
                            .map_err(|e| corrupt(format!("{}: chunk {c}: {e}", what())))?;
                    }
                    let d = Arc::new(out);
                    self.units.lock().unwrap_or_else(|e| e.into_inner()).insert(
                        key,
                        d.clone(),
                        d.len(),
                    );
                    d
                }
            };
            buf[done..done + take].copy_from_slice(&data[in_chunk..in_chunk + take]);
            done += take;
        }
        Ok(n)
    }

    pub(super) fn read_stream(
        &self,
        f: &File,
        s: &Stream,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<usize> {
        let what = || {
            format!(
                "'{}' (MFT record {}) stream '{}'",
                f.display_name(),
                f.num,
                s.name
            )
        };
        if s.flags & ATTR_ENCRYPTED != 0 {
            return Err(Error::unsupported(
                "NTFS",
                format!(
                    "{} is EFS-encrypted; it can only be read on Windows with the owner's key",
                    what()
                ),
            ));
        }
        if !s.is_compressed() {
            return self.geo.read_plain(&what, s, buf, offset);
        }
        self.read_compressed(f, s, buf, offset, &what)
    }

    fn read_compressed(
        &self,
        f: &File,
        s: &Stream,
        buf: &mut [u8],
        offset: u64,
        what: &dyn Fn() -> String,
    ) -> Result<usize> {
        if offset >= s.data_size {
            return Ok(0);
        }
        let cs = self.geo.cluster;
        if s.compression_unit == 0 {
            return Err(Error::unsupported(
                "NTFS",
                format!("{}: compressed with a compression unit of 0", what()),
            ));
        }
        let unit_clusters = 1u64 << s.compression_unit;
        let unit_bytes = unit_clusters * cs;
        if unit_bytes > MAX_COMPRESSION_UNIT {
            return Err(Error::unsupported(
                "NTFS",
                format!(
                    "{}: compression unit of {unit_bytes} bytes (cluster size over 4 KiB)",
                    what()
                ),
            ));
        }
        let n = (s.data_size - offset).min(buf.len() as u64) as usize;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let unit = pos / unit_bytes;
            let in_unit = (pos - unit * unit_bytes) as usize;
            let take = (unit_bytes as usize - in_unit).min(n - done);
            let dst = &mut buf[done..done + take];
            if pos >= s.init_size {
                dst.fill(0);
            } else {
                self.read_unit(f, s, unit, unit_clusters, in_unit, dst, what)?;
                let valid = (s.init_size - pos).min(take as u64) as usize;
                dst[valid..].fill(0);
            }
            done += take;
        }
        Ok(n)
    }

    /// One compression unit: all sparse = zeros; fully allocated = stored uncompressed;
    /// otherwise the allocated clusters hold LZNT1 data.
    #[allow(clippy::too_many_arguments)]
    fn read_unit(
        &self,
        f: &File,
        s: &Stream,
        unit: u64,
        unit_clusters: u64,
        in_unit: usize,
        dst: &mut [u8],
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let cs = self.geo.cluster;
        let first_vcn = unit * unit_clusters;
        let end_vcn = first_vcn + unit_clusters;
        let mut pieces: Vec<(Option<u64>, u64)> = Vec::new();
        let mut vcn = first_vcn;
        while vcn < end_vcn {
            let Some(i) = runlist::find(&s.runs, vcn) else {
                break;
            };
            let r = s.runs[i];
            let len = (r.vcn + r.len).min(end_vcn) - vcn;
            pieces.push((r.lcn.map(|l| l + (vcn - r.vcn)), len));
            vcn += len;
        }
        let allocated: u64 = pieces.iter().filter(|p| p.0.is_some()).map(|p| p.1).sum();
        if allocated == 0 {
            dst.fill(0);
            return Ok(());
        }
        if allocated == unit_clusters {
            // Stored uncompressed: read only what is asked, straight into the caller's buffer.
            let off = unit * unit_clusters * cs + in_unit as u64;
            return self.geo.read_runs(what, &s.runs, dst, off);
        }
        let key = (f.num, Some(s.name.clone()), unit);
        let cached = self
            .units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key);
        let data = match cached {
            Some(d) => d,
            None => {
                let mut comp = vec![0u8; (allocated * cs) as usize];
                let mut at = 0usize;
                for (lcn, len) in &pieces {
                    // Compressed data sits in the leading allocated clusters; sparse clusters after
                    // it only pad the unit.
                    if let Some(l) = lcn {
                        let bytes = (len * cs) as usize;
                        self.geo
                            .vol
                            .read_exact_at(&mut comp[at..at + bytes], l * cs)?;
                        at += bytes;
                    }
                }
                let mut out = vec![0u8; (unit_clusters * cs) as usize];
                lznt1::decompress(&comp, &mut out)
                    .map_err(|e| corrupt(format!("{}: compression unit {unit}: {e}", what())))?;
                let d = Arc::new(out);
                self.units.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    key,
                    d.clone(),
                    d.len(),
                );
                d
            }
        };
        dst.copy_from_slice(&data[in_unit..in_unit + dst.len()]);
        Ok(())
    }
}
