//! The launch configuration of one ferrovmm process and its one command-line form.
//!
//! [`LaunchConfig::to_args`] is the only place argv is built; ferrovmm's command line parses each
//! value with the `FromStr` impls here, so both sides share one grammar. Every value is checked
//! by [`LaunchConfig::validate`] on both sides: what one side cannot write, the other never
//! has to guess at (no escaping, a clear refusal instead).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::format::DiskFormat;
use crate::kv;

/// The kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// The boot structures and a kernel need a few MiB.
pub const MIN_MEMORY_MIB: u64 = 8;
pub const MAX_NAME_LEN: usize = 64;
/// virtio-blk's serial field is 20 bytes.
pub const MAX_DISK_SERIAL_LEN: usize = 20;
/// Linux's IFNAMSIZ minus the NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// A value that ferrovmm cannot be launched with, or that its command line cannot carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError(pub String);

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LaunchError {}

fn err<T>(msg: impl Into<String>) -> Result<T, LaunchError> {
    Err(LaunchError(msg.into()))
}

/// Everything a ferrovmm process is started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// Shown by `ps` as `ferrovmm --name NAME` and in the API.
    pub name: String,
    /// A bzImage, or an ELF vmlinux (PVH note or 64-bit entry).
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub serial: SerialMode,
    #[serde(default)]
    pub console: ConsoleMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub rng: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Where ferrovmm writes its [`crate::ExitRecord`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_file: Option<PathBuf>,
    /// None: ferrovmm's own default (FERROVMM_LOG, else warn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// ferrovmm's per-thread seccomp filters (on unless asked otherwise).
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// The jail a launcher prepared; ferrovmm enters it before anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::JailConfig>,
}

impl LaunchConfig {
    /// A VM with ferrovmm's defaults: 256 MiB, one vCPU, serial on stdio, no devices.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>) -> Self {
        LaunchConfig {
            name: name.into(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            serial: SerialMode::Stdio,
            console: ConsoleMode::Off,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            api_socket: None,
            exit_file: None,
            log_level: None,
            seccomp: SeccompMode::On,
            jail: None,
        }
    }

    /// Checks everything that can be checked without the host: the rules ferrovmm applies to
    /// its command line, and that every value survives the trip through argv.
    pub fn validate(&self) -> Result<(), LaunchError> {
        check_name(&self.name)?;
        if self.memory_mib == 0 {
            return err("--memory must be at least 1 MiB (got 0)");
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return err(format!(
                "--memory {} MiB is too small: ferrovmm needs at least {MIN_MEMORY_MIB} MiB",
                self.memory_mib
            ));
        }
        if self.vcpus == 0 {
            return err("--vcpus must be at least 1 (got 0)");
        }
        check_path("--kernel", &self.kernel)?;
        if let Some(p) = &self.initrd {
            check_path("--initrd", p)?;
        }
        if self.cmdline.contains('\0') {
            return err("--cmdline contains a NUL byte");
        }
        self.serial.check("--serial")?;
        if let ConsoleMode::On(mode) = &self.console {
            if matches!(mode, SerialMode::Socket(_)) {
                return err("--console takes off, stdio, file=PATH or none, not socket=PATH");
            }
            mode.check("--console")?;
        }
        if self.serial == SerialMode::Stdio && self.console == ConsoleMode::On(SerialMode::Stdio) {
            return err(
                "--serial stdio and --console stdio cannot share the terminal; send one elsewhere",
            );
        }
        for d in &self.disks {
            d.check().map_err(|e| LaunchError(format!("--disk: {e}")))?;
        }
        for (i, n) in self.nets.iter().enumerate() {
            n.check().map_err(|e| LaunchError(format!("--net: {e}")))?;
            // A descriptor has one owner: two NICs on it would close it twice.
            if let NetBackend::Fd(fd) = n.backend {
                if self.nets[..i].iter().any(|m| m.backend == n.backend) {
                    return err(format!(
                        "--net fd={fd} is given twice; each NIC needs its own TAP descriptor"
                    ));
                }
            }
        }
        if let Some(p) = &self.api_socket {
            check_path("--api-socket", p)?;
        }
        if let Some(p) = &self.exit_file {
            check_path("--exit-file", p)?;
        }
        if let Some(j) = &self.jail {
            j.check().map_err(|e| LaunchError(format!("--jail: {e}")))?;
        }
        Ok(())
    }

