//! `ferrovmm --restore DIR`: builds the machine a snapshot describes, loads its
//! state and memory, and waits paused for `PUT /vm/resume` (or resumes at once
//! with `--resume`).

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Args, NetSpec, SerialMode};
use crate::error::{Error, Result};
use crate::snapshot::{self, MEMORY_FILE, STATE_FILE};
use crate::vm::Origin;

/// Restore a VM from a snapshot directory written by `PUT /vm/snapshot`.
#[derive(Parser, Debug, Clone)]
#[command(name = "ferrovmm --restore", version, max_term_width = 100)]
pub struct RestoreArgs {
    /// The snapshot directory (with `state` and `memory`).
    #[arg(long, value_name = "DIR")]
    pub restore: PathBuf,

    /// A new name for the VM (default: the snapshot's).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Where the serial console goes now: stdio, file=PATH, socket=PATH or none
    /// (default: as in the snapshot).
    #[arg(long, value_name = "MODE", value_parser = parse_serial)]
    pub serial: Option<SerialMode>,

    /// Run the guest at once instead of waiting for `PUT /vm/resume`.
    #[arg(long)]
    pub resume: bool,

    /// Read all of guest memory up front instead of mapping the file copy-on-write.
    #[arg(long)]
    pub copy_memory: bool,

    /// Open disk N (0 = first --disk of the saved VM) at another path, e.g. an overlay: N=PATH.
    #[arg(long, value_name = "N=PATH")]
    pub disk: Vec<String>,

    /// Attach NIC N to another TAP: N=tap=NAME or N=fd=FD.
    #[arg(long, value_name = "N=SPEC")]
    pub net: Vec<String>,

    /// Log level on stderr (also FERROVMM_LOG).
    #[arg(long, value_name = "LEVEL", env = "FERROVMM_LOG", default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

fn parse_serial(s: &str) -> std::result::Result<SerialMode, String> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" => Ok(SerialMode::None),
        _ => match s.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(SerialMode::File(p.into())),
            Some(("socket", p)) if !p.is_empty() => Ok(SerialMode::Socket(p.into())),
            _ => Err("expected stdio, file=PATH, socket=PATH or none".into()),
        },
    }
}

fn parse_level(s: &str) -> std::result::Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())
}

/// True when the command line asks for a restore (main picks the parser by this).
pub fn requested(argv: &[std::ffi::OsString]) -> bool {
    argv.iter()
        .any(|a| a == "--restore" || a.to_str().is_some_and(|s| s.starts_with("--restore=")))
}

fn index_and_value<'a>(flag: &str, s: &'a str, count: usize) -> Result<(usize, &'a str)> {
    let (n, v) = s
        .split_once('=')
        .ok_or_else(|| Error::usage(format!("{flag} {s}: expected N=VALUE")))?;
    let n: usize = n
        .parse()
        .map_err(|_| Error::usage(format!("{flag} {s}: N must be a number")))?;
    if n >= count {
        return Err(Error::usage(format!(
            "{flag} {s}: the snapshot's VM has {count} of them (numbered from 0)"
        )));
    }
    Ok((n, v))
}

/// The saved configuration with this command line's overrides applied.
fn configure(r: &RestoreArgs, launch: &[String]) -> Result<Args> {
    let mut args =
        Args::try_parse_from(std::iter::once("ferrovmm".to_string()).chain(launch.iter().cloned()))
            .map_err(|e| {
                Error::usage(format!("the snapshot's configuration is not usable: {e}"))
            })?;
    if let Some(name) = &r.name {
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(Error::usage("--name must be 1 to 64 printable characters"));
        }
        args.name = name.clone();
    }
    if let Some(serial) = &r.serial {
        args.serial = serial.clone();
    }
    args.api_socket = r.api_socket.clone();
    args.log_level = r.log_level;
    for d in &r.disk {
        let (n, path) = index_and_value("--disk", d, args.disk.len())?;
        args.disk[n].path = PathBuf::from(path);
    }
    for spec in &r.net {
        let (n, v) = index_and_value("--net", spec, args.net.len())?;
        let mac = args.net[n].mac;
        args.net[n] = match v.split_once('=') {
            Some(("tap", name)) if crate::virtio::tap::valid_name(name) => NetSpec {
                tap: Some(name.to_string()),
                fd: None,
                mac,
            },
            Some(("fd", fd)) => NetSpec {
                tap: None,
                fd: Some(
                    fd.parse()
                        .ok()
                        .filter(|n: &i32| *n >= 3)
                        .ok_or_else(|| Error::usage(format!("--net {spec}: bad descriptor")))?,
                ),
                mac,
            },
            _ => {
                return Err(Error::usage(format!(
                    "--net {spec}: expected N=tap=NAME or N=fd=FD"
                )))
            }
        };
    }
    Ok(args)
}

/// Reads and checks the snapshot, then runs the restored VM to its end.
pub fn run(r: RestoreArgs) -> Result<i32> {
    let state_path = r.restore.join(STATE_FILE);
    let payload = snapshot::read_state(&state_path).map_err(Error::usage)?;
    let args = configure(&r, &payload.launch)?;
    let expected: u64 = crate::layout::ram_regions(args.memory << 20)
        .iter()
        .map(|(_, size)| *size)
        .sum();
    if payload.memory_bytes != expected {
        return Err(Error::usage(format!(
            "{}: {} bytes of RAM recorded for a {} MiB machine",
            state_path.display(),
            payload.memory_bytes,
            args.memory
        )));
    }
    check_host_cpu(&payload.machine)?;
    let origin = Origin::Restore {
        memory: r.restore.join(MEMORY_FILE),
        eager: r.copy_memory,
        state: Box::new(payload.machine),
    };
    crate::run_machine(args, origin, r.resume)
}

/// Refuses a snapshot whose guest used CPU features this host's KVM lacks.
fn check_host_cpu(state: &crate::vm::MachineState) -> Result<()> {
    for (i, vcpu) in state.vcpus.iter().enumerate() {
        let missing = crate::cpu::cpuid::missing_features(&vcpu.cpuid);
        if !missing.is_empty() {
            return Err(Error::usage(format!(
                "this host's CPU lacks features the snapshot's vcpu{i} uses: {}",
                missing.join(", ")
            )));
        }
    }
    Ok(())
}
