//! Reparse points: symlinks, junctions (mount points), and the tags whose data we must not
//! return as if it were the file's content (WOF/CompactOS, deduplication).

use super::record::{le16, le32, utf16};

pub const TAG_SYMLINK: u32 = 0xA000_000C;
pub const TAG_MOUNT_POINT: u32 = 0xA000_0003;
pub const TAG_WOF: u32 = 0x8000_0017;
pub const TAG_DEDUP: u32 = 0x8000_0013;
/// Bit 29 of a tag: the reparse point stands for another named entity (a kind of link).
pub const NAME_SURROGATE: u32 = 0x2000_0000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reparse {
    Symlink {
        substitute: String,
        print: String,
        relative: bool,
    },
    Junction {
        substitute: String,
        print: String,
    },
    /// WOF file provider with its algorithm (0 XPRESS4K, 1 LZX, 2 XPRESS8K, 3 XPRESS16K).
    Wof {
        algorithm: Option<u32>,
    },
    Other(u32),
}

pub fn tag(data: &[u8]) -> Option<u32> {
    le32(data, 0)
}

pub fn parse(data: &[u8]) -> Result<Reparse, String> {
    let tag = tag(data).ok_or("reparse point shorter than its header")?;
    let len = le16(data, 4).unwrap_or(0) as usize;
    let body = data
        .get(8..8 + len)
        .ok_or_else(|| format!("reparse data of {len} bytes does not fit its attribute"))?;
    match tag {
        TAG_SYMLINK | TAG_MOUNT_POINT => {
            let header = if tag == TAG_SYMLINK { 12 } else { 8 };
            let field = |o| le16(body, o).map(|v| v as usize);
            let (so, sl, po, pl) = match (field(0), field(2), field(4), field(6)) {
                (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
                _ => return Err("link reparse data truncated".into()),
            };
            let paths = body.get(header..).ok_or("link reparse data truncated")?;
            let get = |o: usize, l: usize| {
                paths
                    .get(o..o + l)
                    .map(|b| utf16(b).0)
                    .ok_or_else(|| format!("link name ({l} bytes at {o}) outside the reparse data"))
            };
            let substitute = get(so, sl)?;
            let print = get(po, pl)?;
            if tag == TAG_SYMLINK {
                let relative = le32(body, 8).unwrap_or(0) & 1 != 0;
                Ok(Reparse::Symlink {
                    substitute,
                    print,
                    relative,
                })
            } else {
                Ok(Reparse::Junction { substitute, print })
            }
        }
        TAG_WOF => {
            // WOF header: version, provider (2 = file provider); then the file provider's
            // version and algorithm.
            let provider = le32(body, 4);
            let algorithm = if provider == Some(2) {
                le32(body, 12)
            } else {
                None
            };
            Ok(Reparse::Wof { algorithm })
        }
        other => Ok(Reparse::Other(other)),
    }
}

pub fn wof_algorithm_name(a: Option<u32>) -> &'static str {
    match a {
        Some(0) => "XPRESS4K",
        Some(1) => "LZX",
        Some(2) => "XPRESS8K",
        Some(3) => "XPRESS16K",
        _ => "unknown algorithm",
    }
}