    /// ferrovmm's argv (without the program name), `--name NAME` first so `ps` shows which VM
    /// a process is. Values go as `--flag=VALUE`, so one starting with '-' stays a value.
    pub fn to_args(&self) -> Result<Vec<String>, LaunchError> {
        self.validate()?;
        let mut a = vec!["--name".to_string(), self.name.clone()];
        let mut opt = |flag: &str, value: &dyn fmt::Display| a.push(format!("--{flag}={value}"));
        opt("kernel", &utf8(&self.kernel));
        if let Some(p) = &self.initrd {
            opt("initrd", &utf8(p));
        }
        opt("cmdline", &self.cmdline);
        opt("memory", &self.memory_mib);
        opt("vcpus", &self.vcpus);
        opt("serial", &self.serial);
        if self.console != ConsoleMode::Off {
            opt("console", &self.console);
        }
        for d in &self.disks {
            opt("disk", d);
        }
        for n in &self.nets {
            opt("net", n);
        }
        if let Some(p) = &self.api_socket {
            opt("api-socket", &utf8(p));
        }
        if let Some(p) = &self.exit_file {
            opt("exit-file", &utf8(p));
        }
        if let Some(l) = self.log_level {
            opt("log-level", &l);
        }
        if self.seccomp != SeccompMode::On {
            opt("seccomp", &self.seccomp);
        }
        if let Some(j) = &self.jail {
            opt("jail", j);
        }
        if self.rng {
            a.push("--rng".into());
        }
        Ok(a)
    }
}

/// A path already checked to be UTF-8 (by `check_path`).
pub(crate) fn utf8(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

pub(crate) fn check_name(name: &str) -> Result<(), LaunchError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control)
    {
        return err(format!(
            "--name must be 1 to {MAX_NAME_LEN} printable characters"
        ));
    }
    Ok(())
}

/// A path argv can carry: not empty, UTF-8, no NUL.
pub(crate) fn check_path(flag: &str, p: &Path) -> Result<(), LaunchError> {
    match p.to_str() {
        None => err(format!(
            "{flag} {}: the path is not UTF-8",
            p.to_string_lossy()
        )),
        Some("") => err(format!("{flag}: the path is empty")),
        Some(s) if s.contains('\0') => err(format!("{flag}: the path contains a NUL byte")),
        Some(_) => Ok(()),
    }
}

/// Where the guest's serial port (COM1, ttyS0) or virtio console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl SerialMode {
    fn check(&self, flag: &str) -> Result<(), LaunchError> {
        match self {
            SerialMode::File(p) => check_path(&format!("{flag} file="), p),
            SerialMode::Socket(p) => check_path(&format!("{flag} socket="), p),
            SerialMode::Stdio | SerialMode::None => Ok(()),
        }
    }
}

impl FromStr for SerialMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
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
}

impl fmt::Display for SerialMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialMode::Stdio => f.write_str("stdio"),
            SerialMode::None => f.write_str("none"),
            SerialMode::File(p) => write!(f, "file={}", utf8(p)),
            SerialMode::Socket(p) => write!(f, "socket={}", utf8(p)),
        }
    }
}

/// The `--console` choice: no virtio-console device, or one with this back end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    #[default]
    Off,
    On(SerialMode),
}

impl FromStr for ConsoleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(ConsoleMode::Off),
            _ if s == "stdio" || s == "none" || s.starts_with("file=") => {
                s.parse().map(ConsoleMode::On)
            }
            _ => Err("expected off, stdio, file=PATH or none".into()),
        }
    }
}

impl fmt::Display for ConsoleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleMode::Off => f.write_str("off"),
            ConsoleMode::On(mode) => mode.fmt(f),
        }
    }
}

/// Host page cache use of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Through the host page cache.
    #[default]
    Writeback,
    /// O_DIRECT: around the host page cache.
    None,
}

impl DiskCache {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskCache::Writeback => "writeback",
            DiskCache::None => "none",
        }
    }
}

/// A virtio-blk disk (`--disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// None: probed from the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub readonly: bool,
    /// The guest-visible serial (virtio-blk ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default)]
    pub cache: DiskCache,
}

