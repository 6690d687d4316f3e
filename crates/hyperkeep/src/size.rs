//! Sizes on the command line: `4096`, `32M`, `32MiB`, `1G`, `1.5T`. Binary units throughout
//! (disk people mean MiB when they write MB; Hyper-V's "32 MB blocks" are 32 MiB).

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        other => {
            return Err(format!(
                "unknown unit {other:?} in size {s:?}; use bytes or K, M, G, T (e.g. 32M, 10G)"
            ))
        }
    };
    if num.is_empty() {
        return Err(format!("{s:?} is not a size; use e.g. 4096, 32M or 10G"));
    }
    let bad = || format!("{s:?} is not a size; use e.g. 4096, 32M or 10G");
    let v = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !v.is_finite() || v >= u64::MAX as f64 || v.fract() != 0.0 {
            return Err(format!("{s:?} is not a whole number of bytes"));
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift)
            .ok_or_else(|| format!("{s:?} is too large"))?
    };
    Ok(v)
}

/// "4.0 GiB", for humans.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// "4.0 GiB (4294967296 bytes)".
pub fn human_exact(n: u64) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else {
        format!("{} ({n} bytes)", human(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("32M").unwrap(), 32 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert!(parse_size("0.3").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_exact(4 << 30), "4.0 GiB (4294967296 bytes)");
        assert_eq!(human_exact(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
