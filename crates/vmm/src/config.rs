//! ferrovmm's command line: clap's flags (and --help) over the launch contract's value grammar.
//!
//! Every value is parsed by the `FromStr` impls of ferrovmm-api, the same crate whose
//! `LaunchConfig::to_args` builds argv for ferrovmm, and the result is a `LaunchConfig`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
pub use ferrovmm_api::launch::{
    ConsoleMode, DiskCache, DiskConfig, LaunchConfig, LogLevel, NetBackend, NetConfig, SeccompMode,
    SerialMode, DEFAULT_CMDLINE,
};

use crate::error::{Error, Result};

/// ferrovmm runs one KVM virtual machine in this process.
///
/// The process ends when the guest powers off or resets (exit status 0), when the VM is
/// stopped through the API (0), on a usage error (2) or on a runtime error (1).
#[derive(Parser, Debug, Clone)]
#[command(name = "ferrovmm", version, about, long_about = None, max_term_width = 100)]
pub struct Args {
    /// Name of the VM; shown by `ps` as `ferrovmm --name NAME` and in the API.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "vm",
        allow_hyphen_values = true
    )]
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
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = SerialMode::from_str)]
    pub serial: SerialMode,

    /// A virtio-blk disk, repeatable:
    /// path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,cache=none|writeback].
    /// The format is probed when not given; cache=none opens the image with O_DIRECT.
    #[arg(long, value_name = "SPEC", value_parser = DiskConfig::from_str)]
    pub disk: Vec<DiskConfig>,

    /// A virtio-net NIC on a TAP device, repeatable: tap=NAME[,mac=MAC] (an existing TAP)
    /// or fd=N[,mac=MAC] (an open TAP descriptor handed over by a management daemon).
    #[arg(long, value_name = "SPEC", value_parser = NetConfig::from_str)]
    pub net: Vec<NetConfig>,

    /// A virtio-console (hvc0): off (no device), stdio, file=PATH or none (output dropped).
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = ConsoleMode::from_str)]
    pub console: ConsoleMode,

    /// Add a virtio-rng device (/dev/hwrng in the guest) fed from the host's getrandom().
    #[arg(long)]
    pub rng: bool,

    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Write how the VM ended to this file as JSON (an exit record: reason, exit status),
    /// atomically, just before exiting. See the README's "Exit record".
    #[arg(long, value_name = "PATH")]
    pub exit_file: Option<PathBuf>,

    /// Log level on stderr: off, error, warn (the default), info, debug or trace (also
    /// FERROVMM_LOG).
    #[arg(long, value_name = "LEVEL", env = "FERROVMM_LOG", value_parser = LogLevel::from_str)]
    pub log_level: Option<LogLevel>,

    /// Per-thread seccomp filters: on (a forbidden syscall stops the VM; its exit record
    /// names the call), log (the kernel logs it and allows it) or off (also FERROVMM_SECCOMP).
    #[arg(long, value_name = "MODE", default_value = "on", env = "FERROVMM_SECCOMP", value_parser = SeccompMode::from_str)]
    pub seccomp: SeccompMode,

    /// Enter the jail a launcher prepared, before anything else: root=PATH,uid=N,gid=N
    /// (chroot to PATH, then run as uid/gid without supplementary groups or capabilities).
    #[arg(long, value_name = "SPEC", value_parser = ferrovmm_api::JailConfig::from_str)]
    pub jail: Option<ferrovmm_api::JailConfig>,
}

impl Args {
    /// The launch configuration these flags describe.
    pub fn into_config(self) -> LaunchConfig {
        LaunchConfig {
            name: self.name,
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            memory_mib: self.memory,
            vcpus: self.vcpus,
            serial: self.serial,
            console: self.console,
            disks: self.disk,
            nets: self.net,
            rng: self.rng,
            api_socket: self.api_socket,
            exit_file: self.exit_file,
            log_level: self.log_level,
            seccomp: self.seccomp,
            jail: self.jail,
        }
    }
}

/// Parses a full argv (program name first) into the launch configuration.
pub fn parse<I, T>(argv: I) -> std::result::Result<LaunchConfig, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Args::try_parse_from(argv).map(Args::into_config)
}

/// The `log` filter for a configured level (warn when none was given).
pub fn log_filter(level: Option<LogLevel>) -> log::LevelFilter {
    match level.unwrap_or(LogLevel::Warn) {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    }
}