impl DiskConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            format: None,
            readonly: false,
            serial: None,
            cache: DiskCache::Writeback,
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.path.to_str() {
            None => return Err(format!("path={}: not UTF-8", self.path.to_string_lossy())),
            Some("") => return Err("path=FILE is required".into()),
            Some(s) if s.contains('\0') => return Err("path: contains a NUL byte".into()),
            Some(s) => kv::check_value("path", s)?,
        }
        if let Some(s) = &self.serial {
            check_disk_serial(s)?;
        }
        Ok(())
    }
}

fn check_disk_serial(v: &str) -> Result<(), String> {
    if v.len() > MAX_DISK_SERIAL_LEN || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "serial={v}: at most {MAX_DISK_SERIAL_LEN} printable ASCII characters"
        ));
    }
    kv::check_value("serial", v)
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = DiskConfig::new("");
        for (k, v) in kv::split(s, &["path", "format", "readonly", "serial", "cache"])? {
            match k {
                "path" => {
                    if v.is_empty() {
                        return Err("path= must not be empty".into());
                    }
                    spec.path = PathBuf::from(v);
                }
                "format" => {
                    spec.format = Some(DiskFormat::parse(v).map_err(|_| {
                        format!("format={v}: unknown image format; use raw or qcow2")
                    })?)
                }
                "readonly" => spec.readonly = kv::on_off(k, v)?,
                "serial" => {
                    check_disk_serial(v)?;
                    spec.serial = Some(v.to_string());
                }
                _ => {
                    spec.cache = match v {
                        "none" => DiskCache::None,
                        "writeback" => DiskCache::Writeback,
                        _ => return Err(format!("cache={v}: use none or writeback")),
                    }
                }
            }
        }
        if spec.path.as_os_str().is_empty() {
            return Err("path=FILE is required".into());
        }
        Ok(spec)
    }
}

impl fmt::Display for DiskConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "path={}", utf8(&self.path))?;
        if let Some(format) = self.format {
            write!(f, ",format={format}")?;
        }
        if self.readonly {
            f.write_str(",readonly=on")?;
        }
        if let Some(s) = &self.serial {
            write!(f, ",serial={s}")?;
        }
        if self.cache != DiskCache::Writeback {
            write!(f, ",cache={}", self.cache.as_str())?;
        }
        Ok(())
    }
}

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}' is not a MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)"
            )
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in mac.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "'{s}' is a multicast address; a NIC needs a unicast MAC (first byte even)"
            ));
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetBackend {
    /// An existing TAP interface, opened by name.
    Tap(String),
    /// An open TAP descriptor inherited from the launcher (3 or more).
    Fd(i32),
}

/// A virtio-net NIC (`--net`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(flatten)]
    pub backend: NetBackend,
    /// None: a random locally administered 52:54:00:xx:xx:xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

/// A name Linux accepts for an interface, and that `--net`'s syntax can carry.
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b',')
}

impl NetConfig {
    fn check(&self) -> Result<(), String> {
        match &self.backend {
            NetBackend::Tap(name) if !valid_tap_name(name) => Err(format!(
                "tap={name}: not a valid interface name (1-15 characters, no '/', ':' or ',')"
            )),
            NetBackend::Fd(fd) if *fd < 3 => Err(format!(
                "fd={fd}: expected a descriptor number of 3 or more"
            )),
            _ => Ok(()),
        }
    }
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut fd, mut mac) = (None, None, None);
        for (k, v) in kv::split(s, &["tap", "fd", "mac"])? {
            match k {
                "tap" => tap = Some(v.to_string()),
                "fd" => {
                    fd = Some(v.parse::<i32>().map_err(|_| {
                        format!("fd={v}: expected a descriptor number of 3 or more")
                    })?)
                }
                _ => mac = Some(v.parse()?),
            }
        }
        let backend = match (tap, fd) {
            (Some(t), None) => NetBackend::Tap(t),
            (None, Some(n)) => NetBackend::Fd(n),
            _ => return Err("give exactly one of tap=NAME or fd=N".into()),
        };
        let net = NetConfig { backend, mac };
        net.check()?;
        Ok(net)
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            NetBackend::Tap(name) => write!(f, "tap={name}")?,
            NetBackend::Fd(fd) => write!(f, "fd={fd}")?,
        }
        if let Some(mac) = &self.mac {
            write!(f, ",mac={mac}")?;
        }
        Ok(())
    }
}

