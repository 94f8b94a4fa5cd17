//! Command-line flags of ferrovmm and their validation.

use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

use crate::error::{Error, Result};

/// Where the guest's serial port (COM1, ttyS0) goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "path")]
pub enum SerialMode {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket ferrovmm listens on: clients get output and send input.
    Socket(PathBuf),
    /// Output is discarded.
    None,
}

fn parse_serial(s: &str) -> std::result::Result<SerialMode, String> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" => Ok(SerialMode::None),
        _ => {
            if let Some(p) = s.strip_prefix("file=").filter(|p| !p.is_empty()) {
                Ok(SerialMode::File(PathBuf::from(p)))
            } else if let Some(p) = s.strip_prefix("socket=").filter(|p| !p.is_empty()) {
                Ok(SerialMode::Socket(PathBuf::from(p)))
            } else {
                Err("expected stdio, file=PATH, socket=PATH or none".into())
            }
        }
    }
}

fn parse_level(s: &str) -> std::result::Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())
}

/// A `--disk` argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub format: Option<String>,
    pub read_only: bool,
    pub serial: Option<String>,
    pub direct: bool,
}

/// Splits "k=v,k=v" into pairs, refusing keys not in `known`.
fn key_values<'a>(
    s: &'a str,
    known: &[&str],
) -> std::result::Result<Vec<(&'a str, &'a str)>, String> {
    let mut out = Vec::new();
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

fn on_off(key: &str, v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

fn parse_disk(s: &str) -> std::result::Result<DiskSpec, String> {
    let mut spec = DiskSpec {
        path: PathBuf::new(),
        format: None,
        read_only: false,
        serial: None,
        direct: false,
    };
    for (k, v) in key_values(s, &["path", "format", "readonly", "serial", "cache"])? {
        match k {
            "path" if !v.is_empty() => spec.path = PathBuf::from(v),
            "format" => match v {
                "raw" | "qcow2" => spec.format = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "format={v}: unknown image format; use raw or qcow2"
                    ))
                }
            },
            "readonly" => spec.read_only = on_off(k, v)?,
            "serial" => {
                if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!("serial={v}: at most 20 printable ASCII characters"));
                }
                spec.serial = Some(v.to_string());
            }
            "cache" => match v {
                "none" => spec.direct = true,
                "writeback" => spec.direct = false,
                _ => return Err(format!("cache={v}: use none or writeback")),
            },
            _ => return Err("path= must not be empty".into()),
        }
    }
    if spec.path.as_os_str().is_empty() {
        return Err("path=FILE is required".into());
    }
    Ok(spec)
}

/// A `--net` argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetSpec {
    pub tap: Option<String>,
    pub fd: Option<i32>,
    pub mac: Option<[u8; 6]>,
}

fn parse_net(s: &str) -> std::result::Result<NetSpec, String> {
    let mut spec = NetSpec {
        tap: None,
        fd: None,
        mac: None,
    };
    for (k, v) in key_values(s, &["tap", "fd", "mac"])? {
        match k {
            "tap" => {
                if !crate::virtio::tap::valid_name(v) {
                    return Err(format!(
                        "tap={v}: not a valid interface name (1-15 characters, no '/' or ':')"
                    ));
                }
                spec.tap = Some(v.to_string());
            }
            "fd" => {
                spec.fd = Some(
                    v.parse()
                        .ok()
                        .filter(|n: &i32| *n >= 3)
                        .ok_or(format!("fd={v}: expected a descriptor number of 3 or more"))?,
                )
            }
            _ => spec.mac = Some(crate::virtio::net::parse_mac(v)?),
        }
    }
    match (&spec.tap, spec.fd) {
        (Some(_), None) | (None, Some(_)) => Ok(spec),
        _ => Err("give exactly one of tap=NAME or fd=N".into()),
    }
}

/// The `--console` choice: no virtio-console device, or one with this back end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ConsoleMode {
    Off,
    On(SerialMode),
}

fn parse_console(s: &str) -> std::result::Result<ConsoleMode, String> {
    match s {
        "off" => Ok(ConsoleMode::Off),
        "stdio" | "none" => parse_serial(s).map(ConsoleMode::On),
        _ if s.starts_with("file=") => parse_serial(s).map(ConsoleMode::On),
        _ => Err("expected off, stdio, file=PATH or none".into()),
    }
}

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// ferrovmm runs one KVM virtual machine in this process.
///
/// The process ends when the guest powers off or resets (exit status 0), when the VM is
/// stopped through the API (0), on a usage error (2) or on a runtime error (1).
#[derive(Parser, Debug, Clone)]
#[command(name = "ferrovmm", version, about, long_about = None, max_term_width = 100)]
pub struct Args {
    /// Name of the VM; shown by `ps` as `ferrovmm --name NAME` and in the API.
    #[arg(long, value_name = "NAME", default_value = "vm")]
    pub name: String,

    /// Kernel to boot: a bzImage, or an ELF vmlinux (entered through its PVH note when it has
    /// one, else at its 64-bit entry point).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk loaded into guest memory and handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,

