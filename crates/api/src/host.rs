//! What the host offers for virtualization, and the default driver that follows from it.

use std::fs;
use std::path::Path;

use crate::def::{Accel, VirtType};

#[derive(Debug, Clone)]
pub struct HostVirt {
    pub dev_kvm_usable: bool,
    pub cpu_flag: Option<&'static str>,
    pub pvm: bool,
}

impl HostVirt {
    pub fn probe() -> Self {
        let dev_kvm_usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        let cpu_flag = if has("vmx") {
            Some("vmx")
        } else if has("svm") {
            Some("svm")
        } else {
            None
        };
        HostVirt {
            dev_kvm_usable,
            cpu_flag,
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    /// Hardware virtualization that runs a Linux guest at native speed.
    pub fn hardware_kvm(&self) -> bool {
        self.dev_kvm_usable && self.cpu_flag.is_some() && !self.pvm
    }

    /// The driver used when a definition names none, and why.
    pub fn default_driver(&self) -> (VirtType, String) {
        if self.hardware_kvm() {
            return (
                VirtType::Kvm,
                "hardware virtualization (/dev/kvm with vmx/svm)".into(),
            );
        }
        let why = if self.pvm {
            "kvm_pvm is loaded: /dev/kvm is PVM nested virtualization, which cannot boot a Linux guest; using qemu with TCG"
        } else if !self.dev_kvm_usable {
            "no usable /dev/kvm; using qemu with TCG"
        } else {
            "the CPU has no vmx/svm flag; using qemu with TCG"
        };
        (VirtType::Qemu, why.into())
    }

    /// QEMU accelerator when the definition names none.
    pub fn default_accel(&self) -> Accel {
        if self.hardware_kvm() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}
