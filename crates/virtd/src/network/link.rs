//! Kernel network objects through iproute2: bridges, TAPs, addresses, routes, IP forwarding.
//!
//! Every device ferrovirt creates carries an interface alias as its ownership mark
//! (ferrovirt_api::netmark), so a restarted daemon tells its own leftovers from the host's and
//! from another daemon's.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use ferrovirt_api::ApiError;

/// Run a host command; its stderr becomes the error message.
pub fn run(program: &str, args: &[&str]) -> Result<String, ApiError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        ApiError::internal(format!(
            "cannot run {program}: {e} (install {})",
            match program {
                "nft" => "the nftables package",
                "dnsmasq" => "the dnsmasq-base package",
                _ => "iproute2",
            }
        ))
    })?;
    if !out.status.success() {
        return Err(ApiError::internal(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<(), ApiError> {
    run("ip", args).map(|_| ())
}

pub fn exists(dev: &str) -> bool {
    Path::new("/sys/class/net").join(dev).exists()
}

pub fn is_bridge(dev: &str) -> bool {
    Path::new("/sys/class/net")
        .join(dev)
        .join("bridge")
        .exists()
}

pub fn alias(dev: &str) -> String {
    fs::read_to_string(Path::new("/sys/class/net").join(dev).join("ifalias"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The bridge a device is enslaved to, if any.
pub fn master(dev: &str) -> Option<String> {
    let link = fs::read_link(Path::new("/sys/class/net").join(dev).join("master")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// All devices with their alias.
pub fn devices() -> Vec<(String, String)> {
    let Ok(dir) = fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .map(|name| {
            let a = alias(&name);
            (name, a)
        })
        .collect()
}

/// Create a bridge with its address and bring it up. An existing bridge with our alias is reused.
pub fn bridge_up(name: &str, alias: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), ApiError> {
    if !exists(name) {
        ip(&[
            "link",
            "add",
            "name",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
    }
    ip(&["link", "set", "dev", name, "alias", alias])?;
    let cidr = format!("{addr}/{prefix}");
    let current = run("ip", &["-4", "-o", "addr", "show", "dev", name])?;
    if !current.contains(&format!(" {cidr} ")) {
        ip(&["addr", "add", &cidr, "dev", name])?;
    }
    ip(&["link", "set", "dev", name, "up"])
}

pub fn delete(dev: &str) -> Result<(), ApiError> {
    if exists(dev) {
        ip(&["link", "del", "dev", dev])?;
    }
    Ok(())
}

/// A persistent TAP (owned by the daemon, opened by the VMM by name), enslaved to `bridge`,
/// with `alias` as its ownership mark.
pub fn tap_up(name: &str, alias: &str, bridge: &str) -> Result<(), ApiError> {
    // A leftover of the same name (a VM that died with the daemon) is replaced, never duplicated.
    delete(name)?;
    ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])?;
    let rest = (|| {
        ip(&["link", "set", "dev", name, "alias", alias])?;
        enslave(name, bridge)
    })();
    if rest.is_err() {
        let _ = delete(name);
    }
    rest
}

/// Put a device on a bridge and bring it up.
pub fn enslave(dev: &str, bridge: &str) -> Result<(), ApiError> {
    ip(&["link", "set", "dev", dev, "master", bridge])?;
    ip(&["link", "set", "dev", dev, "up"])
}

/// IPv4 routes of the host's main table (from /proc/net/route): (device, network, prefix).
pub fn routes() -> Vec<(String, Ipv4Addr, u8)> {
    let text = fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // /proc/net/route prints addresses as native-endian (little-endian) hex words.
            let dest = Ipv4Addr::from(dest.to_le_bytes());
            let prefix = mask.count_ones() as u8;
            Some((f[0].to_string(), dest, prefix))
        })
        .collect()
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

pub fn ip_forward() -> bool {
    fs::read_to_string(IP_FORWARD).is_ok_and(|v| v.trim() == "1")
}

pub fn set_ip_forward(on: bool) -> Result<(), ApiError> {
    fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" })
        .map_err(|e| ApiError::internal(format!("cannot write {IP_FORWARD}: {e}")))
}
