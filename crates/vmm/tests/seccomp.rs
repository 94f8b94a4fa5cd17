//! ferrovmm's per-thread seccomp filters: on by default, every thread of a running VM is filtered
//! (the kernel says so in /proc), a VM runs and ends normally under them, and a forbidden syscall
//! (the debug build's `FERROVMM_SECCOMP_PROBE` hook makes one thread try ptrace) stops the VM with
//! an exit record naming the call and the thread.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::asm::Guest;
use common::live::LiveVm;
use common::pvh_kernel;
use ferrovmm_api::{CrashCause, ExitReason, ExitRecord};

/// Each thread's name and its `Seccomp:` mode (0 off, 2 filtered) from /proc.
fn thread_seccomp(pid: u32) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.entry(field("Name:"))
            .or_default()
            .push(field("Seccomp:"));
    }
    out
}

fn idle_guest(dir: &Path) -> std::path::PathBuf {
    let mut g = Guest::new(32);
    g.print("up\n");
    g.halt_forever();
    pvh_kernel(dir, "idle.elf", g, vec![])
}

fn disk(dir: &Path) -> String {
    let p = dir.join("disk.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    format!("path={}", p.display())
}

#[test]
fn every_thread_of_a_running_vm_is_filtered_and_it_stops_normally() {
    let dir = common::tempdir();
    let kernel = idle_guest(dir.path());
    let exit = dir.path().join("exit.json");
    let disk = disk(dir.path());
    let vm = LiveVm::start(
        &kernel,
        &dir.path().join("api.sock"),
        &[
            "--vcpus",
            "2",
            "--rng",
            "--disk",
            &disk,
            "--exit-file",
            exit.to_str().unwrap(),
        ],
    );
    vm.wait_for_output("up\n");
    // A request on the API (and its worker thread) under the filter.
    assert_eq!(vm.api("GET", "/vm").0, 200);
    // Every thread filters itself as its first step; one just started may not have run yet.
    // (A disk's I/O threads start when the guest's driver does; the Linux tests cover them.)
    let names = ["ferrovmm", "vcpu0", "vcpu1", "api", "api-worker", "devices"];
    let all_filtered = |t: &BTreeMap<String, Vec<String>>| {
        names.iter().all(|n| t.contains_key(*n)) && t.values().flatten().all(|m| m == "2")
    };
    vm.wait_for(
        || all_filtered(&thread_seccomp(vm.child.id())),
        "every thread named and filtered",
    );
    // Snapshot needs the API thread's file calls and the vCPUs' state ioctls.
    assert_eq!(vm.api("PUT", "/vm/pause").0, 204);
    let snap = dir.path().join("snap");
    let body = format!("{{\"path\": \"{}\"}}", snap.display());
    let (code, text) = vm.request(&format!(
        "PUT /vm/snapshot HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert!(code < 300, "snapshot: {code} {text}");
    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    let run = vm.finish();
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(ExitRecord::read(&exit).unwrap().reason, ExitReason::Stopped);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("exit.json."))
        .collect();
    assert!(left.is_empty(), "the prepared record was left: {left:?}");
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let dir = common::tempdir();
    let kernel = idle_guest(dir.path());
    let vm = LiveVm::start(
        &kernel,
        &dir.path().join("api.sock"),
        &["--seccomp", "off", "--rng"],
    );
    vm.wait_for_output("up\n");
    let threads = thread_seccomp(vm.child.id());
    assert!(threads.values().flatten().all(|m| m == "0"), "{threads:?}");
}

/// Runs an idle VM whose thread of `kind` attempts a forbidden syscall; returns its record.
fn probe(kind: &str) -> (common::Run, ExitRecord) {
    let dir = common::tempdir();
    let kernel = idle_guest(dir.path());
    let exit = dir.path().join("exit.json");
    let api = dir.path().join("api.sock");
    let disk = disk(dir.path());
    let child = Command::new(common::ferrovmm_bin())
        .args(["--name", "probe", "--memory", "32", "--rng"])
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--disk", &disk])
        .args(["--api-socket", api.to_str().unwrap()])
        .args(["--exit-file", exit.to_str().unwrap()])
        .env("FERROVMM_SECCOMP_PROBE", kind)
        .env_remove("FERROVMM_SECCOMP")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = common::wait_with_timeout(child, std::time::Duration::from_secs(30));
    let rec = ExitRecord::read(&exit).unwrap_or_else(|e| panic!("{e}; stderr: {}", run.stderr));
    (run, rec)
}

#[test]
fn a_forbidden_syscall_stops_the_vm_with_a_record_naming_it() {
    for (kind, thread) in [
        ("device", "devices"),
        ("vcpu", "vcpu0"),
        ("api", "api"),
        ("main", "main"),
    ] {
        let (run, rec) = probe(kind);
        assert_eq!(run.status, 1, "{kind}: stderr: {}", run.stderr);
        assert_eq!(rec.status, 1);
        let ExitReason::Crash {
            cause,
            detail,
            seccomp: Some(v),
        } = &rec.reason
        else {
            panic!("{kind}: want a seccomp crash, got {rec:?}");
        };
        assert_eq!(*cause, CrashCause::Seccomp);
        assert_eq!((v.syscall, v.name.as_str()), (101, "ptrace"), "{rec:?}");
        assert!(v.thread.starts_with(thread), "{kind}: {rec:?}");
        assert!(detail.contains("ptrace"), "{detail}");
        assert!(
            run.stderr.contains("seccomp forbids syscall ptrace"),
            "stderr: {}",
            run.stderr
        );
    }
}
