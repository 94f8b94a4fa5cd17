//! Live migration of tiny guests between two ferrovmm processes, over a Unix socket
//! and over TCP on loopback, while the guest keeps writing RAM.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::asm::Guest;
use common::live::{http, LiveVm};
use common::pvh_kernel;
use iced_x86::code_asm::*;

const COUNTER: u64 = 0x20_0000;
/// 4 MiB the guest rewrites on every count, so every pre-copy round has work.
const SCRATCH: u64 = 0x40_0000;
const SCRATCH_PAGES: i32 = 1024;

fn busy_counting_guest() -> Guest {
    let mut g = Guest::new(32);
    g.a.mov(dword_ptr(COUNTER), 0).unwrap();
    let mut top = g.label();
    let mut touch = g.label();
    g.set(&mut top);
    g.a.inc(dword_ptr(COUNTER)).unwrap();
    g.print("c ");
    g.a.mov(eax, dword_ptr(COUNTER)).unwrap();
    g.print_hex32();
    g.print("\n");
    // Write the counter into each scratch page.
    g.a.mov(ebx, SCRATCH as i32).unwrap();
    g.a.mov(ecx, SCRATCH_PAGES).unwrap();
    g.a.mov(eax, dword_ptr(COUNTER)).unwrap();
    g.set(&mut touch);
    g.a.mov(dword_ptr(ebx), eax).unwrap();
    g.a.add(ebx, 4096).unwrap();
    g.a.dec(ecx).unwrap();
    g.a.jnz(touch).unwrap();
    g.a.jmp(top).unwrap();
    g
}

/// Checks that the lines count 1, 2, 3... with nothing skipped, repeated or garbled (a
/// byte printed by both processes at the hand-over would garble a line); returns the last.
fn assert_unbroken_count(out: &str) -> u32 {
    let mut last = 0;
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
        last = expected;
    }
    last
}

