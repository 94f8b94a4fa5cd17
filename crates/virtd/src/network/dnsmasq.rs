//! dnsmasq (Debian's dnsmasq-base) as the DHCP and DNS server of a nat or isolated network: its
//! own config, pid file and lease file, started by the daemon and restarted if it dies.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovirt_api::network::{DhcpLease, ForwardMode, IpDef};
use ferrovirt_api::ApiError;

use super::link::run;
use crate::runtime::{kill, pid_alive, wait_gone};

/// Where one network's dnsmasq keeps its files.
#[derive(Debug, Clone)]
pub struct Files {
    pub conf: PathBuf,
    pub pid: PathBuf,
    pub leases: PathBuf,
}

pub fn config(files: &Files, network: &str, mode: ForwardMode, bridge: &str, ip: &IpDef) -> String {
    let mut c = format!(
        "# Written by ferrovirtd for network '{network}'; rewritten at every start.
strict-order
pid-file={pid}
except-interface=lo
bind-dynamic
interface={bridge}
dhcp-leasefile={leases}
no-hosts
",
        pid = files.pid.display(),
        leases = files.leases.display(),
    );
    if let (Some(s), Some(e)) = (ip.dhcp_start, ip.dhcp_end) {
        let size = u32::from(e) - u32::from(s) + 1;
        c.push_str(&format!(
            "dhcp-range={s},{e},{}\ndhcp-no-override\ndhcp-authoritative\ndhcp-lease-max={size}\n",
            ip.netmask()
        ));
    }
    if mode == ForwardMode::Isolated {
        // No default route and no DNS forwarding: the guests have nowhere to go.
        c.push_str("dhcp-option=3\nno-resolv\n");
    }
    c
}

/// The pid of our dnsmasq for this config file, if it runs.
pub fn running(files: &Files) -> Option<u32> {
    let arg = conf_arg(&files.conf);
    let from_file = fs::read_to_string(&files.pid)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|p| is_ours(*p, &arg));
    from_file.or_else(|| find(&arg).into_iter().next())
}

fn conf_arg(conf: &Path) -> String {
    format!("--conf-file={}", conf.display())
}

fn is_ours(pid: u32, arg: &str) -> bool {
    pid_alive(pid)
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
}

/// All live dnsmasq processes started with exactly this `--conf-file=` argument.
pub fn find(arg: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_ours(*pid, arg))
        .collect()
}

/// All live dnsmasq processes whose config lies under `dir` (ours, of any network).
pub fn find_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let prefix = format!("--conf-file={}/", dir.display());
    let Ok(proc_dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pid_alive(*pid))
        .filter_map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let arg = cmd
                .split(|b| *b == 0)
                .filter_map(|a| std::str::from_utf8(a).ok())
                .find(|a| a.starts_with(&prefix))?;
            Some((pid, PathBuf::from(&arg["--conf-file=".len()..])))
        })
        .collect()
}

/// Start dnsmasq (it daemonizes and reports start-up errors through its exit status).
pub fn start(files: &Files, conf_text: &str) -> Result<u32, ApiError> {
    if let Some(pid) = running(files) {
        return Ok(pid);
    }
    fs::write(&files.conf, conf_text)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", files.conf.display())))?;
    let _ = fs::remove_file(&files.pid);
    if !files.leases.exists() {
        fs::write(&files.leases, "").map_err(|e| {
            ApiError::internal(format!("cannot create {}: {e}", files.leases.display()))
        })?;
    }
    run("dnsmasq", &[&conf_arg(&files.conf)])
        .map_err(|e| ApiError::internal(format!("dnsmasq did not start: {}", e.message)))?;
    // The pid file is written before the parent process exits.
    for _ in 0..100 {
        if let Some(pid) = running(files) {
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(ApiError::internal(format!(
        "dnsmasq started but wrote no pid file {}",
        files.pid.display()
    )))
}

/// Stop every dnsmasq of this config.
pub fn stop(files: &Files) {
    let mut pids = find(&conf_arg(&files.conf));
    if let Some(p) = running(files) {
        pids.push(p);
    }
    for pid in pids {
        stop_pid(pid);
    }
    let _ = fs::remove_file(&files.pid);
}

pub fn stop_pid(pid: u32) {
    kill(pid, libc::SIGTERM);
    if !wait_gone(pid, Duration::from_secs(3)) {
        kill(pid, libc::SIGKILL);
        wait_gone(pid, Duration::from_secs(2));
    }
}

/// Parse dnsmasq's lease file: `EXPIRY MAC IP HOSTNAME CLIENT-ID` per line.
pub fn leases(path: &Path, prefix: u8) -> Vec<DhcpLease> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 3 || f[2].contains(':') {
                return None;
            }
            let star = |s: Option<&&str>| s.filter(|v| **v != "*").map(|v| v.to_string());
            Some(DhcpLease {
                expiry: f[0].parse().ok()?,
                mac: f[1].to_ascii_lowercase(),
                address: format!("{}/{prefix}", f[2]),
                hostname: star(f.get(3)).unwrap_or_default(),
                client_id: star(f.get(4)).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_our_files_range_and_no_router_when_isolated() {
        let files = Files {
            conf: "/r/networks/n/dnsmasq.conf".into(),
            pid: "/r/networks/n/dnsmasq.pid".into(),
            leases: "/s/networks/n.leases".into(),
        };
        let ip = IpDef {
            address: "10.7.0.1".parse().unwrap(),
            prefix: 24,
            dhcp_start: Some("10.7.0.10".parse().unwrap()),
            dhcp_end: Some("10.7.0.19".parse().unwrap()),
        };
        let nat = config(&files, "n", ForwardMode::Nat, "fvbr3", &ip);
        for want in [
            "pid-file=/r/networks/n/dnsmasq.pid",
            "dhcp-leasefile=/s/networks/n.leases",
            "interface=fvbr3",
            "dhcp-range=10.7.0.10,10.7.0.19,255.255.255.0",
            "dhcp-lease-max=10",
        ] {
            assert!(nat.contains(want), "{want} missing:\n{nat}");
        }
        assert!(!nat.contains("dhcp-option=3"));
        let iso = config(&files, "n", ForwardMode::Isolated, "fvbr3", &ip);
        assert!(iso.contains("dhcp-option=3\nno-resolv"));
    }

    #[test]
    fn lease_lines_are_parsed_and_junk_skipped() {
        let dir = std::env::temp_dir().join(format!("fv-leases-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("l");
        fs::write(
            &f,
            "1764130000 52:54:00:AA:bb:cc 192.168.123.57 guest1 01:52:54:00:aa:bb:cc\n\
             garbage\n\
             1764130001 52:54:00:11:22:33 192.168.123.9 * *\n\
             duid 00:01:00:01\n",
        )
        .unwrap();
        let l = leases(&f, 24);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(l[0].address, "192.168.123.57/24");
        assert_eq!(l[0].hostname, "guest1");
        assert_eq!(l[1].hostname, "");
        assert_eq!(l[1].client_id, "");
        let _ = fs::remove_dir_all(&dir);
    }
}
