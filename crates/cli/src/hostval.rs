//! `ferrovirt host-validate`: like virt-host-validate, each check PASS/WARN/FAIL with a hint.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use ferrovirt_api::host::HostVirt;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: String,
    pub result: Verdict,
    /// What was found, or what to do about it.
    pub hint: String,
}

fn check(name: &str, result: Verdict, hint: impl Into<String>) -> Check {
    Check {
        check: name.to_string(),
        result,
        hint: hint.into(),
    }
}

fn in_path(program: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

fn module_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

fn module_available(name: &str, file: &str) -> bool {
    if module_loaded(name) {
        return true;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let base = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel");
    ["", ".xz", ".zst", ".gz"]
        .iter()
        .any(|ext| base.join(format!("{file}{ext}")).exists())
}

pub fn run() -> Vec<Check> {
    let host = HostVirt::probe();
    let mut out = Vec::new();
    out.push(match host.cpu_flag {
        Some(flag) => check("hardware virtualization (vmx/svm)", Verdict::Pass, format!("CPU flag {flag}")),
        None => check(
            "hardware virtualization (vmx/svm)",
            Verdict::Warn,
            "no vmx/svm flag in /proc/cpuinfo: enable VT-x/AMD-V in the firmware, or nested virtualization on the outer hypervisor",
        ),
    });
    let kvm = Path::new("/dev/kvm");
    match fs::metadata(kvm) {
        Ok(meta) if meta.file_type().is_char_device() => {
            out.push(check(
                "/dev/kvm exists",
                Verdict::Pass,
                format!("mode {:o}", meta.permissions().mode() & 0o7777),
            ));
            out.push(if host.dev_kvm_usable {
                check("/dev/kvm is accessible", Verdict::Pass, "opened read-write")
            } else {
                check(
                    "/dev/kvm is accessible",
                    Verdict::Fail,
                    "cannot open read-write: run as root or add the user to group kvm",
                )
            });
        }
        _ => out.push(check(
            "/dev/kvm exists",
            Verdict::Fail,
            "no /dev/kvm: load kvm_intel or kvm_amd (modprobe) and check the firmware settings",
        )),
    }
    let loaded: Vec<&str> = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| module_loaded(m))
        .collect();
    out.push(if loaded.is_empty() {
        check(
            "kvm modules loaded (lsmod | grep kvm)",
            Verdict::Fail,
            "none loaded: modprobe kvm_intel or kvm_amd",
        )
    } else {
        check(
            "kvm modules loaded (lsmod | grep kvm)",
            Verdict::Pass,
            loaded.join(", "),
        )
    });
    out.push(if host.pvm {
        check(
            "PVM nested virtualization",
            Verdict::Warn,
            "kvm_pvm is loaded: /dev/kvm interprets guest kernel code, Linux guests do not boot on it; ferrovirt defaults to the qemu driver with TCG",
        )
    } else {
        check("PVM nested virtualization", Verdict::Pass, "not in use")
    });
    out.push(
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            Ok(_) => check("/dev/net/tun", Verdict::Pass, "accessible"),
            Err(e) => check(
                "/dev/net/tun",
                Verdict::Warn,
                format!("{e}: VM networking needs TAP devices (modprobe tun)"),
            ),
        },
    );
    out.push(match in_path("qemu-system-x86_64") {
        Some(p) => check("qemu-system-x86_64 present", Verdict::Pass, p),
        None => check(
            "qemu-system-x86_64 present",
            Verdict::Warn,
            "not found: the qemu driver needs it (apt-get install qemu-system-x86)",
        ),
    });
    out.push(if module_available("bridge", "net/bridge/bridge.ko") {
        check(
            "bridge support",
            Verdict::Pass,
            if module_loaded("bridge") {
                "bridge module loaded"
            } else {
                "bridge module available"
            },
        )
    } else {
        check(
            "bridge support",
            Verdict::Warn,
            "no bridge module: bridged networking will not work",
        )
    });
    // nf_tables may be built into the kernel (no module, nothing in /sys/module): then
    // asking nft for the ruleset is the only reliable check.
    let nft_kernel = module_available("nf_tables", "net/netfilter/nf_tables.ko")
        || std::process::Command::new("nft")
            .args(["list", "tables"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    out.push(match (in_path("nft"), nft_kernel) {
        (Some(_), true) => check(
            "nftables support",
            Verdict::Pass,
            "nft command and nf_tables module",
        ),
        (None, true) => check(
            "nftables support",
            Verdict::Warn,
            "the nft command is missing: apt-get install nftables (needed for NAT networks)",
        ),
        (_, false) => check(
            "nftables support",
            Verdict::Warn,
            "no nf_tables kernel module: NAT networks will not work",
        ),
    });
    out
}

pub fn print(checks: &[Check]) {
    for c in checks {
        let verdict = match c.result {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        let label = format!("FERROVIRT: Checking {}", c.check);
        println!("{label:<66}: {verdict} ({})", c.hint);
    }
}

/// Network objects of ferrovirt's that no network of the daemon owns (an orphan bridge keeps the
/// `default` network from starting). Without an answer from the daemon nothing is owned.
pub fn leftovers(known: crate::leftovers::Known, daemon: &str) -> Check {
    let found = crate::leftovers::find(known);
    let name = "ferrovirt network leftovers";
    if found.is_empty() {
        return check(name, Verdict::Pass, "none");
    }
    let owner = match known {
        Ok(_) => format!("the daemon at {daemon} does not own them"),
        Err(e) => format!("no daemon answered at {daemon} ({e}); if no other ferrovirtd runs here, they are leftovers"),
    };
    let what: Vec<&str> = found.iter().map(|l| l.what.as_str()).collect();
    let how: Vec<&str> = found.iter().map(|l| l.remove.as_str()).collect();
    check(
        name,
        Verdict::Warn,
        format!(
            "{}; {owner}; remove with: {}",
            what.join(", "),
            how.join("; ")
        ),
    )
}
