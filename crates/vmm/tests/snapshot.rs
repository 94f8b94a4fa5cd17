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
/// skipped. Known defect on this PVM host (see README): at a restore boundary the
/// guest's last serial byte before the pause is occasionally written again, which
/// garbles that one line; such a line stands for exactly one count. Returns how many
/// lines were garbled so callers can bound them.
fn assert_unbroken_count(out: &str) -> usize {
    let mut garbled = 0;
    for (expected, line) in (1u32..).zip(out.lines().filter(|l| l.contains("c "))) {
        match line
            .strip_prefix("c ")
            .filter(|h| h.len() == 8)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
        {
            Some(v) => assert_eq!(
                v,
                expected,
                "count broken after {} ({line:?})",
                expected - 1
            ),
            None => garbled += 1,
        }
    }
    garbled
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
    assert!(assert_unbroken_count(&format!("{before}{}", restored.output())) <= 1);
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
    let mut log = Vec::new();
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
        let c = counts(&run.stdout);
        log.push(format!(
            "cycle {cycle}: {:?}..{:?} ({} bytes; first {:?}, last {:?})",
            c.first(),
            c.last(),
            run.stdout.len(),
            &run.stdout[..run.stdout.len().min(12)],
            &run.stdout[run.stdout.len().saturating_sub(12)..]
        ));
        all.push_str(&run.stdout);
    }
    let seen = counts(&all);
    assert!(seen.len() > 100, "{} lines", seen.len());
    let garbled = assert_unbroken_count(&all);
    assert!(
        garbled <= 5,
        "{garbled} garbled lines in 100 restores:\n{}",
        log.join("\n")
    );
}
