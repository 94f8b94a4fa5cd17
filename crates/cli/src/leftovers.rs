//! `host-validate`'s census of ferrovirt's network objects on the host that no daemon owns:
//! bridges and TAPs (by their interface alias), nftables tables (by name) and dnsmasq processes
//! (by their config file), as left behind when a state folder is removed while its network runs.

use std::fs;
use std::path::{Path, PathBuf};

use ferrovirt_api::netmark::{self, Owner};
use ferrovirt_api::network::NetworkInfo;

/// One object of ours that no known network owns, with the command that removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub what: String,
    pub remove: String,
}

/// What the daemon reports: its networks, or why it could not be asked.
pub type Known<'a> = Result<&'a [NetworkInfo], &'a str>;

fn owned(known: &Known, owner: &Owner) -> bool {
    known
        .as_ref()
        .is_ok_and(|nets| nets.iter().any(|n| n.active && owner.is(&n.name, &n.uuid)))
}

fn describe(owner: &Owner) -> String {
    format!(
        "network '{}' with a uuid starting {}",
        owner.network, owner.uuid8
    )
}

/// Marked devices of this network namespace: (name, alias).
fn marked_devices() -> Vec<(String, String)> {
    let Ok(dir) = fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let alias = fs::read_to_string(e.path().join("ifalias")).ok()?;
            let alias = alias.trim().to_string();
            alias.starts_with("ferrovirt:").then_some((name, alias))
        })
        .collect()
}

/// Our nftables tables (family ip); none when nft is missing.
fn marked_tables() -> Vec<String> {
    std::process::Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().strip_prefix("table ip "))
                .filter(|t| t.starts_with(netmark::TABLE_PREFIX))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// dnsmasq processes in this network namespace started with a ferrovirt config:
/// (pid, config file, the bridge it serves if the config is still there).
fn our_dnsmasqs() -> Vec<(u32, PathBuf, Option<String>)> {
    let my_ns = fs::read_link("/proc/self/ns/net").ok();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let mut args = cmd.split(|b| *b == 0).map(String::from_utf8_lossy);
            if !args.next()?.ends_with("dnsmasq") {
                return None;
            }
            // Another namespace's dnsmasq serves another namespace's bridges.
            if fs::read_link(format!("/proc/{pid}/ns/net")).ok() != my_ns {
                return None;
            }
            let conf = args.find_map(|a| a.strip_prefix("--conf-file=").map(PathBuf::from))?;
            let text = fs::read_to_string(&conf).ok();
            if text
                .as_deref()
                .is_some_and(|t| !t.starts_with("# Written by ferrovirtd"))
            {
                return None;
            }
            let bridge = text.as_deref().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("interface=").map(str::to_string))
            });
            Some((pid, conf, bridge))
        })
        .collect()
}

/// Every object of ours on this host (this network namespace) that `known` does not own.
pub fn find(known: Known) -> Vec<Leftover> {
    let mut out = Vec::new();
    let mut orphan_bridges = Vec::new();
    for (dev, alias) in marked_devices() {
        if let Some(owner) = netmark::bridge_owner(&alias) {
            if !owned(&known, &owner) {
                out.push(Leftover {
                    what: format!("bridge {dev} of {}", describe(&owner)),
                    remove: format!("ip link del {dev}"),
                });
                orphan_bridges.push(dev);
            }
        } else if let Some((domain, net)) = netmark::tap_owner(&alias) {
            // A TAP of a running VM on a known network is in use; any other is left over.
            if !net.as_ref().is_some_and(|o| owned(&known, o)) {
                out.push(Leftover {
                    what: format!("TAP {dev} of domain '{domain}'"),
                    remove: format!("ip link del {dev}"),
                });
            }
        }
    }
    for table in marked_tables() {
        if let Some(owner) = netmark::table_owner(&table) {
            if !owned(&known, &owner) {
                out.push(Leftover {
                    what: format!("nftables table ip {table} of {}", describe(&owner)),
                    remove: format!("nft delete table ip {table}"),
                });
            }
        }
    }
    for (pid, conf, bridge) in our_dnsmasqs() {
        let why = match &bridge {
            None => Some(format!("its config {} is gone", conf.display())),
            Some(b)
                if orphan_bridges.contains(b) || !Path::new("/sys/class/net").join(b).exists() =>
            {
                Some(format!("it serves bridge {b}, which no known network owns"))
            }
            Some(_) => None,
        };
        if let Some(why) = why {
            out.push(Leftover {
                what: format!("dnsmasq pid {pid} ({why})"),
                remove: format!("kill {pid}"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovirt_api::network::ForwardMode;

    fn net(name: &str, uuid: &str, active: bool) -> NetworkInfo {
        NetworkInfo {
            name: name.into(),
            uuid: uuid.into(),
            active,
            persistent: true,
            autostart: true,
            bridge: "fvbr0".into(),
            forward: ForwardMode::Nat,
            address: None,
        }
    }

    #[test]
    fn only_active_networks_of_the_same_uuid_own_objects() {
        let owner = netmark::bridge_owner("ferrovirt:net:default:0badf00d").unwrap();
        let nets = [net("default", "0badf00d-0000", true)];
        assert!(owned(&Ok(&nets), &owner));
        let other = [net("default", "deadbeef-0000", true)];
        assert!(!owned(&Ok(&other), &owner));
        let inactive = [net("default", "0badf00d-0000", false)];
        assert!(!owned(&Ok(&inactive), &owner));
        assert!(!owned(&Err("no daemon"), &owner));
    }
}