    /// Number of virtual CPUs; the first one boots, the guest starts the others itself.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,

    /// Serial console (COM1 / ttyS0): stdio, file=PATH (output only), socket=PATH (a Unix
    /// socket ferrovmm listens on; every client gets the output and may type), or none.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialMode,

    /// A virtio-blk disk, repeatable:
    /// path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,cache=none|writeback].
    /// The format is probed when not given; cache=none opens the image with O_DIRECT.
    #[arg(long, value_name = "SPEC", value_parser = parse_disk)]
    pub disk: Vec<DiskSpec>,

    /// A virtio-net NIC on a TAP device, repeatable: tap=NAME[,mac=MAC] (an existing TAP)
    /// or fd=N[,mac=MAC] (an open TAP descriptor handed over by a management daemon).
    #[arg(long, value_name = "SPEC", value_parser = parse_net)]
    pub net: Vec<NetSpec>,

    /// A virtio-console (hvc0): off (no device), stdio, file=PATH or none (output dropped).
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = parse_console)]
    pub console: ConsoleMode,

    /// Add a virtio-rng device (/dev/hwrng in the guest) fed from the host's getrandom().
    #[arg(long)]
    pub rng: bool,

    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Log level on stderr: error, warn, info, debug or trace (also FERROVMM_LOG).
    #[arg(long, value_name = "LEVEL", env = "FERROVMM_LOG", default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

/// Checks the arguments that can be checked without KVM.
pub fn validate(args: &Args) -> Result<()> {
    if args.memory == 0 {
        return Err(Error::usage("--memory must be at least 1 MiB (got 0)"));
    }
    // The boot structures and a kernel need a few MiB.
    if args.memory < 8 {
        return Err(Error::usage(format!(
            "--memory {} MiB is too small: ferrovmm needs at least 8 MiB",
            args.memory
        )));
    }
    let host_mib = host_memory_mib();
    if let Some(host) = host_mib {
        if args.memory > host {
            return Err(Error::usage(format!(
                "--memory {} MiB is more than this host has ({host} MiB); ask for less",
                args.memory
            )));
        }
    }
    if args.vcpus == 0 {
        return Err(Error::usage("--vcpus must be at least 1 (got 0)"));
    }
    if args.name.is_empty() || args.name.len() > 64 || args.name.chars().any(|c| c.is_control()) {
        return Err(Error::usage("--name must be 1 to 64 printable characters"));
    }
    if args.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
        return Err(Error::usage(format!(
            "--cmdline is {} bytes; the limit is {}",
            args.cmdline.len(),
            crate::layout::CMDLINE_MAX_SIZE - 1
        )));
    }
    if args.serial == SerialMode::Stdio && args.console == ConsoleMode::On(SerialMode::Stdio) {
        return Err(Error::usage(
            "--serial stdio and --console stdio cannot share the terminal; send one elsewhere",
        ));
    }
    check_readable("--kernel", &args.kernel)?;
    if let Some(initrd) = &args.initrd {
        check_readable("--initrd", initrd)?;
    }
    Ok(())
}

fn check_readable(flag: &str, path: &std::path::Path) -> Result<()> {
    match std::fs::File::open(path) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(Error::usage(format!(
                "{flag} {}: not a regular file",
                path.display()
            ))),
            Err(e) => Err(Error::usage(format!("{flag} {}: {e}", path.display()))),
        },
        Err(e) => Err(Error::usage(format!(
            "{flag} {}: cannot open: {e}",
            path.display()
        ))),
    }
}

/// Total host memory in MiB, from /proc/meminfo.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_modes_parse() {
        assert_eq!(parse_serial("stdio"), Ok(SerialMode::Stdio));
        assert_eq!(parse_serial("none"), Ok(SerialMode::None));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert_eq!(
            parse_serial("socket=/tmp/s"),
            Ok(SerialMode::Socket("/tmp/s".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp:1234").is_err());
    }

    #[test]
    fn disk_specs_parse() {
        let d = parse_disk("path=/a.img,format=qcow2,readonly=on,serial=disk0,cache=none").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert_eq!(d.format.as_deref(), Some("qcow2"));
        assert!(d.read_only && d.direct);
        assert_eq!(d.serial.as_deref(), Some("disk0"));
        assert!(parse_disk("format=raw").unwrap_err().contains("path=FILE"));
        assert!(parse_disk("path=/a,format=vmdk")
            .unwrap_err()
            .contains("unknown image format"));
        assert!(parse_disk("path=/a,speed=fast")
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_disk("path=/a,serial=this-serial-is-way-too-long").is_err());
    }

    #[test]
    fn net_specs_parse() {
        let n = parse_net("tap=tap0,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(parse_net("fd=5").unwrap().fd, Some(5));
        assert!(parse_net("tap=a,fd=4").is_err());
        assert!(parse_net("mac=52:54:00:00:00:01").is_err());
        assert!(parse_net("tap=waytoolonginterfacename").is_err());
        assert!(parse_net("tap=t0,mac=zz").unwrap_err().contains("MAC"));
    }
}