/// Checks the arguments that can be checked without KVM.
pub fn validate(config: &LaunchConfig) -> Result<()> {
    config.validate().map_err(|e| Error::usage(e.0))?;
    if let Some(host) = host_memory_mib() {
        if config.memory_mib > host {
            return Err(Error::usage(format!(
                "--memory {} MiB is more than this host has ({host} MiB); ask for less",
                config.memory_mib
            )));
        }
    }
    // Guest-physical addresses are 64-bit byte counts.
    if config.memory_mib > u64::MAX >> 21 {
        return Err(Error::usage(format!(
            "--memory {} MiB is beyond any machine",
            config.memory_mib
        )));
    }
    if config.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
        return Err(Error::usage(format!(
            "--cmdline is {} bytes; the limit is {}",
            config.cmdline.len(),
            crate::layout::CMDLINE_MAX_SIZE - 1
        )));
    }
    check_readable("--kernel", &config.kernel)?;
    if let Some(initrd) = &config.initrd {
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
    use ferrovmm_api::launch::Mac;
    use ferrovmm_api::DiskFormat;

    fn argv(config: &LaunchConfig) -> Vec<String> {
        let mut a = vec!["ferrovmm".to_string()];
        a.extend(config.to_args().expect("representable"));
        a
    }

    /// A configuration full of values that look like flags, separators and paths of other
    /// options: each must come back as itself.
    fn hostile() -> LaunchConfig {
        let mut c = LaunchConfig::new("-vm --kernel=x", "-k,=x y");
        c.initrd = Some("--initrd".into());
        c.cmdline = "--memory=1 a,b=c \"quoted\" \\ ünïcödé".into();
        c.memory_mib = 64;
        c.vcpus = 3;
        c.serial = SerialMode::Socket("/tmp/a=b,c/-s.sock".into());
        c.console = ConsoleMode::On(SerialMode::File("file=x,y".into()));
        c.disks = vec![
            DiskConfig {
                path: "/d/-a=b:c;d e".into(),
                format: Some(DiskFormat::Raw),
                readonly: true,
                serial: Some("!#$%&'()*+-./:;<=>?@".into()),
                cache: DiskCache::None,
            },
            DiskConfig::new("-"),
        ];
        c.nets = vec![
            NetConfig {
                backend: NetBackend::Tap("-t=a".into()),
                mac: Some(Mac([0xfe, 0xff, 0, 1, 2, 3])),
            },
            NetConfig {
                backend: NetBackend::Fd(i32::MAX),
                mac: None,
            },
        ];
        c.rng = true;
        c.api_socket = Some("--api-socket".into());
        c.exit_file = Some("-".into());
        c.log_level = Some(LogLevel::Trace);
        c.seccomp = SeccompMode::Log;
        c.jail = Some(ferrovmm_api::JailConfig {
            root: "/j/-a=b c".into(),
            uid: 70_000,
            gid: 70_001,
        });
        c
    }

    #[test]
    fn to_args_then_parse_gives_the_same_config() {
        for c in [
            LaunchConfig::new("vm", "/boot/vmlinux"),
            {
                let mut c = LaunchConfig::new("plain", "/k");
                c.serial = SerialMode::None;
                c.console = ConsoleMode::On(SerialMode::Stdio);
                c.cmdline = String::new();
                c
            },
            hostile(),
        ] {
            let a = argv(&c);
            assert_eq!(
                parse(&a).unwrap_or_else(|e| panic!("{a:?}: {e}")),
                c,
                "{a:?}"
            );
        }
    }

    #[test]
    fn documented_command_lines_parse() {
        let c = parse([
            "ferrovmm",
            "--name",
            "web",
            "--kernel",
            "/k",
            "--memory",
            "64",
            "--disk",
            "path=/a.img,format=qcow2,readonly=on,serial=disk0,cache=none",
            "--net",
            "tap=tap0,mac=52:54:00:00:00:01",
            "--serial",
            "file=/tmp/x",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(c.disks[0].format, Some(DiskFormat::Qcow2));
        assert!(c.disks[0].readonly && c.disks[0].cache == DiskCache::None);
        assert_eq!(c.nets[0].backend, NetBackend::Tap("tap0".into()));
        assert_eq!(c.serial, SerialMode::File("/tmp/x".into()));
        assert_eq!(c.log_level, Some(LogLevel::Debug));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(parse([
            "ferrovmm",
            "--kernel",
            "/k",
            "--disk",
            "path=/a,format=vmdk"
        ])
        .is_err());
    }
}
