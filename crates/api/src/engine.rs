//! Which program runs a domain, and why.
//!
//! As in libvirt, `type='kvm'` asks for hardware acceleration, not for a particular VMM: a kvm
//! domain runs on ferrovmm when ferrovmm supports everything the definition asks for, otherwise
//! on QEMU with `accel=kvm`. `emulator` in the definition (libvirt's `<emulator>`) chooses
//! explicitly. [`choose_engine`] is a pure function of the host's capabilities and the
//! definition, used at define, at start and by dominfo.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::def::{Accel, DiskDevice, DomainDef, VirtType};
use crate::error::ApiError;
use crate::host::HostVirt;

/// The program that runs a domain's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// ferrovmm on /dev/kvm (the `kvm` driver).
    Ferrovmm,
    /// qemu-system-x86_64 (the `qemu` driver), with the accelerator in [`EngineChoice::accel`].
    Qemu,
    /// The in-process simulation (the `test` driver).
    Test,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Ferrovmm => "ferrovmm",
            Engine::Qemu => "qemu",
            Engine::Test => "test",
        }
    }

    /// The driver that runs this engine.
    pub fn driver(self) -> VirtType {
        match self {
            Engine::Ferrovmm => VirtType::Kvm,
            Engine::Qemu => VirtType::Qemu,
            Engine::Test => VirtType::Test,
        }
    }
}

/// The engine of a domain, why, and whether it can start on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineChoice {
    pub engine: Engine,
    /// QEMU's accelerator (only with the qemu engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// Why this engine, for users (dominfo, the daemon's log at start).
    pub reason: String,
    /// Why the domain cannot start on this host; None when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cannot_start: Option<String>,
}

impl EngineChoice {
    /// "ferrovmm", "qemu (accel=kvm)", "test".
    pub fn describe(&self) -> String {
        match self.accel {
            Some(Accel::Kvm) => format!("{} (accel=kvm)", self.engine.as_str()),
            Some(Accel::Tcg) => format!("{} (accel=tcg)", self.engine.as_str()),
            None => self.engine.as_str().to_string(),
        }
    }

    /// The error a start gets when the domain cannot start on this host.
    pub fn check_startable(&self) -> Result<(), ApiError> {
        match &self.cannot_start {
            Some(why) => Err(ApiError::not_supported(why.clone())),
            None => Ok(()),
        }
    }
}

/// What ferrovmm lacks for this definition (None: it can run it).
pub fn ferrovmm_lacks(def: &DomainDef) -> Option<&'static str> {
    if def.disks.iter().any(|d| d.device == DiskDevice::Cdrom) {
        return Some("CD-ROMs (it has no firmware to boot one)");
    }
    if def.graphics.is_some() {
        return Some("graphics (it has no display device)");
    }
    if def.os.kernel.is_none() {
        return Some("firmware boot (it boots a kernel directly: give os.kernel)");
    }
    None
}

/// The engine an `emulator` value names: ferrovmm, or a QEMU system emulator.
pub fn named_engine(emulator: &str) -> Result<Engine, ApiError> {
    let base = Path::new(emulator)
        .file_name()
        .and_then(|b| b.to_str())
        .unwrap_or("");
    if base == "ferrovmm" {
        Ok(Engine::Ferrovmm)
    } else if base.starts_with("qemu-system-") || base == "qemu-kvm" || base == "qemu" {
        Ok(Engine::Qemu)
    } else {
        Err(ApiError::invalid(format!(
            "emulator '{emulator}' is neither ferrovmm nor a QEMU system emulator (qemu-system-x86_64)"
        )))
    }
}

/// Combinations no host can run, refused at define.
pub fn validate(def: &DomainDef) -> Result<(), ApiError> {
    let Some(emulator) = &def.emulator else {
        if def.virt_type == Some(VirtType::Kvm) && def.accel == Some(Accel::Tcg) {
            return Err(ApiError::invalid(
                "type 'kvm' means hardware acceleration and cannot use accel 'tcg': use type 'qemu' for TCG",
            ));
        }
        return Ok(());
    };
    let engine = named_engine(emulator)?;
    match (def.virt_type, engine) {
        (Some(VirtType::Test), _) => Err(ApiError::invalid(format!(
            "the test driver runs no emulator (got emulator '{emulator}')"
        ))),
        (Some(VirtType::Qemu), Engine::Ferrovmm) => Err(ApiError::invalid(
            "emulator ferrovmm runs type 'kvm' domains (ferrovmm has no TCG); use type 'kvm'",
        )),
        (_, Engine::Ferrovmm) => match ferrovmm_lacks(def) {
            Some(what) => Err(ApiError::not_supported(format!(
                "emulator ferrovmm was chosen, but ferrovmm does not support {what} yet; name a qemu-system binary or no emulator"
            ))),
            None => Ok(()),
        },
        (Some(VirtType::Kvm), Engine::Qemu) if def.accel == Some(Accel::Tcg) => Err(
            ApiError::invalid("type 'kvm' means hardware acceleration and cannot use accel 'tcg': use type 'qemu' for TCG"),
        ),
        _ => Ok(()),
    }
}

