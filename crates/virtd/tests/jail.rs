//! Each ferrovmm the kvm driver starts runs in its jail: seen from the outside through /proc (its
//! uid and capabilities, its root's contents), it has its own unprivileged uid, no capabilities,
//! seccomp on, and a root holding only its kernel, its disk, its run folder and /dev/kvm; another
//! VM's disk, the daemon's state and /proc are not there. Its writable disk is lent to its uid
//! while it runs and handed back after; a second VM cannot take a disk in use (image locks).
//! Tiny guests on this host's /dev/kvm, the real daemon and the real ferrovmm.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{wait_for, Daemon};
use ferrovirt_api::client::DefFormat;
use ferrovirt_api::{DomainOp, DomainState};
use ferrovirt_testkit::image::pvh_kernel;

/// Enables the ACPI power-button event and polls for it; then ACPI S5 (see kvm_exit.rs).
const WAIT_THEN_POWEROFF: [u8; 36] = [
    0x66, 0xba, 0x02, 0x06, 0x66, 0xb8, 0x00, 0x01, 0x66, 0xef, // PM1_EN |= PWRBTN
    0x66, 0xba, 0x00, 0x06, 0x66, 0xed, 0x66, 0xa9, 0x00, 0x01, 0x74, 0xf4, // poll PM1_STS
    0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, // S5
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt
];

fn define(d: &Daemon, name: &str, kernel: &Path, disk: &Path) {
    let def = format!(
        "name = \"{name}\"\ntype = \"kvm\"\nemulator = \"ferrovmm\"\nmemory_mib = 16\n[os]\nkernel = \"{}\"\n[[disk]]\npath = \"{}\"\nformat = \"raw\"\n",
        kernel.display(),
        disk.display()
    );
    d.client()
        .define(&def, DefFormat::Toml, false)
        .unwrap_or_else(|e| panic!("define {name}: {e:?}"));
}

/// `Key:` of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Every path under `root`, relative to it ("/a/b").
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            out.push(format!("/{}", p.strip_prefix(root).unwrap().display()));
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_kvm_vm_runs_confined_to_its_own_files_as_its_own_user() {
    let d = Daemon::start();
    let kernel = pvh_kernel(&d.dir, "wait.elf", &WAIT_THEN_POWEROFF);
    let disk_a = d.dir.join("a.img");
    let disk_b = d.dir.join("b.img");
    for disk in [&disk_a, &disk_b] {
        std::fs::write(disk, vec![0u8; 1 << 20]).unwrap();
    }
    define(&d, "a", &kernel, &disk_a);
    define(&d, "b", &kernel, &disk_b);
    define(&d, "thief", &kernel, &disk_a);
    let c = d.client();
    c.action("a", DomainOp::Start)
        .unwrap_or_else(|e| panic!("start a: {e:?}\n{}", d.log()));
    let pid = c.get("a").unwrap().pid.expect("a pid");

    // Its own unprivileged user, no capabilities, no way back, seccomp on.
    let uid = status_field(pid, "Uid:");
    let ids: Vec<u32> = uid.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert!(
        ids.iter().all(|&u| u == ids[0] && u >= 0x3000_0000),
        "Uid: {uid}"
    );
    let gids: Vec<u32> = status_field(pid, "Gid:")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(gids.iter().all(|&g| g == ids[0]), "Gid: {gids:?}");
    assert_eq!(status_field(pid, "Groups:"), "");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2");

    // Its root: its kernel, its disk, its run folder, /dev/kvm and their parent folders.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let seen = listing(&root);
    let vm_dir = d.run_dir().join("vms").join("a");
    let mut allowed: Vec<PathBuf> = vec![
        kernel.clone(),
        disk_a.clone(),
        vm_dir.clone(),
        PathBuf::from("/dev/kvm"),
    ];
    for p in allowed.clone() {
        allowed.extend(p.ancestors().skip(1).map(Path::to_path_buf));
    }
    for p in &seen {
        let path = Path::new(p);
        assert!(
            allowed.iter().any(|a| a == path) || path.starts_with(&vm_dir),
            "{p} is in the jail: {seen:?}"
        );
    }
    for absent in [
        disk_b.clone(),
        d.state_dir(),
        d.socket(),
        PathBuf::from("/proc/1"),
        PathBuf::from("/etc/shadow"),
        PathBuf::from("/sys/class/net"),
    ] {
        assert!(
            !root.join(absent.strip_prefix("/").unwrap()).exists(),
            "{} is reachable from the jail",
            absent.display()
        );
    }
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.mode() & 0o777), (ids[0], 0o600));
    // What it created is its own; the disk is lent to it while it runs.
    let api = std::fs::metadata(vm_dir.join("api.sock")).unwrap();
    assert_eq!(api.uid(), ids[0]);
    assert_eq!(std::fs::metadata(&disk_a).unwrap().uid(), ids[0]);
    assert_eq!(std::fs::metadata(&disk_b).unwrap().uid(), 0);

    // Another VM naming the same disk is refused while the disk is in use.
    let err = c
        .action("thief", DomainOp::Start)
        .expect_err("a second VM on a disk in use must not start");
    assert!(format!("{err:?}").contains("image is in use"), "{err:?}");
    assert_eq!(c.get("thief").unwrap().state, DomainState::Shutoff);
    assert_eq!(
        std::fs::metadata(&disk_a).unwrap().uid(),
        ids[0],
        "the refused VM took nothing"
    );

    // It ends normally; the disk is given back to its owner.
    c.action("a", DomainOp::Shutdown).expect("shutdown");
    wait_for("a to power off", Duration::from_secs(20), || {
        c.get("a").is_ok_and(|i| i.state == DomainState::Shutoff)
    });
    wait_for("the disk to be given back", Duration::from_secs(10), || {
        std::fs::metadata(&disk_a).unwrap().uid() == 0
    });
    let exit = std::fs::read_to_string(vm_dir.join("exit.json")).unwrap();
    assert!(exit.contains("\"poweroff\""), "{exit}");
}

