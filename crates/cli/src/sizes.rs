//! Size arguments: virsh's setmem takes KiB by default; suffixes K, M, G, T (binary) are accepted.

/// Parse SIZE (default unit KiB) into MiB; errors say what was wrong.
pub fn parse_kib_default_to_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 524288, 512M, 1G)"))?;
    let kib_per: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "k" | "kib" | "kb" => 1,
        "m" | "mib" | "mb" => 1024,
        "g" | "gib" | "gb" => 1024 * 1024,
        "t" | "tib" | "tb" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}' (use K, M, G or T)"
            ))
        }
    };
    let kib = n
        .checked_mul(kib_per)
        .ok_or_else(|| format!("size '{s}' is too large"))?;
    if kib < 1024 {
        return Err(format!("size '{s}' is less than 1 MiB"));
    }
    Ok(kib / 1024)
}

/// virt-install's disk size: GiB, fractions allowed ("16", "0.5").
pub fn parse_gib(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("disk size '{s}' is not a number of GiB"))?;
    if v.is_nan() || v <= 0.0 || !v.is_finite() {
        return Err(format!("disk size '{s}' must be more than 0 GiB"));
    }
    let bytes = v * 1024.0 * 1024.0 * 1024.0;
    if bytes > (1u64 << 50) as f64 {
        return Err(format!("disk size '{s}' GiB is too large"));
    }
    // Round up to whole 512-byte sectors.
    Ok((bytes as u64).div_ceil(512) * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_kib_default_to_mib("524288").unwrap(), 512);
        assert_eq!(parse_kib_default_to_mib("512M").unwrap(), 512);
        assert_eq!(parse_kib_default_to_mib("2G").unwrap(), 2048);
        assert!(parse_kib_default_to_mib("0").is_err());
        assert!(parse_kib_default_to_mib("12X").is_err());
        assert_eq!(parse_gib("16").unwrap(), 16 << 30);
        assert_eq!(parse_gib("0.5").unwrap(), 512 << 20);
        assert!(parse_gib("0").is_err());
        assert!(parse_gib("abc").is_err());
    }
}
