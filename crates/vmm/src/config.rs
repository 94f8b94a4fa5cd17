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
}
