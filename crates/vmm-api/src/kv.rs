//! The `key=value,key=value` syntax of `--disk` and `--net`: split on ',' then on the first '='.
//!
//! There is no escaping: a value containing ',' cannot be carried, so [`check_value`] refuses it
//! when argv is built, and the parser can never see one.

/// Splits "k=v,k=v" into pairs, refusing keys not in `known` and keys given twice.
pub fn split<'a>(s: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not key=value"))?;
        if !known.contains(&k) {
            return Err(format!(
                "unknown option '{k}' (known: {})",
                known.join(", ")
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("'{k}' given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Refuses a value the syntax cannot carry.
pub fn check_value(key: &str, value: &str) -> Result<(), String> {
    if value.contains(',') {
        return Err(format!(
            "{key}={value}: contains ',', which the key=value,... syntax cannot carry (rename or link it)"
        ));
    }
    Ok(())
}

pub fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}