fn count(out: &str) -> u32 {
    out.lines()
        .filter_map(|l| l.strip_prefix("c "))
        .filter(|h| h.len() == 8)
        .filter_map(|h| u32::from_str_radix(h, 16).ok())
        .next_back()
        .unwrap_or(0)
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

fn get(api: &Path, path: &str) -> (u16, String) {
    http(
        api,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Migrates a busy counting guest to `--incoming incoming`, once `ready` says the
/// destination listens.
fn migrate_and_check(dir: &Path, incoming: &str, ready: impl Fn() -> bool, downtime_ms: u64) {
    let kernel = pvh_kernel(dir, "busy.elf", busy_counting_guest(), vec![]);
    let src_api = dir.join("src.sock");
    let exit_file = dir.join("src-exit.json");
    let src = LiveVm::start(
        &kernel,
        &src_api,
        &["--exit-file", exit_file.to_str().unwrap()],
    );
    src.wait_for(|| count(&src.output()) >= 5, "the guest to count to 5");

    let dst_api = dir.join("dst.sock");
    let dst_child = Command::new(common::ferrovmm_bin())
        .args(["--incoming", incoming, "--name", "moved"])
        .args(["--api-socket", dst_api.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the destination to listen", &ready);

    let (status, body) = put_json(
        &src_api,
        "/vm/migrate",
        &format!(
            "{{\"destination\": \"{incoming}\", \"downtime_ms\": {downtime_ms}, \"timeout_s\": 30}}"
        ),
    );
    assert_eq!(status, 202, "{body}");
    // Follow the progress while the source lives.
    let mut rounds = 0;
    while src.api.exists() {
        let (status, body) = get(&src_api, "/vm/migration");
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            rounds = rounds.max(v["round"].as_u64().unwrap_or(0));
            assert_ne!(v["state"], "failed", "{body}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let src_run = src.finish();
    assert_eq!(src_run.status, 0, "{}", src_run.stderr);
    assert_eq!(src_run.stderr.trim(), "guest migrated");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&exit_file).unwrap()).unwrap();
    assert_eq!(record["reason"], "migrated");
    assert_eq!(record["status"], 0);
    if downtime_ms == 0 {
        // A limit nothing fits: pre-copy runs its rounds, then stops the guest anyway.
        assert!(rounds >= 2, "only {rounds} pre-copy rounds seen");
    }

    let dst = LiveVm::attach(dst_child, &dst_api);
    let (_, info) = get(&dst_api, "/vm");
    assert!(info.contains("\"running\""), "{info}");
    assert!(info.contains("\"moved\""), "{info}");
    let target = count(&src_run.stdout) + 20;
    dst.wait_for(
        || count(&dst.output()) >= target,
        "the guest to count on at the destination",
    );
    assert!(assert_unbroken_count(&format!("{}{}", src_run.stdout, dst.output())) >= target - 1);
    assert_eq!(dst.api("PUT", "/vm/stop").0, 204);
    assert_eq!(dst.finish().status, 0);
}

#[test]
fn a_guest_migrates_over_a_unix_socket_and_counts_on() {
    let dir = common::tempdir();
    let sock = dir.path().join("mig.sock");
    let incoming = format!("unix:{}", sock.display());
    migrate_and_check(dir.path(), &incoming, || sock.exists(), 0);
}

#[test]
fn a_guest_migrates_over_tcp_on_loopback_and_counts_on() {
    let dir = common::tempdir();
    // This developer's port range (24000-24999).
    let port = 24000 + (std::process::id() % 900) as u16;
    let incoming = format!("tcp:127.0.0.1:{port}");
    // Connecting to probe would make the probe the destination's one source, so look
    // for the listening socket in /proc instead.
    let listening = move || {
        std::fs::read_to_string("/proc/net/tcp")
            .map(|t| {
                t.lines().any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && cols[1].ends_with(&format!(":{port:04X}")) && cols[3] == "0A"
                })
            })
            .unwrap_or(false)
    };
    migrate_and_check(dir.path(), &incoming, listening, 300);
}

#[test]
fn a_destination_that_dies_halfway_leaves_the_guest_running_on_the_source() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "busy.elf", busy_counting_guest(), vec![]);
    let api = dir.path().join("src.sock");
    let src = LiveVm::start(&kernel, &api, &[]);
    src.wait_for(|| count(&src.output()) >= 5, "the guest to count to 5");
    // A "destination" that takes the greeting and some RAM, then dies.
    let sock = dir.path().join("dying.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let dying = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let _ = s.read_exact(&mut buf);
    });
    let (status, body) = put_json(
        &api,
        "/vm/migrate",
        &format!(
            "{{\"destination\": \"unix:{}\", \"timeout_s\": 20}}",
            sock.display()
        ),
    );
    assert_eq!(status, 202, "{body}");
    dying.join().unwrap();
    wait_until("the migration to fail", || {
        get(&api, "/vm/migration").1.contains("\"failed\"")
    });
    let (_, body) = get(&api, "/vm/migration");
    assert!(body.contains("error"), "{body}");
    let (_, info) = get(&api, "/vm");
    assert!(info.contains("\"running\""), "{info}");
    let before = count(&src.output());
    src.wait_for(
        || count(&src.output()) > before + 5,
        "the guest to keep counting on the source",
    );
    // A second attempt to an address nobody listens on fails the same way.
    let (status, _) = put_json(
        &api,
        "/vm/migrate",
        &format!(
            "{{\"destination\": \"unix:{}\"}}",
            dir.path().join("nobody").display()
        ),
    );
    assert_eq!(status, 202);
    wait_until("the second migration to fail", || {
        get(&api, "/vm/migration").1.contains("\"failed\"")
    });
    assert_eq!(src.api("PUT", "/vm/stop").0, 204);
    let run = src.finish();
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_unbroken_count(&run.stdout);
}
