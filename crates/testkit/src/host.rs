//! What kind of KVM the test host offers.

use std::path::Path;

/// True when `/dev/kvm` is backed by hardware virtualization (vmx/svm in /proc/cpuinfo)
/// and not by PVM (`/sys/module/kvm_pvm`), so a Linux guest can boot under ferrovmm
/// directly; otherwise tests boot Linux guests inside [`crate::Nested`].
pub fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_has_virtualization(&cpuinfo)
        && !Path::new("/sys/module/kvm_pvm").exists()
        && Path::new("/dev/kvm").exists()
}

fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| {
            line.split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vmx_or_svm_flags_only_as_whole_words() {
        assert!(cpu_has_virtualization("flags\t\t: fpu vme svm lm\n"));
        assert!(cpu_has_virtualization("flags\t\t: fpu vmx\n"));
        assert!(!cpu_has_virtualization("flags\t\t: fpu svm_lock vmxe\n"));
        assert!(!cpu_has_virtualization("model name : svm\n"));
    }
}
