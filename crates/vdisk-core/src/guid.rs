//! GUIDs as Microsoft stores them on disk: the first three fields little-endian, the last eight
//! bytes in order. Displayed in the usual `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` form.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid {
    pub data1: u32,
    pub data2: u16,
    pub data3: u16,
    pub data4: [u8; 8],
}

impl Guid {
    pub const ZERO: Guid = Guid {
        data1: 0,
        data2: 0,
        data3: 0,
        data4: [0; 8],
    };

    /// Parse the 16-byte on-disk (mixed-endian) form.
    pub fn from_le_bytes(b: [u8; 16]) -> Guid {
        Guid {
            data1: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            data2: u16::from_le_bytes([b[4], b[5]]),
            data3: u16::from_le_bytes([b[6], b[7]]),
            data4: [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
        }
    }

    /// The 16-byte on-disk (mixed-endian) form.
    pub fn to_le_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.data1.to_le_bytes());
        b[4..6].copy_from_slice(&self.data2.to_le_bytes());
        b[6..8].copy_from_slice(&self.data3.to_le_bytes());
        b[8..16].copy_from_slice(&self.data4);
        b
    }

    /// Big-endian (RFC 4122 byte order) form, as VHD stores its unique ids.
    pub fn from_be_bytes(b: [u8; 16]) -> Guid {
        Guid {
            data1: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            data2: u16::from_be_bytes([b[4], b[5]]),
            data3: u16::from_be_bytes([b[6], b[7]]),
            data4: [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
        }
    }

    pub fn to_be_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.data1.to_be_bytes());
        b[4..6].copy_from_slice(&self.data2.to_be_bytes());
        b[6..8].copy_from_slice(&self.data3.to_be_bytes());
        b[8..16].copy_from_slice(&self.data4);
        b
    }

    /// A fresh random (version 4) GUID.
    pub fn new_random() -> Guid {
        let mut b = [0u8; 16];
        fill_random(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid::from_be_bytes(b)
    }

    pub fn is_zero(&self) -> bool {
        *self == Guid::ZERO
    }
}

/// Random bytes from the operating system. GUIDs only need uniqueness, not secrecy, but the OS
/// source is the simplest way to get it without another dependency.
fn fill_random(buf: &mut [u8]) {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::time::{SystemTime, UNIX_EPOCH};
    #[cfg(unix)]
    {
        use std::io::Read;
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            if f.read_exact(buf).is_ok() {
                return;
            }
        }
    }
    // Fallback (and the Windows path): SipHash with per-process random keys over a counter and
    // the clock. Unique enough for identifiers.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for chunk in buf.chunks_mut(8) {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

impl FromStr for Guid {
    type Err = String;
    /// Accepts `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, optionally in braces (as VHDX parent
    /// locators store it).
    fn from_str(s: &str) -> Result<Guid, String> {
        let t = s.trim();
        let t = t.strip_prefix('{').unwrap_or(t);
        let t = t.strip_suffix('}').unwrap_or(t);
        let hex: String = t.chars().filter(|c| *c != '-').collect();
        let dashes_ok = t.len() == 36
            && t.as_bytes()[8] == b'-'
            && t.as_bytes()[13] == b'-'
            && t.as_bytes()[18] == b'-'
            && t.as_bytes()[23] == b'-';
        if !dashes_ok || hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("not a GUID: {s:?}"));
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Guid::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_endian_round_trip() {
        // The VHDX BAT region GUID as it appears in a file.
        let g: Guid = "2DC27766-F623-4200-9D64-115E9BFD4A08".parse().unwrap();
        let b = g.to_le_bytes();
        assert_eq!(&b[..4], &[0x66, 0x77, 0xc2, 0x2d]);
        assert_eq!(&b[8..], &[0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08]);
        assert_eq!(Guid::from_le_bytes(b), g);
        assert_eq!(g.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert_eq!(format!("{g:?}"), "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(
            "{2dc27766-f623-4200-9d64-115e9bfd4a08}".parse::<Guid>(),
            Ok(g)
        );
    }

    #[test]
    fn random_guids_differ_and_are_v4() {
        let a = Guid::new_random();
        let b = Guid::new_random();
        assert_ne!(a, b);
        assert_eq!(a.data3 >> 12, 4);
        assert!("nonsense".parse::<Guid>().is_err());
    }
}
