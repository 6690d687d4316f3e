//! XPRESS with Huffman coding ("LZXPRESS Huffman", [MS-XCA] 2.1-2.2), the codec of WOF /
//! CompactOS files compressed as XPRESS4K, XPRESS8K or XPRESS16K.
//!
//! Each block of up to 65536 output bytes starts with 256 bytes holding 512 four-bit code
//! lengths (symbols 0-255 are literals, 256-511 matches), followed by a bit stream read in
//! little-endian 16-bit words, most significant bit first, with match-length extension bytes
//! interleaved in the byte stream.

const TABLE_BITS: u32 = 15;
const BLOCK: usize = 65536;

/// Canonical Huffman decoding table indexed by the next 15 bits: (symbol, code length), length 0
/// = no code (a damaged or incomplete table).
fn build_table(lengths: &[u8]) -> Result<Vec<(u16, u8)>, String> {
    let mut table = vec![(0u16, 0u8); 1 << TABLE_BITS];
    let mut next = 0usize;
    for len in 1..=15u8 {
        for (sym, _) in lengths.iter().enumerate().filter(|(_, &l)| l == len) {
            let span = 1usize << (TABLE_BITS - len as u32);
            if next + span > table.len() {
                return Err("Huffman code lengths over-subscribe the code space".into());
            }
            table[next..next + span].fill((sym as u16, len));
            next += span;
        }
    }
    if next == 0 {
        return Err("Huffman table has no codes".into());
    }
    Ok(table)
}

/// Decompress `src` into exactly `out.len()` bytes.
pub fn decompress(src: &[u8], out: &mut [u8]) -> Result<(), String> {
    let rd16 = |pos: usize| -> u32 {
        // Reads past the end see zeros: the decoder looks up to two words ahead of the last one
        // the compressor needed.
        let lo = src.get(pos).copied().unwrap_or(0) as u32;
        let hi = src.get(pos + 1).copied().unwrap_or(0) as u32;
        lo | hi << 8
    };
    let mut ip = 0usize;
    let mut op = 0usize;
    while op < out.len() {
        let raw = src
            .get(ip..ip + 256)
            .ok_or("compressed data ends before a Huffman table")?;
        let mut lengths = [0u8; 512];
        for (i, b) in raw.iter().enumerate() {
            lengths[2 * i] = b & 0x0F;
            lengths[2 * i + 1] = b >> 4;
        }
        let table = build_table(&lengths)?;
        ip += 256;
        let mut bits: u32 = (rd16(ip) << 16) | rd16(ip + 2);
        ip += 4;
        let mut extra: i32 = 16;
        let block_end = out.len().min(op + BLOCK);
        while op < block_end {
            if ip > src.len() + 4 {
                return Err("bit stream runs past the compressed data".into());
            }
            let (sym, len) = table[(bits >> (32 - TABLE_BITS)) as usize];
            if len == 0 {
                return Err("bit pattern with no Huffman code".into());
            }
            bits <<= len;
            extra -= len as i32;
            if extra < 0 {
                bits |= rd16(ip) << (-extra) as u32;
                extra += 16;
                ip += 2;
            }
            if sym < 256 {
                out[op] = sym as u8;
                op += 1;
                continue;
            }
            let sym = sym - 256;
            let mut length = (sym & 15) as usize;
            let offset_bits = (sym >> 4) as u32;
            if length == 15 {
                length = *src.get(ip).ok_or("match length byte missing")? as usize;
                ip += 1;
                if length == 255 {
                    length = rd16(ip) as usize;
                    ip += 2;
                    if length < 15 {
                        return Err("invalid long match length".into());
                    }
                    length -= 15;
                }
                length += 15;
            }
            length += 3;
            let mut offset = 1usize << offset_bits;
            if offset_bits > 0 {
                offset += (bits >> (32 - offset_bits)) as usize;
                bits <<= offset_bits;
                extra -= offset_bits as i32;
                if extra < 0 {
                    bits |= rd16(ip) << (-extra) as u32;
                    extra += 16;
                    ip += 2;
                }
            }
            if offset > op {
                return Err(format!("match at {op} refers {offset} bytes back"));
            }
            if op + length > out.len() {
                return Err("match runs past the end of the chunk".into());
            }
            for k in 0..length {
                out[op + k] = out[op + k - offset];
            }
            op += length;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All 512 symbols with 9-bit codes: symbol s has code s.
    fn flat_stream(symbols: &[(u16, u32, u32)]) -> Vec<u8> {
        let mut out = vec![0x99u8; 256];
        let mut words: Vec<u16> = Vec::new();
        let mut acc: u32 = 0;
        let mut n = 0;
        for &(sym, extra, extra_bits) in symbols {
            for (v, nb) in [(sym as u32, 9), (extra, extra_bits)] {
                for i in (0..nb).rev() {
                    acc = (acc << 1) | ((v >> i) & 1);
                    n += 1;
                    if n == 16 {
                        words.push(acc as u16);
                        acc = 0;
                        n = 0;
                    }
                }
            }
        }
        if n > 0 {
            words.push((acc << (16 - n)) as u16);
        }
        words.extend([0, 0]);
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    #[test]
    fn literals_and_a_match() {
        // "abc", then a match of length 6 at offset 3: symbol 256 + (1 << 4) + 3, offset low bit 1.
        let src = flat_stream(&[
            (b'a' as u16, 0, 0),
            (b'b' as u16, 0, 0),
            (b'c' as u16, 0, 0),
            (256 + 16 + 3, 1, 1),
        ]);
        let mut out = [0u8; 9];
        decompress(&src, &mut out).unwrap();
        assert_eq!(&out, b"abcabcabc");
    }

    #[test]
    fn garbage_is_error_not_panic() {
        let mut out = vec![0u8; 16384];
        for seed in 0..300u32 {
            let src: Vec<u8> = (0..2000u32)
                .map(|i| {
                    (i.wrapping_mul(2654435761)
                        .wrapping_add(seed.wrapping_mul(97))
                        >> 11) as u8
                })
                .collect();
            let _ = decompress(&src, &mut out);
        }
    }
}
