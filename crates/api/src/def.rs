//! Domain definitions: the native format (TOML, see docs/api/definition.md) and its validation.
//!
//! The same struct is carried as JSON in API bodies and produced from libvirt XML by [`crate::xml`].

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::error::ApiError;
use crate::size;

/// The domain type (libvirt's `<domain type=...>`); with the host it decides the engine
/// (see [`crate::engine`]) and so the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtType {
    /// Hardware acceleration (KVM): ferrovmm when it supports the definition, else QEMU with
    /// accel=kvm. As a driver name: the ferrovmm driver.
    Kvm,
    /// qemu-system-x86_64 over QMP (accel kvm or tcg).
    Qemu,
    /// In-process simulated hypervisor, for tests of the daemon's logic.
    Test,
}

impl VirtType {
    pub fn as_str(self) -> &'static str {
        match self {
            VirtType::Kvm => "kvm",
            VirtType::Qemu => "qemu",
            VirtType::Test => "test",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kvm" => Some(VirtType::Kvm),
            "qemu" => Some(VirtType::Qemu),
            "test" => Some(VirtType::Test),
            _ => None,
        }
    }
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What to do when the guest powers off, reboots or crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stop the domain (it becomes shut off).
    #[default]
    Destroy,
    /// Start it again.
    Restart,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Destroy => "destroy",
            Action::Restart => "restart",
        }
    }
}

/// 256 MiB.
fn default_memory_kib() -> u64 {
    256 * 1024
}
fn default_vcpus() -> u32 {
    1
}
fn restart() -> Action {
    Action::Restart
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A domain definition.
///
/// Read through [`DomainDefInput`], which also takes memory as `memory_mib` (older
/// definitions and stored rows) or `memory` with a unit; written with `memory_kib`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DomainDefInput")]
pub struct DomainDef {
    pub name: String,
    /// Assigned by the daemon when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Driver; absent means the host's default (kvm, or qemu with TCG on PVM hosts).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub virt_type: Option<VirtType>,
    /// Only for the qemu driver; absent means the host's best.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// The engine, chosen explicitly (libvirt's `<emulator>`): "ferrovmm", or a qemu-system
    /// binary (a name, or an absolute path that is then run). Absent: see [`crate::engine`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator: Option<String>,
    /// Memory in KiB, exactly as given (libvirt's unit).
    pub memory_kib: u64,
    pub vcpus: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub os: OsDef,
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskDef>,
    #[serde(default, rename = "interface", skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<GraphicsDef>,
    pub on_poweroff: Action,
    pub on_reboot: Action,
    pub on_crash: Action,
}

/// Memory given as `memory = ...`: a number of KiB, or text with a unit ("512MiB", "4G").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum MemoryInput {
    Kib(u64),
    Text(String),
}

/// What TOML and JSON definitions are read as: [`DomainDef`] with the memory spellings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainDefInput {
    name: String,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(rename = "type", default)]
    virt_type: Option<VirtType>,
    #[serde(default)]
    accel: Option<Accel>,
    #[serde(default)]
    emulator: Option<String>,
    #[serde(default)]
    memory_kib: Option<u64>,
    /// The spelling before memory was kept in KiB (stored rows, older TOML files).
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    memory: Option<MemoryInput>,
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    #[serde(default)]
    os: OsDef,
    #[serde(default, rename = "disk")]
    disks: Vec<DiskDef>,
    #[serde(default, rename = "interface")]
    interfaces: Vec<InterfaceDef>,
    #[serde(default)]
    graphics: Option<GraphicsDef>,
    #[serde(default)]
    on_poweroff: Action,
    #[serde(default = "restart")]
    on_reboot: Action,
    #[serde(default)]
    on_crash: Action,
}

