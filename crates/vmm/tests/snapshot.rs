//! Snapshot and restore of tiny guests on /dev/kvm: the guest's counter goes on
//! from where it was, in a new process, and broken snapshots are refused cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::asm::Guest;
use common::live::{http, LiveVm};
use common::pvh_kernel;
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};
use iced_x86::code_asm::*;

/// Where the guest keeps its counter (in RAM, so RAM must come back too).
const COUNTER: u64 = 0x20_0000;

/// Counts forever: increments a counter in RAM and prints it as "c XXXXXXXX\n".
/// Registers matter mid-line (the print loop), so vCPU state must come back too.
fn counting_guest() -> Guest {
    let mut g = Guest::new(32);
    g.a.mov(dword_ptr(COUNTER), 0).unwrap();
    let mut top = g.label();
    let mut spin = g.label();
    g.set(&mut top);
    g.a.inc(dword_ptr(COUNTER)).unwrap();
    g.print("c ");
    g.a.mov(eax, dword_ptr(COUNTER)).unwrap();
    g.print_hex32();
    g.print("\n");
    g.a.mov(ecx, 300).unwrap();
    g.set(&mut spin);
    g.a.dec(ecx).unwrap();
    g.a.jnz(spin).unwrap();
    g.a.jmp(top).unwrap();
    g
}

/// The counter values in `out`, in order, and the trailing partial line if any.
fn counts(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("c "))
        .filter(|h| h.len() == 8)
        .filter_map(|h| u32::from_str_radix(h, 16).ok())
        .collect()
}

/// A bodiless PUT that must succeed; on failure, says what the VM printed.
fn put(vm: &LiveVm, path: &str) {
    let (status, body) = vm.api("PUT", path);
    assert_eq!(
        status,
        204,
        "PUT {path}: {body}; stderr: {}",
        vm.stderr.lock().unwrap()
    );
}

/// Checks that the "c XXXXXXXX" lines of `out` count 1, 2, 3, ... with nothing
/// skipped, repeated or garbled (a byte printed twice at a restore boundary garbles a line).
fn assert_unbroken_count(out: &str) {
    // The last line may still be being printed: only whole lines count.
    let whole = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    for (expected, line) in (1u32..).zip(whole.lines().filter(|l| l.contains("c "))) {
        let value = line
            .strip_prefix("c ")
            .filter(|h| h.len() == 8)
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        assert_eq!(
            value,
            Some(expected),
            "count broken after {} ({line:?})",
            expected - 1
        );
    }
}

fn last_count(vm: &LiveVm) -> u32 {
    counts(&vm.output()).last().copied().unwrap_or(0)
}

