//! `ferrovmm --restore DIR`: builds the machine a snapshot describes, loads its
//! state and memory, and waits paused for `PUT /vm/resume` (or resumes at once
//! with `--resume`).

use std::path::PathBuf;

use clap::Parser;

use std::str::FromStr;

use crate::config::{LaunchConfig, LogLevel, NetBackend, SeccompMode, SerialMode};
use crate::error::{Error, Result};
use crate::snapshot::{self, MEMORY_FILE, STATE_FILE};
use crate::vm::{MemorySource, Origin};

/// Restore a VM from a snapshot directory written by `PUT /vm/snapshot`.
#[derive(Parser, Debug, Clone)]
#[command(name = "ferrovmm --restore", version, max_term_width = 100)]
pub struct RestoreArgs {
    /// The snapshot directory (with `state` and `memory`).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "incoming",
        conflicts_with = "incoming"
    )]
    pub restore: Option<PathBuf>,

    /// Wait for a live migration on unix:PATH or tcp:HOST:PORT, then run the VM it brings.
    #[arg(long, value_name = "ADDRESS")]
    pub incoming: Option<String>,

    /// A new name for the VM (default: the snapshot's).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Where the serial console goes now: stdio, file=PATH, socket=PATH or none
    /// (default: as in the snapshot).
    #[arg(long, value_name = "MODE", value_parser = SerialMode::from_str)]
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

    /// Write how the VM ended to this file as JSON (the exit record), as at launch.
    #[arg(long, value_name = "PATH")]
    pub exit_file: Option<PathBuf>,

    /// Log level on stderr (also FERROVMM_LOG).
    #[arg(long, value_name = "LEVEL", env = "FERROVMM_LOG", value_parser = LogLevel::from_str)]
    pub log_level: Option<LogLevel>,

    /// Per-thread seccomp filters: on, log or off (also FERROVMM_SECCOMP); as at launch.
    #[arg(long, value_name = "MODE", default_value = "on", env = "FERROVMM_SECCOMP", value_parser = SeccompMode::from_str)]
    pub seccomp: SeccompMode,
}

/// True when the command line asks for a restore (main picks the parser by this).
pub fn requested(argv: &[std::ffi::OsString]) -> bool {
    argv.iter().any(|a| {
        a == "--restore"
            || a == "--incoming"
            || a.to_str()
                .is_some_and(|s| s.starts_with("--restore=") || s.starts_with("--incoming="))
    })
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
pub(crate) fn configure(r: &RestoreArgs, saved: &LaunchConfig) -> Result<LaunchConfig> {
    let mut config = saved.clone();
    if let Some(name) = &r.name {
        config.name = name.clone();
    }
    if let Some(serial) = &r.serial {
        config.serial = serial.clone();
    }
    config.api_socket = r.api_socket.clone();
    config.exit_file = r.exit_file.clone();
    config.log_level = r.log_level;
    config.seccomp = r.seccomp;
    for d in &r.disk {
        let (n, path) = index_and_value("--disk", d, config.disks.len())?;
        config.disks[n].path = PathBuf::from(path);
    }
    for spec in &r.net {
        let (n, v) = index_and_value("--net", spec, config.nets.len())?;
        config.nets[n].backend = match v.split_once('=') {
            Some(("tap", name)) => NetBackend::Tap(name.to_string()),
            Some(("fd", fd)) => NetBackend::Fd(
                fd.parse()
                    .map_err(|_| Error::usage(format!("--net {spec}: bad descriptor")))?,
            ),
            _ => {
                return Err(Error::usage(format!(
                    "--net {spec}: expected N=tap=NAME or N=fd=FD"
                )))
            }
        };
    }
    // The same rules as a launch (name, TAP names, descriptors), except that the
    // kernel need not exist any more: RAM already holds it.
    let mut check = config.clone();
    check.kernel = std::path::PathBuf::from("/proc/self/exe");
    check.initrd = None;
    crate::config::validate(&check)?;
    Ok(config)
}

/// Restores from a snapshot or receives a migration, then runs the VM to its end.
pub fn run(r: RestoreArgs) -> Result<i32> {
    match (&r.restore, &r.incoming) {
        (Some(dir), None) => from_snapshot(&r, dir),
        (None, Some(address)) => crate::migration::receive(&r, address),
        _ => Err(Error::usage(
            "give exactly one of --restore DIR or --incoming ADDRESS",
        )),
    }
}

/// Reads and checks the snapshot, then runs the restored VM to its end.
fn from_snapshot(r: &RestoreArgs, dir: &std::path::Path) -> Result<i32> {
    let state_path = dir.join(STATE_FILE);
    let payload = snapshot::read_state(&state_path).map_err(Error::usage)?;
    let config = configure(r, &payload.launch)?;
    let expected: u64 = crate::layout::ram_regions(config.memory_mib << 20)
        .iter()
        .map(|(_, size)| *size)
        .sum();
    if payload.memory_bytes != expected {
        return Err(Error::usage(format!(
            "{}: {} bytes of RAM recorded for a {} MiB machine",
            state_path.display(),
            payload.memory_bytes,
            config.memory_mib
        )));
    }
    check_host_cpu(&payload.machine)?;
    let origin = Origin::Restore {
        memory: MemorySource::File {
            path: dir.join(MEMORY_FILE),
            eager: r.copy_memory,
        },
        state: Box::new(payload.machine),
    };
    crate::run_machine(&config, origin, r.resume)
}

/// Refuses a snapshot whose guest used CPU features this host's KVM lacks.
pub(crate) fn check_host_cpu(state: &crate::vm::MachineState) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// ferrovirtd builds this command line with `RestoreConfig::to_args`: ferrovmm reads back
    /// every value, hostile-looking ones included.
    #[test]
    fn the_contract_s_argv_parses_back_to_the_same_values() {
        let mut c = ferrovmm_api::RestoreConfig::new("/run/-dir/restore");
        c.name = Some("-web".into());
        c.api_socket = Some("/run/x/api.sock".into());
        c.serial = Some(SerialMode::Socket("/run/x/serial.sock".into()));
        c.exit_file = Some("/run/x/exit.json".into());
        c.disks = vec![(0, "/img/a=b.qcow2".into())];
        c.taps = vec![(1, "fvtap-1".into())];
        c.resume = true;
        let mut argv = vec!["ferrovmm".to_string()];
        argv.extend(c.to_args().unwrap());
        let r = RestoreArgs::try_parse_from(&argv).unwrap();
        assert_eq!(r.restore, Some(c.dir.clone()));
        assert_eq!(r.name, c.name);
        assert_eq!(r.api_socket, c.api_socket);
        assert_eq!(r.serial, c.serial);
        assert_eq!(r.exit_file, c.exit_file);
        assert!(r.resume);
        assert_eq!(r.disk, ["0=/img/a=b.qcow2"]);
        assert_eq!(r.net, ["1=tap=fvtap-1"]);
        let saved = LaunchConfig::new("old", "/k");
        let mut saved = saved;
        saved.disks.push(crate::config::DiskConfig::new("/old.img"));
        saved.nets.push(crate::config::NetConfig {
            backend: NetBackend::Tap("t0".into()),
            mac: None,
        });
        saved.nets.push(crate::config::NetConfig {
            backend: NetBackend::Tap("t1".into()),
            mac: None,
        });
        let config = configure(&r, &saved).unwrap();
        assert_eq!(config.disks[0].path, PathBuf::from("/img/a=b.qcow2"));
        assert_eq!(config.nets[1].backend, NetBackend::Tap("fvtap-1".into()));
        assert_eq!(config.name, "-web");
    }
}