impl DomainDefInput {
    fn memory_kib(&self) -> Result<u64, String> {
        let given = [
            self.memory_kib.map(|_| "memory_kib"),
            self.memory_mib.map(|_| "memory_mib"),
            self.memory.as_ref().map(|_| "memory"),
        ];
        let given: Vec<&str> = given.into_iter().flatten().collect();
        if given.len() > 1 {
            return Err(format!(
                "memory is given twice ({}): give one of memory_kib, memory_mib, memory",
                given.join(", ")
            ));
        }
        if let Some(kib) = self.memory_kib {
            return Ok(kib);
        }
        if let Some(mib) = self.memory_mib {
            return mib
                .checked_mul(1024)
                .ok_or_else(|| format!("memory_mib {mib} is too large"));
        }
        match &self.memory {
            None => Ok(default_memory_kib()),
            Some(MemoryInput::Kib(kib)) => Ok(*kib),
            Some(MemoryInput::Text(text)) => {
                let sized =
                    size::parse(text, "KiB").map_err(|e| format!("memory '{text}': {e}"))?;
                if !sized.exact {
                    return Err(format!("memory '{text}' is not a whole number of KiB"));
                }
                Ok(sized.kib)
            }
        }
    }
}

impl TryFrom<DomainDefInput> for DomainDef {
    type Error = String;
    fn try_from(i: DomainDefInput) -> Result<Self, String> {
        Ok(DomainDef {
            memory_kib: i.memory_kib()?,
            name: i.name,
            uuid: i.uuid,
            virt_type: i.virt_type,
            accel: i.accel,
            emulator: i.emulator,
            vcpus: i.vcpus,
            os: i.os,
            disks: i.disks,
            interfaces: i.interfaces,
            graphics: i.graphics,
            on_poweroff: i.on_poweroff,
            on_reboot: i.on_reboot,
            on_crash: i.on_crash,
        })
    }
}

/// Boot configuration: a direct kernel boot, or firmware booting from disk/cdrom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OsDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Firmware boot order, e.g. ["cdrom", "hd"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot: Vec<BootDev>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDev {
    Hd,
    Cdrom,
    Network,
}

/// The project's one image-format type (raw, qcow2), shared with ferrovmm and ferrovirt-disk.
pub use ferrovmm_api::DiskFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskDevice {
    #[default]
    Disk,
    Cdrom,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    /// Image file on the host.
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default, skip_serializing_if = "is_default")]
    pub device: DiskDevice,
    /// Guest device name (vda, vdb ...); assigned in order when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceKind {
    /// A ferrovirt virtual network by name.
    Network,
    /// An existing host bridge.
    Bridge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceDef {
    #[serde(rename = "type")]
    pub kind: InterfaceKind,
    /// Network name or bridge name.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphicsKind {
    Vnc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphicsDef {
    #[serde(rename = "type")]
    pub kind: GraphicsKind,
    /// Listen address (an IP address). Loopback unless the daemon runs with
    /// --allow-remote-vnc, and then only with a password (see [`GraphicsDef::check_listen`]).
    #[serde(default = "loopback")]
    pub listen: String,
    /// VNC password (libvirt's `passwd`; the VNC protocol uses at most 8 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passwd: Option<String>,
}

/// The VNC protocol's password limit (DES key).
pub const VNC_PASSWORD_MAX: usize = 8;

impl GraphicsDef {
    /// A VNC display on 127.0.0.1 without password.
    pub fn vnc_loopback() -> GraphicsDef {
        GraphicsDef {
            kind: GraphicsKind::Vnc,
            listen: loopback(),
            passwd: None,
        }
    }

    /// The listen address as an IP address.
    pub fn listen_ip(&self) -> Result<std::net::IpAddr, ApiError> {
        self.listen.parse().map_err(|_| {
            ApiError::invalid(format!(
                "VNC listen address '{}' is not an IP address (e.g. 127.0.0.1 or ::1)",
                self.listen
            ))
        })
    }

    /// Checks that need no host: an IP address, a password of 1 to 8 characters.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.listen_ip()?;
        if let Some(p) = &self.passwd {
            let n = p.chars().count();
            if n == 0 || n > VNC_PASSWORD_MAX || p.chars().any(char::is_control) {
                return Err(ApiError::invalid(format!(
                    "the VNC password must be 1 to {VNC_PASSWORD_MAX} printable characters (the VNC protocol uses no more), got {n}"
                )));
            }
        }
        Ok(())
    }

    /// The daemon's policy: VNC listens on loopback only, unless it runs with
    /// --allow-remote-vnc (`allow_remote`), and then only with a password.
    pub fn check_listen(&self, allow_remote: bool) -> Result<(), ApiError> {
        self.validate()?;
        if self.listen_ip()?.is_loopback() {
            return Ok(());
        }
        if !allow_remote {
            return Err(ApiError::invalid(format!(
                "VNC listen address '{}' is not loopback: ferrovirtd serves VNC on 127.0.0.1/::1 only (reach it through an SSH tunnel), unless it runs with --allow-remote-vnc",
                self.listen
            )));
        }
        if self.passwd.is_none() {
            return Err(ApiError::invalid(format!(
                "VNC listen address '{}' is not loopback: a VNC display reachable from other hosts needs a password (graphics.passwd, <graphics passwd=...>)",
                self.listen
            )));
        }
        Ok(())
    }
}