fn put_json(api: &Path, path: &str, body: &str) -> (u16, String) {
    http(
        api,
        &format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn snapshot(api: &Path, dir: &Path) -> (u16, String) {
    put_json(
        api,
        "/vm/snapshot",
        &format!("{{\"path\": \"{}\"}}", dir.display()),
    )
}

/// Starts `ferrovmm --restore DIR` with its API on `api`.
fn restore(snap: &Path, api: &Path, extra: &[&str]) -> LiveVm {
    let child = Command::new(common::ferrovmm_bin())
        .args(["--restore", snap.to_str().unwrap()])
        .args(["--api-socket", api.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrovmm --restore");
    LiveVm::attach(child, api)
}

/// Runs the guest until it has counted a little, pauses it and snapshots it to `snap`.
fn counting_vm_snapshot(dir: &Path, snap: &Path) -> (LiveVm, PathBuf) {
    let kernel = pvh_kernel(dir, "count.elf", counting_guest(), vec![]);
    let api = dir.join("src.sock");
    let vm = LiveVm::start(&kernel, &api, &[]);
    vm.wait_for(|| last_count(&vm) >= 5, "the guest to count to 5");
    put(&vm, "/vm/pause");
    let (status, body) = snapshot(&api, snap);
    assert_eq!(status, 200, "{body}");
    (vm, api)
}

#[test]
fn a_restored_guest_counts_on_from_where_it_was_paused() {
    let dir = common::tempdir();
    let snap = dir.path().join("snap");
    let (vm, api) = counting_vm_snapshot(dir.path(), &snap);
    let reply: serde_json::Value = serde_json::from_str(&snapshot(&api, &snap).1).unwrap();
    assert!(reply["bytes_written"].as_u64().unwrap() > 0, "{reply}");
    assert_eq!(reply["memory_bytes"], 32 << 20);
    assert!(reply["ms"].as_f64().is_some(), "{reply}");
    // Mostly untouched RAM is not stored.
    let mem = std::fs::metadata(snap.join("memory")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(mem.blocks() * 512 < 4 << 20, "memory file is not sparse");
    assert_eq!(mem.mode() & 0o777, 0o600);

    put(&vm, "/vm/stop");
    let run = vm.finish();
    assert_eq!(run.status, 0);
    let before = run.stdout;

    let api2 = dir.path().join("dst.sock");
    let restored = restore(&snap, &api2, &[]);
    // Paused until asked.
    let (_, info) = restored.api("GET", "/vm");
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    put(&restored, "/vm/resume");
    let target = counts(&before).last().unwrap() + 20;
    restored.wait_for(
        || counts(&format!("{before}{}", restored.output())).last() >= Some(&target),
        "the restored guest to count on",
    );
    // The old output and the new one form one unbroken count from 1.
    assert_unbroken_count(&format!("{before}{}", restored.output()));
    put(&restored, "/vm/stop");
    let run = restored.finish();
    assert_eq!(run.status, 0, "{}", run.stderr);
}

#[test]
fn a_running_vm_is_not_snapshotted() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let api = dir.path().join("api.sock");
    let vm = LiveVm::start(&kernel, &api, &[]);
    let (status, body) = snapshot(&api, &dir.path().join("snap"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("pause it first"), "{body}");
    assert!(!dir.path().join("snap").join("state").exists());
    let (status, body) = put_json(&api, "/vm/snapshot", "{\"dir\": 1}");
    assert_eq!(status, 400, "{body}");
    put(&vm, "/vm/stop");
}

/// Runs `ferrovmm --restore` on a broken snapshot: it must fail with one line and status 2.
fn refused(snap: &Path) -> String {
    let out = Command::new(common::ferrovmm_bin())
        .args(["--restore", snap.to_str().unwrap(), "--serial", "none"])
        .stdin(Stdio::null())
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one clear error: {stderr}"
    );
    stderr
}

#[test]
fn corrupted_truncated_and_foreign_snapshots_are_refused() {
    let dir = common::tempdir();
    let snap = dir.path().join("snap");
    let (vm, _) = counting_vm_snapshot(dir.path(), &snap);
    put(&vm, "/vm/stop");
    let state = std::fs::read(snap.join("state")).unwrap();
    let memory = std::fs::metadata(snap.join("memory")).unwrap().len();
    let bad = dir.path().join("bad");
    let setup = |state: &[u8], memory_len: u64| {
        let _ = std::fs::remove_dir_all(&bad);
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("state"), state).unwrap();
        std::fs::copy(snap.join("memory"), bad.join("memory")).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(bad.join("memory"))
            .unwrap();
        f.set_len(memory_len).unwrap();
    };

    let mut flipped = state.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    setup(&flipped, memory);
    assert!(refused(&bad).contains("checksum"));

    setup(&state[..state.len() - 100], memory);
    assert!(refused(&bad).contains("truncated"));

    let mut foreign = state.clone();
    foreign[8] = 99;
    setup(&foreign, memory);
    assert!(refused(&bad).contains("format version 99"));

    setup(b"not a snapshot at all, just some text", memory);
    assert!(refused(&bad).contains("not a ferrovmm snapshot"));

    setup(&state, memory - 4096);
    assert!(refused(&bad).contains("truncated"));

    // And the untouched snapshot still restores.
    let api = dir.path().join("ok.sock");
    let ok = restore(&snap, &api, &["--serial", "none"]);
    put(&ok, "/vm/stop");
    assert_eq!(ok.finish().status, 0);
}

#[test]
fn a_hundred_save_restore_cycles_in_a_row_keep_the_count() {
    let dir = common::tempdir();
    let snap = dir.path().join("snap");
    let (vm, _) = counting_vm_snapshot(dir.path(), &snap);
    put(&vm, "/vm/stop");
    let run = vm.finish();
    assert_eq!(run.status, 0);
    let mut all = run.stdout;
    let api = dir.path().join("cycle.sock");
    for cycle in 0..100 {
        // Each generation restores the previous one's snapshot, counts at least one
        // more line, and snapshots itself over the directory it was restored from.
        let vm = restore(&snap, &api, &["--resume"]);
        let start = counts(&all).last().copied().unwrap_or(0);
        vm.wait_for(
            || counts(&format!("{all}{}", vm.output())).last() > Some(&start),
            "the guest to count on",
        );
        put(&vm, "/vm/pause");
        let (status, body) = snapshot(&api, &snap);
        assert_eq!(status, 200, "cycle {cycle}: {body}");
        put(&vm, "/vm/stop");
        let run = vm.finish();
        assert_eq!(run.status, 0, "cycle {cycle}: {}", run.stderr);
        all.push_str(&run.stdout);
    }
    let seen = counts(&all);
    assert!(seen.len() > 100, "{} lines", seen.len());
    assert_unbroken_count(&all);
}

/// Threads of process `pid` with this name (from /proc/PID/task/*/comm).
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

/// A paused VM that is stopped runs no more guest code, however long its process takes to
/// exit. (A parked vCPU used to leave its pause because of the stop and enter the guest once
/// more, printing one serial byte past the snapshot that the restored VM then printed again.)
#[test]
fn a_paused_vm_runs_no_guest_code_while_it_stops() {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let api = dir.path().join("api.sock");
    let serial = dir.path().join("serial.log");
    // stderr is a full pipe: the process cannot finish exiting (it prints why it stopped)
    // until the test reads it, so its vCPU threads meet the stop in a live process.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (mut read_end, mut write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: F_GETPIPE_SZ on a pipe we own.
    let capacity = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
    assert!(capacity > 0);
    std::io::Write::write_all(&mut write_end, &vec![b'.'; capacity as usize]).unwrap();
    let child = Command::new(common::ferrovmm_bin())
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32"])
        .args(["--api-socket", api.to_str().unwrap()])
        .args(["--serial", &format!("file={}", serial.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write_end))
        .spawn()
        .expect("start ferrovmm");
    let pid = child.id();
    let mut child = KillOnDrop(child);
    let printed = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until(
        || api.exists() && counts(&printed()).len() >= 3,
        "the guest to count",
    );
    assert_eq!(put_json(&api, "/vm/pause", "").0, 204);
    let at_pause = printed();
    assert_eq!(put_json(&api, "/vm/stop", "").0, 204);
    // The vCPU thread ends on the stop (it can, while the main thread is blocked on stderr).
    wait_until(
        || threads_named(pid, "vcpu0") == 0,
        "the vCPU thread to end",
    );
    assert_eq!(
        printed(),
        at_pause,
        "the guest printed after it was paused and stopped"
    );
    let mut rest = Vec::new();
    read_end.read_to_end(&mut rest).unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", String::from_utf8_lossy(&rest));
}

/// Kills the child if the test fails before waiting for it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The first resume of a restored VM announces each NIC's MAC on its TAP (broadcast
/// RARP from the guest's MAC, as QEMU does), so a bridge learns the guest's new port.
#[test]
fn a_restored_vm_announces_its_mac_on_its_tap_when_resumed() {
    use common::netns::{in_new_netns, ip, open_tap, PacketSocket};
    in_new_netns(|| {
        let dir = common::tempdir();
        let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
        let api = dir.path().join("src.sock");
        // Passed as a descriptor, as ferrovirtd does (inherited by both processes).
        let tap = open_tap("fvann0");
        ip("link set fvann0 up");
        let net = format!("fd={tap},mac=52:54:00:12:34:56");
        let vm = LiveVm::start(&kernel, &api, &["--net", &net]);
        vm.wait_for(|| last_count(&vm) >= 3, "the guest to count to 3");
        put(&vm, "/vm/pause");
        let snap = dir.path().join("snap");
        let (status, body) = snapshot(&api, &snap);
        assert_eq!(status, 200, "{body}");
        put(&vm, "/vm/stop");
        assert_eq!(vm.finish().status, 0);

        let api2 = dir.path().join("dst.sock");
        let restored = restore(&snap, &api2, &["--net", &format!("0=fd={tap}")]);
        let rarp = PacketSocket::bind("fvann0", 0x8035, std::time::Duration::from_secs(20));
        put(&restored, "/vm/resume");
        let frame = rarp
            .recv()
            .expect("no RARP frame on the TAP within 20 s of the resume");
        assert_eq!(&frame[0..6], &[0xff; 6], "{frame:02x?}");
        assert_eq!(
            &frame[6..12],
            &[0x52, 0x54, 0, 0x12, 0x34, 0x56],
            "{frame:02x?}"
        );
        assert_eq!(
            &frame[20..22],
            &[0, 3],
            "not a reverse request: {frame:02x?}"
        );
        put(&restored, "/vm/stop");
        assert_eq!(restored.finish().status, 0);
    });
}