/// Why a host cannot run type='kvm' domains, with the way out (libvirt's advice: TCG).
fn no_hardware_virt(host: &HostVirt) -> String {
    let why = if !host.dev_kvm_usable {
        "there is no usable /dev/kvm"
    } else if host.pvm {
        "/dev/kvm is PVM nested virtualization (kvm_pvm), which cannot run a full guest"
    } else {
        "the CPU has no vmx/svm flag"
    };
    format!(
        "type 'kvm' needs hardware virtualization, which this host lacks ({why}); define the domain with type 'qemu' (<domain type='qemu'>, --virt-type qemu) to run it with TCG software emulation"
    )
}

/// The engine for `def` on `host`. `def.virt_type` None means the host's default driver.
pub fn choose_engine(host: &HostVirt, def: &DomainDef) -> EngineChoice {
    let virt_type = def.virt_type.unwrap_or_else(|| host.default_driver().0);
    let explicit = def.emulator.as_deref().and_then(|e| named_engine(e).ok());
    match virt_type {
        VirtType::Test => EngineChoice {
            engine: Engine::Test,
            accel: None,
            reason: "type 'test': the in-process simulated hypervisor".into(),
            cannot_start: None,
        },
        VirtType::Qemu => {
            let (accel, why) = match def.accel {
                Some(a) => (a, "as the definition asks"),
                None if host.hardware_kvm() => (Accel::Kvm, "the host has hardware virtualization"),
                None => (Accel::Tcg, "the host has no hardware virtualization"),
            };
            // An explicit accel=kvm runs wherever /dev/kvm opens (on PVM: small guests only).
            let cannot_start = (accel == Accel::Kvm && !host.dev_kvm_usable)
                .then(|| no_hardware_virt(host).replace("type 'kvm'", "accel 'kvm'"));
            EngineChoice {
                engine: Engine::Qemu,
                accel: Some(accel),
                reason: format!(
                    "type 'qemu' runs on QEMU; accel={} because {why}",
                    if accel == Accel::Kvm { "kvm" } else { "tcg" }
                ),
                cannot_start,
            }
        }
        VirtType::Kvm => {
            let (engine, reason) = match (explicit, ferrovmm_lacks(def)) {
                (Some(Engine::Ferrovmm), _) => (
                    Engine::Ferrovmm,
                    "the definition names ferrovmm as its emulator".to_string(),
                ),
                (Some(_), _) => (
                    Engine::Qemu,
                    "the definition names a QEMU emulator; type 'kvm' runs it with accel=kvm"
                        .to_string(),
                ),
                (None, None) => (
                    Engine::Ferrovmm,
                    "type 'kvm' and ferrovmm supports everything the definition asks for"
                        .to_string(),
                ),
                (None, Some(what)) => (
                    Engine::Qemu,
                    format!(
                        "type 'kvm', but ferrovmm does not support {what} yet: QEMU with accel=kvm runs it"
                    ),
                ),
            };
            let cannot_start = match engine {
                // An explicit ferrovmm runs wherever /dev/kvm opens (on PVM: small guests only).
                Engine::Ferrovmm if explicit.is_some() => (!host.dev_kvm_usable).then(|| {
                    "emulator ferrovmm needs /dev/kvm, which this host does not offer".to_string()
                }),
                _ => (!host.hardware_kvm()).then(|| no_hardware_virt(host)),
            };
            EngineChoice {
                engine,
                accel: (engine == Engine::Qemu).then_some(Accel::Kvm),
                reason,
                cannot_start,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::def::{DiskDef, DiskFormat, GraphicsDef};

    /// This host: /dev/kvm opens but is PVM, no vmx/svm.
    fn pvm_host() -> HostVirt {
        HostVirt {
            dev_kvm_usable: true,
            cpu_flag: None,
            pvm: true,
        }
    }

    fn no_kvm_host() -> HostVirt {
        HostVirt {
            dev_kvm_usable: false,
            cpu_flag: None,
            pvm: false,
        }
    }

    fn hardware_host() -> HostVirt {
        HostVirt {
            dev_kvm_usable: true,
            cpu_flag: Some("svm"),
            pvm: false,
        }
    }

    fn kvm_def() -> DomainDef {
        let mut def = DomainDef::new("k");
        def.virt_type = Some(VirtType::Kvm);
        def.os.kernel = Some("/boot/vmlinuz".into());
        def
    }

    fn with_cdrom(mut def: DomainDef) -> DomainDef {
        def.disks.push(DiskDef {
            path: "/x.iso".into(),
            format: DiskFormat::Raw,
            device: DiskDevice::Cdrom,
            target: None,
            readonly: true,
        });
        def
    }

    #[test]
    fn a_kvm_domain_runs_on_ferrovmm_when_it_supports_the_definition() {
        let c = choose_engine(&hardware_host(), &kvm_def());
        assert_eq!((c.engine, c.accel), (Engine::Ferrovmm, None));
        assert!(
            c.reason.contains("ferrovmm supports everything"),
            "{}",
            c.reason
        );
        assert_eq!(c.cannot_start, None);
        assert_eq!(c.engine.driver(), VirtType::Kvm);
    }

    #[test]
    fn a_kvm_domain_that_needs_more_runs_on_qemu_with_kvm() {
        let host = hardware_host();
        let c = choose_engine(&host, &with_cdrom(kvm_def()));
        assert_eq!((c.engine, c.accel), (Engine::Qemu, Some(Accel::Kvm)));
        assert!(c.reason.contains("CD-ROMs"), "{}", c.reason);
        assert_eq!(c.describe(), "qemu (accel=kvm)");
        let mut graphics = kvm_def();
        graphics.graphics = Some(GraphicsDef::vnc_loopback());
        let c = choose_engine(&host, &graphics);
        assert_eq!(c.engine, Engine::Qemu);
        assert!(c.reason.contains("graphics"), "{}", c.reason);
        let mut firmware = kvm_def();
        firmware.os.kernel = None;
        assert_eq!(choose_engine(&host, &firmware).engine, Engine::Qemu);
        assert_eq!(choose_engine(&host, &firmware).cannot_start, None);
    }

    #[test]
    fn emulator_chooses_explicitly() {
        let host = hardware_host();
        let mut def = kvm_def();
        def.emulator = Some("/usr/bin/qemu-system-x86_64".into());
        let c = choose_engine(&host, &def);
        assert_eq!((c.engine, c.accel), (Engine::Qemu, Some(Accel::Kvm)));
        assert!(c.reason.contains("names a QEMU emulator"), "{}", c.reason);
        def.emulator = Some("ferrovmm".into());
        assert_eq!(choose_engine(&host, &def).engine, Engine::Ferrovmm);
        validate(&def).expect("valid");
        // ferrovmm named for what it cannot run, or a program that is neither: refused at define.
        let mut cdrom = with_cdrom(def.clone());
        cdrom.emulator = Some("/usr/local/bin/ferrovmm".into());
        assert!(validate(&cdrom).unwrap_err().message.contains("CD-ROMs"));
        def.emulator = Some("/bin/sh".into());
        assert!(validate(&def).unwrap_err().message.contains("'/bin/sh'"));
        def.emulator = Some("ferrovmm".into());
        def.virt_type = Some(VirtType::Qemu);
        assert!(validate(&def).unwrap_err().message.contains("type 'kvm'"));
    }

    #[test]
    fn without_hardware_virtualization_a_kvm_domain_cannot_start_and_is_told_to_use_qemu() {
        for host in [pvm_host(), no_kvm_host()] {
            for def in [kvm_def(), with_cdrom(kvm_def())] {
                let c = choose_engine(&host, &def);
                let why = c.cannot_start.clone().expect("cannot start");
                assert!(
                    why.contains("hardware virtualization") && why.contains("type 'qemu'"),
                    "{why}"
                );
                let err = c.check_startable().unwrap_err();
                assert_eq!(err.code, crate::ErrorCode::NotSupported);
            }
        }
        let why = choose_engine(&pvm_host(), &kvm_def()).cannot_start.unwrap();
        assert!(why.contains("PVM"), "{why}");
    }

    #[test]
    fn an_explicit_ferrovmm_runs_wherever_dev_kvm_opens() {
        let mut def = kvm_def();
        def.emulator = Some("ferrovmm".into());
        let c = choose_engine(&pvm_host(), &def);
        assert_eq!((c.engine, c.cannot_start), (Engine::Ferrovmm, None));
        let c = choose_engine(&no_kvm_host(), &def);
        assert!(c.cannot_start.unwrap().contains("/dev/kvm"));
    }

    #[test]
    fn qemu_domains_use_tcg_here_and_kvm_with_hardware() {
        let mut def = kvm_def();
        def.virt_type = Some(VirtType::Qemu);
        let c = choose_engine(&pvm_host(), &def);
        assert_eq!((c.engine, c.accel), (Engine::Qemu, Some(Accel::Tcg)));
        assert_eq!(c.cannot_start, None);
        let c = choose_engine(&hardware_host(), &def);
        assert_eq!(c.accel, Some(Accel::Kvm));
        def.accel = Some(Accel::Kvm);
        let c = choose_engine(&no_kvm_host(), &def);
        assert!(c.cannot_start.unwrap().contains("accel 'kvm'"));
        def.virt_type = None;
        def.accel = None;
        assert_eq!(choose_engine(&pvm_host(), &def).accel, Some(Accel::Tcg));
        def.virt_type = Some(VirtType::Kvm);
        def.accel = Some(Accel::Tcg);
        assert!(validate(&def).unwrap_err().message.contains("accel 'tcg'"));
    }
}
