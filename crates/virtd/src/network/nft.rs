//! nftables: one table per running network (`ip ferrovirt_NETWORK_UUID8`), replaced atomically on start
//! and deleted on destroy, so nothing of ours lingers in the host's ruleset.

use std::fs;
use std::path::Path;

use ferrovirt_api::netmark::TABLE_PREFIX;
use ferrovirt_api::network::{ForwardMode, IpDef};
use ferrovirt_api::ApiError;

use super::link::run;

/// The ruleset of a nat or isolated network.
pub fn ruleset(table: &str, mode: ForwardMode, bridge: &str, ip: &IpDef) -> String {
    let net = ip.cidr();
    // Guest-to-guest traffic is bridged, but with br_netfilter loaded it also passes these hooks.
    let body = match mode {
        ForwardMode::Nat => format!(
            "  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{bridge}\" oifname \"{bridge}\" accept
    iifname \"{bridge}\" ip saddr {net} accept
    oifname \"{bridge}\" ip daddr {net} ct state established,related accept
    iifname \"{bridge}\" reject
    oifname \"{bridge}\" reject
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net} ip daddr 224.0.0.0/24 return
    ip saddr {net} ip daddr 255.255.255.255 return
    ip saddr {net} ip daddr != {net} masquerade
  }}
"
        ),
        // Guests reach each other (bridged, never routed) and the host's DHCP/DNS, nothing else.
        _ => format!(
            "  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{bridge}\" oifname \"{bridge}\" accept
    iifname \"{bridge}\" drop
    oifname \"{bridge}\" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{bridge}\" udp dport {{ 53, 67 }} accept
    iifname \"{bridge}\" tcp dport 53 accept
    iifname \"{bridge}\" drop
  }}
"
        ),
    };
    // "table; delete table; table {...}" replaces a leftover table in one transaction.
    format!("table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n{body}}}\n")
}

/// Load the network's table (replacing any previous one) from a file kept for inspection.
pub fn apply(file: &Path, rules: &str) -> Result<(), ApiError> {
    fs::write(file, rules)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", file.display())))?;
    run("nft", &["-f", &file.to_string_lossy()]).map(|_| ())
}

pub fn delete(table: &str) -> Result<(), ApiError> {
    if tables()?.iter().any(|t| t == table) {
        run("nft", &["delete", "table", "ip", table])?;
    }
    Ok(())
}

/// Our tables (family ip, name starting with ferrovirt_).
pub fn tables() -> Result<Vec<String>, ApiError> {
    let out = run("nft", &["list", "tables", "ip"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter(|t| t.starts_with(TABLE_PREFIX))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip() -> IpDef {
        IpDef {
            address: Ipv4Addr::new(192, 168, 123, 1),
            prefix: 24,
            dhcp_start: None,
            dhcp_end: None,
        }
    }

    #[test]
    fn nat_ruleset_replaces_the_table_and_masquerades_only_the_subnet() {
        let r = ruleset("ferrovirt_default", ForwardMode::Nat, "fvbr0", &ip());
        assert!(r.starts_with(
            "table ip ferrovirt_default\ndelete table ip ferrovirt_default\ntable ip ferrovirt_default {"
        ));
        assert!(r.contains("ip saddr 192.168.123.0/24 ip daddr != 192.168.123.0/24 masquerade"));
        assert!(r.contains("iifname \"fvbr0\" oifname \"fvbr0\" accept"));
        assert!(!r.contains("hook input"));
    }

    #[test]
    fn isolated_ruleset_forwards_nothing_and_lets_only_dhcp_dns_in() {
        let r = ruleset("ferrovirt_iso", ForwardMode::Isolated, "fviso0", &ip());
        assert!(!r.contains("masquerade"));
        assert!(r.contains("iifname \"fviso0\" drop\n    oifname \"fviso0\" drop"));
        assert!(r.contains("udp dport { 53, 67 } accept"));
    }
}