/// ferrovmm's log level on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub const ALL: [LogLevel; 6] = [
        LogLevel::Off,
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;
    /// Case-insensitive, as FERROVMM_LOG=DEBUG always worked.
    fn from_str(s: &str) -> Result<Self, String> {
        LogLevel::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| "expected off, error, warn, info, debug or trace".to_string())
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// ferrovmm's seccomp filters: `on` (a forbidden syscall stops the VM with an exit record that
/// names it), `log` (the kernel logs it and lets it through: for finding what a filter lacks)
/// or `off`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    Off,
    Log,
    #[default]
    On,
}

impl SeccompMode {
    pub const ALL: [SeccompMode; 3] = [SeccompMode::Off, SeccompMode::Log, SeccompMode::On];

    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::On => "on",
        }
    }
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SeccompMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| "expected off, log or on".to_string())
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> LaunchConfig {
        let mut c = LaunchConfig::new("web-1", "/boot/vmlinux");
        c.initrd = Some("/boot/initrd.img".into());
        c.cmdline = "console=ttyS0 root=/dev/vda rw quiet".into();
        c.memory_mib = 512;
        c.vcpus = 2;
        c.serial = SerialMode::Socket("/run/fv/vms/web-1/serial.sock".into());
        c.console = ConsoleMode::On(SerialMode::File("/var/log/hvc0.log".into()));
        c.disks = vec![
            DiskConfig {
                path: "/images/root.qcow2".into(),
                format: Some(DiskFormat::Qcow2),
                readonly: false,
                serial: Some("root-disk".into()),
                cache: DiskCache::None,
            },
            DiskConfig::new("/images/seed.img"),
        ];
        c.nets = vec![
            NetConfig {
                backend: NetBackend::Tap("fvtap0".into()),
                mac: Some(Mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef])),
            },
            NetConfig {
                backend: NetBackend::Fd(7),
                mac: None,
            },
        ];
        c.rng = true;
        c.api_socket = Some("/run/fv/vms/web-1/api.sock".into());
        c.exit_file = Some("/run/fv/vms/web-1/exit.json".into());
        c.log_level = Some(LogLevel::Info);
        c.seccomp = SeccompMode::Log;
        c
    }

    #[test]
    fn argv_starts_with_the_name_and_says_each_value_once() {
        let a = full().to_args().unwrap();
        assert_eq!(a[..2], ["--name", "web-1"]);
        assert!(
            a.contains(
                &"--disk=path=/images/root.qcow2,format=qcow2,serial=root-disk,cache=none"
                    .to_string()
            ),
            "{a:?}"
        );
        assert!(a.contains(&"--net=tap=fvtap0,mac=52:54:00:ab:cd:ef".to_string()));
        assert!(a.contains(&"--serial=socket=/run/fv/vms/web-1/serial.sock".to_string()));
        assert!(a.contains(&"--exit-file=/run/fv/vms/web-1/exit.json".to_string()));
    }

    #[test]
    fn each_value_parses_back_to_itself() {
        let c = full();
        for d in &c.disks {
            assert_eq!(&d.to_string().parse::<DiskConfig>().unwrap(), d);
        }
        for n in &c.nets {
            assert_eq!(&n.to_string().parse::<NetConfig>().unwrap(), n);
        }
        for s in [
            SerialMode::Stdio,
            SerialMode::None,
            SerialMode::File("/a,b=c d".into()),
            SerialMode::Socket("-odd".into()),
        ] {
            assert_eq!(s.to_string().parse::<SerialMode>().unwrap(), s);
        }
        assert_eq!(
            c.console.to_string().parse::<ConsoleMode>().unwrap(),
            c.console
        );
        for l in LogLevel::ALL {
            assert_eq!(l.to_string().parse::<LogLevel>().unwrap(), l);
        }
        for m in SeccompMode::ALL {
            assert_eq!(m.to_string().parse::<SeccompMode>().unwrap(), m);
        }
    }

    #[test]
    fn values_the_syntax_cannot_carry_are_refused_when_argv_is_built() {
        let refused = |f: &dyn Fn(&mut LaunchConfig), want: &str| {
            let mut c = full();
            f(&mut c);
            let e = c.to_args().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        refused(
            &|c| c.disks[0].path = "/images/a,b.img".into(),
            "contains ','",
        );
        refused(&|c| c.disks[0].serial = Some("a,b".into()), "contains ','");
        refused(&|c| c.disks[0].serial = Some("x".repeat(21)), "at most 20");
        refused(&|c| c.disks[0].path = "".into(), "path=FILE is required");
        refused(
            &|c| c.nets[0].backend = NetBackend::Tap("a,b".into()),
            "tap=a,b",
        );
        refused(
            &|c| c.nets[0].backend = NetBackend::Tap("waytoolonginterface".into()),
            "not a valid interface name",
        );
        refused(&|c| c.nets[1].backend = NetBackend::Fd(2), "fd=2");
        refused(
            &|c| c.nets[0].backend = NetBackend::Fd(7),
            "fd=7 is given twice",
        );
        refused(&|c| c.name = "".into(), "--name");
        refused(&|c| c.name = "a\nb".into(), "--name");
        refused(&|c| c.name = "n".repeat(65), "--name");
        refused(&|c| c.kernel = "".into(), "--kernel");
        refused(&|c| c.kernel = "/a\0b".into(), "NUL");
        refused(&|c| c.cmdline = "a\0b".into(), "NUL");
        refused(&|c| c.memory_mib = 0, "--memory");
        refused(&|c| c.memory_mib = 7, "too small");
        refused(&|c| c.vcpus = 0, "--vcpus");
        refused(
            &|c| c.console = ConsoleMode::On(SerialMode::Socket("/s".into())),
            "--console",
        );
        refused(
            &|c| c.serial = SerialMode::File("".into()),
            "--serial file=",
        );
        refused(
            &|c| {
                c.serial = SerialMode::Stdio;
                c.console = ConsoleMode::On(SerialMode::Stdio);
            },
            "cannot share the terminal",
        );
        use std::os::unix::ffi::OsStrExt;
        refused(
            &|c| c.initrd = Some(PathBuf::from(std::ffi::OsStr::from_bytes(b"/\xff"))),
            "not UTF-8",
        );
    }

    #[test]
    fn bad_specs_get_one_clear_error() {
        assert!("format=raw"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("path=FILE"));
        assert!("path=/a,format=vmdk"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown image format"));
        assert!("path=/a,speed=fast"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("unknown option"));
        assert!("path=/a,path=/b"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("twice"));
        assert!("path=/a,b"
            .parse::<DiskConfig>()
            .unwrap_err()
            .contains("not key=value"));
        assert!("tap=a,fd=4".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:00:00:01".parse::<NetConfig>().is_err());
        assert!("fd=-1"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("3 or more"));
        assert!("fd=99999999999".parse::<NetConfig>().is_err());
        assert!("tap=t0,mac=zz"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("MAC"));
        assert!("tap=t0,mac=01:00:00:00:00:00"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("tap=t0,mac=52:54:00:00:00:01:02"
            .parse::<NetConfig>()
            .is_err());
        assert!("loud".parse::<LogLevel>().is_err());
        assert_eq!("DEBUG".parse::<LogLevel>(), Ok(LogLevel::Debug));
        assert!("socket=/s".parse::<ConsoleMode>().is_err());
        assert!("file=".parse::<SerialMode>().is_err());
    }

    #[test]
    fn json_round_trip_keeps_everything() {
        let c = full();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<LaunchConfig>(&text).unwrap(), c);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["serial"]["mode"], "socket");
        assert_eq!(v["nets"][0]["tap"], "fvtap0");
        assert_eq!(v["nets"][0]["mac"], "52:54:00:ab:cd:ef");
        assert_eq!(v["nets"][1]["fd"], 7);
        assert_eq!(v["disks"][0]["format"], "qcow2");
        let minimal = LaunchConfig::new("m", "/k");
        let text = serde_json::to_string(&minimal).unwrap();
        assert_eq!(
            serde_json::from_str::<LaunchConfig>(&text).unwrap(),
            minimal
        );
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t","mac":"zz"}"#).is_err());
    }
}
