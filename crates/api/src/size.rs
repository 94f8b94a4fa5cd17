//! Memory sizes with libvirt's units ("scaled integers"), kept in KiB as libvirt keeps them.
//!
//! Units, case-insensitive: `b`/`byte`/`bytes`; `k`, `m`, `g`, `t`, `p`, `e` alone or followed by
//! `iB` (powers of 1024) or by `B` (powers of 1000). `KiB` and `k` are both 1024 bytes.

/// The largest memory a definition may have: 16 TiB, in KiB.
pub const MAX_MEMORY_KIB: u64 = 16 << 30;

/// The smallest memory a definition may have, in KiB (1 MiB).
pub const MIN_MEMORY_KIB: u64 = 1024;

/// Bytes in one `unit`; None when the unit is not one libvirt knows.
pub fn unit_bytes(unit: &str) -> Option<u64> {
    let u = unit.trim().to_ascii_lowercase();
    match u.as_str() {
        "b" | "byte" | "bytes" => return Some(1),
        "" => return None,
        _ => {}
    }
    // A unit starting with a multi-byte character is simply unknown (split_at would panic).
    let (letter, rest) = u.split_at_checked(1)?;
    let power = match letter {
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        "e" => 6,
        _ => return None,
    };
    let base: u64 = match rest {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    Some(base.pow(power))
}

/// A size converted to KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kib {
    /// Rounded up to a whole KiB.
    pub kib: u64,
    /// False when the size was not a whole number of KiB (and was rounded up).
    pub exact: bool,
}

/// `value` `unit` in KiB; errors name the unit or say the value is too large.
pub fn to_kib(value: u64, unit: &str) -> Result<Kib, String> {
    let per = unit_bytes(unit).ok_or_else(|| {
        format!(
            "unknown size unit '{unit}' (use b, KiB, MiB, GiB, TiB, k, M, G, T, KB, MB, GB ...)"
        )
    })?;
    let too_large = || format!("{value} {unit} is too large");
    if per % 1024 == 0 {
        let kib = value.checked_mul(per / 1024).ok_or_else(too_large)?;
        return Ok(Kib { kib, exact: true });
    }
    let bytes = u128::from(value) * u128::from(per);
    let kib = u64::try_from(bytes.div_ceil(1024)).map_err(|_| too_large())?;
    Ok(Kib {
        kib,
        exact: bytes % 1024 == 0,
    })
}

/// A size written as text: a whole number with an optional unit ("219100", "219100KiB",
/// "512 M", "4GiB"); `default_unit` applies when there is none.
pub fn parse(text: &str, default_unit: &str) -> Result<Kib, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num.parse().map_err(|_| {
        format!("'{text}' is not a size (a whole number with an optional unit: 219100, 512M, 4GiB)")
    })?;
    let unit = unit.trim();
    to_kib(value, if unit.is_empty() { default_unit } else { unit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_units() {
        let exact = |kib| Kib { kib, exact: true };
        assert_eq!(to_kib(219100, "KiB"), Ok(exact(219100)));
        assert_eq!(to_kib(219100, "k"), Ok(exact(219100)));
        assert_eq!(to_kib(219100, "K"), Ok(exact(219100)));
        assert_eq!(to_kib(512, "M"), Ok(exact(512 * 1024)));
        assert_eq!(to_kib(512, "MiB"), Ok(exact(512 * 1024)));
        assert_eq!(to_kib(4, "GiB"), Ok(exact(4 << 20)));
        assert_eq!(to_kib(4, "g"), Ok(exact(4 << 20)));
        assert_eq!(to_kib(1, "TiB"), Ok(exact(1 << 30)));
        assert_eq!(to_kib(2048, "b"), Ok(exact(2)));
        assert_eq!(to_kib(2048, "bytes"), Ok(exact(2)));
        assert_eq!(to_kib(1024000, "KB"), Ok(exact(1_000_000)));
        assert_eq!(
            to_kib(1, "MB"),
            Ok(Kib {
                kib: 977,
                exact: false
            })
        );
        assert_eq!(
            to_kib(1000, "b"),
            Ok(Kib {
                kib: 1,
                exact: false
            })
        );
        assert!(to_kib(1, "parsecs").unwrap_err().contains("'parsecs'"));
        assert!(to_kib(u64::MAX, "EiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn parses_text_with_and_without_unit() {
        assert_eq!(parse("219100", "KiB").unwrap().kib, 219100);
        assert_eq!(parse("219100KiB", "MiB").unwrap().kib, 219100);
        assert_eq!(parse(" 512 M ", "KiB").unwrap().kib, 512 * 1024);
        assert_eq!(parse("4", "GiB").unwrap().kib, 4 << 20);
        assert!(parse("M", "KiB").is_err());
        assert!(parse("-1", "KiB").is_err());
        assert!(parse("1.5G", "KiB").is_err());
    }

    /// Found by the domain_xml fuzz target: `<currentMemory unit='\u{fffd}iB'>` panicked.
    #[test]
    fn a_unit_starting_with_a_multibyte_character_is_unknown() {
        assert_eq!(unit_bytes("\u{fffd}iB"), None);
        assert_eq!(unit_bytes("\u{e9}"), None);
        assert!(to_kib(4, "\u{fffd}iB").is_err());
    }
}