#[test]
fn a_jailed_vm_gets_its_tap_as_a_descriptor_and_has_no_network_of_its_own() {
    let d = Daemon::start_in_own_netns();
    let daemon_pid = d.child.as_ref().unwrap().id();
    // A bridge in the daemon's namespace for the VM's interface.
    let ns = format!("/proc/{daemon_pid}/ns/net");
    let made = std::process::Command::new("nsenter")
        .args([
            &format!("--net={ns}"),
            "ip",
            "link",
            "add",
            "fvjbr0",
            "type",
            "bridge",
        ])
        .status()
        .unwrap();
    assert!(made.success());
    let kernel = pvh_kernel(&d.dir, "wait.elf", &WAIT_THEN_POWEROFF);
    let def = format!(
        "name = \"n\"\ntype = \"kvm\"\nemulator = \"ferrovmm\"\nmemory_mib = 16\n[os]\nkernel = \"{}\"\n[[interface]]\ntype = \"bridge\"\nsource = \"fvjbr0\"\n",
        kernel.display()
    );
    let c = d.client();
    c.define(&def, DefFormat::Toml, false).expect("define");
    c.action("n", DomainOp::Start)
        .unwrap_or_else(|e| panic!("start: {e:?}\n{}", d.log()));
    let pid = c.get("n").unwrap().pid.expect("a pid");
    // Its TAP is an open /dev/net/tun descriptor; the device itself is not in its root.
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(
        fds.iter().any(|t| t == Path::new("/dev/net/tun")),
        "{fds:?}"
    );
    assert!(!Path::new(&format!("/proc/{pid}/root/dev/net")).exists());
    // Its network namespace is neither the daemon's nor the host's.
    let vm_ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(vm_ns, std::fs::read_link(&ns).unwrap());
    assert_ne!(vm_ns, std::fs::read_link("/proc/self/ns/net").unwrap());
    c.action("n", DomainOp::Shutdown).expect("shutdown");
    wait_for("n to power off", Duration::from_secs(20), || {
        c.get("n").is_ok_and(|i| i.state == DomainState::Shutoff)
    });
}
