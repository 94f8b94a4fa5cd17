//! Size arguments: virsh's setmem takes KiB by default, with libvirt's units (K, M, G, T, KiB,
//! MB, ... see ferrovirt_api::size); virt-install's disk sizes are GiB.

use ferrovirt_api::size;

/// Parse setmem's SIZE (default unit KiB) into KiB, exactly; errors say what was wrong.
pub fn parse_memory_kib(s: &str) -> Result<u64, String> {
    let sized = size::parse(s, "KiB")?;
    if !sized.exact {
        return Err(format!("size '{s}' is not a whole number of KiB"));
    }
    if sized.kib < size::MIN_MEMORY_KIB {
        return Err(format!("size '{s}' is less than 1 MiB"));
    }
    Ok(sized.kib)
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
        assert_eq!(parse_memory_kib("524288").unwrap(), 512 * 1024);
        assert_eq!(parse_memory_kib("219100").unwrap(), 219100);
        assert_eq!(parse_memory_kib("512M").unwrap(), 512 * 1024);
        assert_eq!(parse_memory_kib("2G").unwrap(), 2048 * 1024);
        assert!(parse_memory_kib("0").is_err());
        assert!(parse_memory_kib("12X").is_err());
        assert!(parse_memory_kib("1000000b").is_err());
        assert_eq!(parse_gib("16").unwrap(), 16 << 30);
        assert_eq!(parse_gib("0.5").unwrap(), 512 << 20);
        assert!(parse_gib("0").is_err());
        assert!(parse_gib("abc").is_err());
    }
}
