//! virsh's network verbs (net-*) and the domain interface verbs (domiflist, domifaddr).

use std::path::PathBuf;

use clap::Subcommand;
use ferrovirt_api::client::Client;

use crate::{print_json, read_file, Failure};

#[derive(Subcommand)]
pub enum NetCommand {
    /// List networks (active only unless --all)
    NetList {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        inactive: bool,
    },
    /// Define a network from a TOML or libvirt network XML file
    NetDefine { file: PathBuf },
    /// Remove an inactive network's definition
    NetUndefine { network: String },
    /// Start a network (bridge, DHCP/DNS, NAT)
    NetStart { network: String },
    /// Stop a network and remove its bridge, dnsmasq and firewall table
    NetDestroy { network: String },
    /// Start the network when ferrovirtd starts (--disable to undo)
    NetAutostart {
        network: String,
        #[arg(long)]
        disable: bool,
    },
    /// Print the network's libvirt XML (or --toml for the native format)
    NetDumpxml {
        network: String,
        #[arg(long)]
        toml: bool,
    },
    /// Show information about a network
    NetInfo { network: String },
    /// Show the DHCP leases of a network
    NetDhcpLeases {
        network: String,
        /// Only the lease of this MAC address
        #[arg(long)]
        mac: Option<String>,
    },
    /// List a domain's network interfaces
    Domiflist { domain: String },
    /// Show a domain's interface addresses (from the network's DHCP leases)
    Domifaddr { domain: String },
}

/// A virsh-style table: a header, a dashed line, one row per entry, an empty line.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut s = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let head = line(header.to_vec());
    let mut out = format!("{head}\n{}\n", "-".repeat(head.len() + 2));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out.push('\n');
    out
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Unix seconds as "YYYY-MM-DD HH:MM:SS" (UTC).
pub(crate) fn utc(secs: u64) -> String {
    if secs == 0 {
        return "never".into();
    }
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn run(client: &Client, cmd: NetCommand, json: bool) -> Result<(), Failure> {
    let say = |v: &ferrovirt_api::network::NetworkInfo, msg: String| {
        if json {
            print_json(v);
        } else {
            println!("{msg}\n");
        }
    };
    match cmd {
        NetCommand::NetList { all, inactive } => {
            let mut nets = client.net_list(all || inactive)?;
            if inactive {
                nets.retain(|n| !n.active);
            }
            if json {
                print_json(&nets);
            } else {
                let rows: Vec<Vec<String>> = nets
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            if n.active { "active" } else { "inactive" }.into(),
                            yes(n.autostart),
                            yes(n.persistent),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["Name", "State", "Autostart", "Persistent"], &rows)
                );
            }
        }
        NetCommand::NetDefine { file } => {
            let text = read_file(&file)?;
            let resp = client.net_define(&text)?;
            for w in &resp.warnings {
                eprintln!("WARNING {w}");
            }
            say(
                &resp.network,
                format!(
                    "Network {} defined from {}",
                    resp.network.name,
                    file.display()
                ),
            );
        }
        NetCommand::NetUndefine { network } => {
            client.net_undefine(&network)?;
            if json {
                println!("{{}}");
            } else {
                println!("Network {network} has been undefined\n");
            }
        }
        NetCommand::NetStart { network } => {
            let n = client.net_action(&network, "start")?;
            say(&n, format!("Network {network} started"));
        }
        NetCommand::NetDestroy { network } => {
            let n = client.net_action(&network, "destroy")?;
            say(&n, format!("Network {network} destroyed"));
        }
        NetCommand::NetAutostart { network, disable } => {
            let n = client.net_set_autostart(&network, !disable)?;
            let verb = if disable { "unmarked" } else { "marked" };
            say(&n, format!("Network {network} {verb} as autostarted"));
        }
        NetCommand::NetDumpxml { network, toml } => {
            let text = if toml {
                client.net_toml(&network)?
            } else {
                client.net_xml(&network)?
            };
            print!("{text}");
        }
        NetCommand::NetInfo { network } => {
            let n = client.net_get(&network)?;
            if json {
                print_json(&n);
            } else {
                let rows = [
                    ("Name", n.name.clone()),
                    ("UUID", n.uuid.clone()),
                    ("Active", yes(n.active)),
                    ("Persistent", yes(n.persistent)),
                    ("Autostart", yes(n.autostart)),
                    ("Bridge", n.bridge.clone()),
                    ("Forward", n.forward.as_str().to_string()),
                    ("Address", n.address.clone().unwrap_or("-".into())),
                ];
                for (k, v) in rows {
                    println!("{:<16}{v}", format!("{k}:"));
                }
                println!();
            }
        }
        NetCommand::NetDhcpLeases { network, mac } => {
            let mut leases = client.net_leases(&network)?;
            if let Some(m) = &mac {
                leases.retain(|l| l.mac.eq_ignore_ascii_case(m));
            }
            if json {
                print_json(&leases);
            } else {
                let rows: Vec<Vec<String>> = leases
                    .iter()
                    .map(|l| {
                        let dash = |s: &str| {
                            if s.is_empty() {
                                "-".to_string()
                            } else {
                                s.to_string()
                            }
                        };
                        vec![
                            utc(l.expiry),
                            l.mac.clone(),
                            "ipv4".into(),
                            l.address.clone(),
                            dash(&l.hostname),
                            dash(&l.client_id),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "Expiry Time (UTC)",
                            "MAC address",
                            "Protocol",
                            "IP address",
                            "Hostname",
                            "Client ID or DUID"
                        ],
                        &rows
                    )
                );
            }
        }
        NetCommand::Domiflist { domain } => {
            let nics = client.dom_interfaces(&domain)?;
            if json {
                print_json(&nics);
            } else {
                let rows: Vec<Vec<String>> = nics
                    .iter()
                    .map(|n| {
                        vec![
                            n.interface.clone(),
                            n.kind.clone(),
                            n.source.clone(),
                            n.model.clone(),
                            n.mac.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["Interface", "Type", "Source", "Model", "MAC"], &rows)
                );
            }
        }
        NetCommand::Domifaddr { domain } => {
            let addrs = client.dom_addresses(&domain)?;
            if json {
                print_json(&addrs);
            } else {
                let rows: Vec<Vec<String>> = addrs
                    .iter()
                    .map(|a| {
                        vec![
                            a.interface.clone(),
                            a.mac.clone(),
                            a.protocol.clone(),
                            a.address.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["Name", "MAC address", "Protocol", "Address"], &rows)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "never");
        assert_eq!(utc(86_400), "1970-01-02 00:00:00");
        assert_eq!(utc(1_764_131_045), "2025-11-26 04:24:05");
    }
}
