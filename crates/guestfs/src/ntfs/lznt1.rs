//! LZNT1, the compression of NTFS "compressed" files: a compression unit (usually 16 clusters)
//! is a sequence of chunks, each decompressing to at most 4096 bytes.

const CHUNK: usize = 4096;

/// Decompress one compression unit into `out` (its length is the unit size). Bytes past the last
/// chunk are zero. Errors say why the data cannot be LZNT1.
pub fn decompress(src: &[u8], out: &mut [u8]) -> Result<(), String> {
    out.fill(0);
    let mut sp = 0usize;
    let mut chunk_start = 0usize;
    while sp + 2 <= src.len() && chunk_start < out.len() {
        let header = u16::from_le_bytes([src[sp], src[sp + 1]]);
        if header == 0 {
            break;
        }
        let size = (header & 0x0FFF) as usize + 1;
        let body = src
            .get(sp + 2..sp + 2 + size)
            .ok_or_else(|| format!("LZNT1 chunk at {sp} runs past the compressed data"))?;
        let chunk_end = (chunk_start + CHUNK).min(out.len());
        let dst = &mut out[chunk_start..chunk_end];
        if header & 0x8000 == 0 {
            // Stored chunk.
            let n = size.min(dst.len());
            dst[..n].copy_from_slice(&body[..n]);
        } else {
            decompress_chunk(body, dst)?;
        }
        sp += 2 + size;
        chunk_start += CHUNK;
    }
    Ok(())
}

fn decompress_chunk(src: &[u8], dst: &mut [u8]) -> Result<usize, String> {
    let mut sp = 0usize;
    let mut dp = 0usize;
    while sp < src.len() {
        let flags = src[sp];
        sp += 1;
        for bit in 0..8 {
            if sp >= src.len() {
                break;
            }
            if flags & (1 << bit) == 0 {
                if dp >= dst.len() {
                    return Err("LZNT1 chunk decompresses past 4096 bytes".into());
                }
                dst[dp] = src[sp];
                dp += 1;
                sp += 1;
            } else {
                if sp + 2 > src.len() {
                    return Err("LZNT1 back-reference truncated".into());
                }
                let token = u16::from_le_bytes([src[sp], src[sp + 1]]) as usize;
                sp += 2;
                if dp == 0 {
                    return Err("LZNT1 back-reference at the start of a chunk".into());
                }
                // The split between offset and length bits depends on how much of the chunk is
                // already decompressed: offset bits = max(4, ceil(log2(dp))).
                let mut lg = 0;
                let mut i = dp - 1;
                while i >= 0x10 {
                    lg += 1;
                    i >>= 1;
                }
                let len_mask = 0x0FFF >> lg;
                let offset = (token >> (12 - lg)) + 1;
                let len = (token & len_mask) + 3;
                if offset > dp {
                    return Err("LZNT1 back-reference before the start of the chunk".into());
                }
                if dp + len > dst.len() {
                    return Err("LZNT1 chunk decompresses past 4096 bytes".into());
                }
                for k in 0..len {
                    dst[dp + k] = dst[dp + k - offset];
                }
                dp += len;
            }
        }
    }
    Ok(dp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_backref() {
        // "abc" literals then a back-reference offset 3 length 6 -> "abcabcabc".
        // dp = 3 -> lg 0: offset bits 4, token = ((3-1) << 12) | (6-3).
        let token: u16 = (2 << 12) | 3;
        let body = [
            0b0000_1000,
            b'a',
            b'b',
            b'c',
            token as u8,
            (token >> 8) as u8,
        ];
        let mut src = vec![];
        let header: u16 = 0xB000 | (body.len() as u16 - 1);
        src.extend_from_slice(&header.to_le_bytes());
        src.extend_from_slice(&body);
        let mut out = vec![0xFFu8; 8192];
        decompress(&src, &mut out).unwrap();
        assert_eq!(&out[..9], b"abcabcabc");
        assert!(out[9..].iter().all(|&b| b == 0));
    }

    #[test]
    fn garbage_is_error_not_panic() {
        let mut out = vec![0u8; 65536];
        for seed in 0..2000u32 {
            let src: Vec<u8> = (0..300u32)
                .map(|i| {
                    (i.wrapping_mul(2654435761)
                        .wrapping_add(seed.wrapping_mul(40503))
                        >> 13) as u8
                })
                .collect();
            let _ = decompress(&src, &mut out);
        }
    }
}