fn loopback() -> String {
    "127.0.0.1".to_string()
}

impl DomainDef {
    /// A minimal definition, used by `ferrovirt install` and tests.
    pub fn new(name: &str) -> Self {
        DomainDef {
            name: name.to_string(),
            uuid: None,
            virt_type: None,
            accel: None,
            emulator: None,
            memory_kib: default_memory_kib(),
            vcpus: default_vcpus(),
            os: OsDef::default(),
            disks: Vec::new(),
            interfaces: Vec::new(),
            graphics: None,
            on_poweroff: Action::Destroy,
            on_reboot: Action::Restart,
            on_crash: Action::Destroy,
        }
    }

    /// Parse the native TOML format.
    pub fn from_toml(text: &str) -> Result<Self, ApiError> {
        toml::from_str(text)
            .map_err(|e| ApiError::malformed(format!("invalid TOML definition: {}", e.message())))
    }

    /// Emit the native TOML format.
    pub fn to_toml(&self) -> String {
        // Serializing a plain struct of strings/numbers/tables cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks that need no host access: name, sizes, combinations.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_name(&self.name)?;
        if let Some(uuid) = &self.uuid {
            if !is_uuid(uuid) {
                return Err(ApiError::invalid(format!(
                    "uuid '{uuid}' is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex digits)"
                )));
            }
        }
        if self.memory_kib < size::MIN_MEMORY_KIB {
            return Err(ApiError::invalid(format!(
                "memory must be at least 1 MiB (got {} KiB)",
                self.memory_kib
            )));
        }
        if self.memory_kib > size::MAX_MEMORY_KIB {
            return Err(ApiError::invalid(format!(
                "memory {} KiB is more than the 16 TiB ferrovirt supports",
                self.memory_kib
            )));
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return Err(ApiError::invalid(format!(
                "vcpus must be 1..255 (got {})",
                self.vcpus
            )));
        }
        crate::engine::validate(self)?;
        if self.os.kernel.is_none() && (self.os.initrd.is_some() || self.os.cmdline.is_some()) {
            return Err(ApiError::invalid("os.initrd and os.cmdline need os.kernel"));
        }
        let bootable = self.os.kernel.is_some() || !self.disks.is_empty();
        if !bootable {
            return Err(ApiError::invalid(
                "nothing to boot: give os.kernel (direct kernel boot) or at least one disk/cdrom",
            ));
        }
        let mut targets = Vec::new();
        for disk in &self.disks {
            if disk.path.as_os_str().is_empty() {
                return Err(ApiError::invalid("a disk has an empty path"));
            }
            if let Some(t) = &disk.target {
                if targets.contains(t) {
                    return Err(ApiError::invalid(format!(
                        "disk target '{t}' is used twice"
                    )));
                }
                targets.push(t.clone());
            }
        }
        if let Some(g) = &self.graphics {
            g.validate()?;
        }
        for nic in &self.interfaces {
            if nic.source.is_empty() {
                return Err(ApiError::invalid("an interface has an empty source"));
            }
            if let Some(mac) = &nic.mac {
                if !is_mac(mac) {
                    return Err(ApiError::invalid(format!(
                        "interface MAC '{mac}' is not of the form 52:54:00:xx:xx:xx"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every host file the definition names: each must exist before define/start.
    pub fn host_paths(&self) -> Vec<(&'static str, &Path)> {
        let mut out = Vec::new();
        if let Some(binary) = self.emulator_binary() {
            out.push(("emulator", binary));
        }
        if let Some(k) = &self.os.kernel {
            out.push(("kernel", k.as_path()));
        }
        if let Some(i) = &self.os.initrd {
            out.push(("initrd", i.as_path()));
        }
        for d in &self.disks {
            out.push((
                if d.device == DiskDevice::Cdrom {
                    "cdrom"
                } else {
                    "disk"
                },
                d.path.as_path(),
            ));
        }
        out
    }

    /// Check that every named file exists (done by the daemon, which sees the host's files).
    pub fn check_paths(&self) -> Result<(), ApiError> {
        for (what, path) in self.host_paths() {
            if !path.is_file() && !path.exists() {
                return Err(ApiError::invalid(format!(
                    "{what} path '{}' does not exist",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// The program `emulator` names by absolute path, which the driver then runs.
    pub fn emulator_binary(&self) -> Option<&Path> {
        self.emulator
            .as_deref()
            .map(Path::new)
            .filter(|p| p.is_absolute())
    }

    /// Memory in whole MiB, rounded up: for a VMM that sizes guest RAM in MiB.
    pub fn memory_mib_rounded_up(&self) -> u64 {
        self.memory_kib.div_ceil(1024)
    }

    /// Guest device name of the n-th disk.
    pub fn disk_target(&self, index: usize) -> String {
        if let Some(t) = self.disks.get(index).and_then(|d| d.target.clone()) {
            return t;
        }
        let prefix = match self.disks.get(index).map(|d| d.device) {
            Some(DiskDevice::Cdrom) => "sd",
            _ => "vd",
        };
        let letter = (b'a' + (index % 26) as u8) as char;
        format!("{prefix}{letter}")
    }
}

/// Domain names: 1..64 chars of letters, digits, `.`, `_`, `-`, `+`; not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid("domain name is empty"));
    }
    if name.len() > 64 {
        return Err(ApiError::invalid(format!(
            "domain name '{name}' is longer than 64 characters"
        )));
    }
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if !ok_chars || name.starts_with('.') || name.starts_with('-') {
        return Err(ApiError::invalid(format!(
            "domain name '{name}' may only use letters, digits, '.', '_', '-', '+' and must not start with '.' or '-'"
        )));
    }
    Ok(())
}

pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip() {
        let text = r#"
name = "web1"
type = "qemu"
memory_mib = 512
vcpus = 2
on_crash = "restart"
[os]
kernel = "/boot/vmlinuz"
cmdline = "console=ttyS0"
[[disk]]
path = "/var/lib/ferrovirt/images/web1.qcow2"
format = "qcow2"
[[interface]]
type = "bridge"
source = "br0"
"#;
        let def = DomainDef::from_toml(text).expect("parses");
        assert_eq!(def.memory_kib, 512 * 1024);
        assert_eq!(def.virt_type, Some(VirtType::Qemu));
        assert_eq!(def.on_crash, Action::Restart);
        assert_eq!(def.on_reboot, Action::Restart);
        assert_eq!(def.disks[0].format, DiskFormat::Qcow2);
        let again = DomainDef::from_toml(&def.to_toml()).expect("re-parses");
        assert_eq!(def, again);
        def.validate().expect("valid");
    }

    fn with_memory(line: &str) -> Result<DomainDef, ApiError> {
        DomainDef::from_toml(&format!("name = \"m\"\n{line}\n[os]\nkernel = \"/k\"\n"))
    }

    #[test]
    fn memory_in_every_unit_is_kept_in_kib_through_toml_and_json() {
        for (line, kib) in [
            ("memory_kib = 219100", 219100),
            ("memory = 219100", 219100),
            ("memory = \"219100\"", 219100),
            ("memory = \"219100KiB\"", 219100),
            ("memory = \"219100k\"", 219100),
            ("memory = \"219100 K\"", 219100),
            ("memory = \"224358400b\"", 219100),
            ("memory = \"224358400 bytes\"", 219100),
            ("memory = \"512M\"", 512 * 1024),
            ("memory = \"512MiB\"", 512 * 1024),
            ("memory = \"4GiB\"", 4 << 20),
            ("memory = \"4G\"", 4 << 20),
            ("memory = \"1TiB\"", 1 << 30),
            ("memory = \"1024000KB\"", 1_000_000),
            ("memory = \"2048MB\"", 2_000_000),
            ("memory_mib = 300", 300 * 1024),
        ] {
            let def = with_memory(line).unwrap_or_else(|e| panic!("{line}: {}", e.message));
            assert_eq!(def.memory_kib, kib, "{line}");
            def.validate()
                .unwrap_or_else(|e| panic!("{line}: {}", e.message));
            let toml = def.to_toml();
            assert!(toml.contains(&format!("memory_kib = {kib}\n")), "{toml}");
            assert_eq!(
                DomainDef::from_toml(&toml).expect("re-parses"),
                def,
                "{line}"
            );
            let json = serde_json::to_string(&def).expect("serializes");
            assert!(json.contains(&format!("\"memory_kib\":{kib},")), "{json}");
            let again: DomainDef = serde_json::from_str(&json).expect("JSON re-parses");
            assert_eq!(again, def, "{line}");
        }
    }

    #[test]
    fn a_stored_definition_with_memory_mib_still_loads() {
        let old = r#"{"name":"old","type":"qemu","memory_mib":512,"vcpus":1,"os":{"kernel":"/k"},"on_poweroff":"destroy","on_reboot":"restart","on_crash":"destroy"}"#;
        let def: DomainDef = serde_json::from_str(old).expect("loads");
        assert_eq!(def.memory_kib, 512 * 1024);
        assert_eq!(DomainDef::new("x").memory_kib, 256 * 1024);
    }

    #[test]
    fn bad_memory_is_one_clear_error() {
        for (line, needle) in [
            ("memory = \"1000b\"", "not a whole number of KiB"),
            ("memory = \"12 parsecs\"", "'parsecs'"),
            ("memory = \"lots\"", "'lots' is not a size"),
            ("memory_kib = 1024\nmemory_mib = 1", "memory is given twice"),
            ("memory = \"99999999999EiB\"", "too large"),
        ] {
            let err = with_memory(line).expect_err(line);
            assert_eq!(err.code, crate::ErrorCode::MalformedBody, "{line}");
            assert!(err.message.contains(needle), "{line}: {}", err.message);
        }
        let err = with_memory("memory_kib = 1023")
            .expect("parses")
            .validate()
            .unwrap_err();
        assert!(err.message.contains("at least 1 MiB"), "{}", err.message);
    }

    #[test]
    fn ferrovmm_gets_memory_rounded_up_to_mib() {
        let mut def = DomainDef::new("a");
        def.memory_kib = 219100;
        assert_eq!(def.memory_mib_rounded_up(), 214);
        def.memory_kib = 512 * 1024;
        assert_eq!(def.memory_mib_rounded_up(), 512);
    }

    #[test]
    fn toml_unknown_key_is_an_error_naming_it() {
        let err = DomainDef::from_toml("name = \"a\"\nmemroy_mib = 5\n").unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::MalformedBody);
        assert!(err.message.contains("memroy_mib"), "{}", err.message);
    }

    #[test]
    fn memory_zero_is_rejected() {
        let mut def = DomainDef::new("a");
        def.os.kernel = Some("/k".into());
        def.memory_kib = 0;
        let err = def.validate().unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidDefinition);
        assert!(err.message.contains("memory"));
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in ["", "-x", "a b", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(validate_name(name).is_err(), "{name:?} accepted");
        }
        validate_name("CentOSVM").expect("ok");
    }

    #[test]
    fn missing_kernel_file_is_named() {
        let mut def = DomainDef::new("a");
        def.os.kernel = Some("/nonexistent/vmlinuz".into());
        let err = def.check_paths().unwrap_err();
        assert!(err.message.contains("/nonexistent/vmlinuz"));
    }
}
