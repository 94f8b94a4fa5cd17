//! The control API on --api-socket: state, pause/resume while the guest counts,
//! the ACPI power button, stop, counters, and malformed requests.

mod common;

use std::time::Duration;

use common::asm::Guest;
use common::live::LiveVm;
use common::pvh_kernel;
use iced_x86::code_asm::*;

/// Prints a dot, spins a little, forever.
fn counting_guest() -> Guest {
    let mut g = Guest::new(32);
    g.print("counting\n");
    let mut top = g.label();
    let mut spin = g.label();
    g.set(&mut top);
    g.a.mov(ecx, 2000).unwrap();
    g.set(&mut spin);
    g.a.dec(ecx).unwrap();
    g.a.jnz(spin).unwrap();
    g.a.mov(dx, 0x3f8).unwrap();
    g.a.mov(al, b'.' as i32).unwrap();
    g.a.out(dx, al).unwrap();
    g.a.jmp(top).unwrap();
    g
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let api = dir.path().join("api.sock");
    let vm = LiveVm::start(&kernel, &api, &["--vcpus", "2"]);
    vm.wait_for_output("counting\n..........");

    let (status, body) = vm.api("GET", "/vm");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["config"]["name"], "live");
    assert_eq!(info["config"]["memory_mib"], 32);
    assert_eq!(info["config"]["vcpus"], 2);
    assert!(info["uptime_ms"].as_u64().is_some());

    assert_eq!(vm.api("PUT", "/vm/pause").0, 204);
    let (_, body) = vm.api("GET", "/vm");
    assert!(body.contains("\"state\":\"paused\""), "{body}");
    // The guest's port writes, counted by the VMM, not bytes still in the pipe to this test.
    let port_writes = |vm: &LiveVm| -> u64 {
        let (_, body) = vm.api("GET", "/vm/counters");
        let c: serde_json::Value = serde_json::from_str(&body).unwrap();
        c["exits"]["io_out"].as_u64().unwrap()
    };
    let frozen = port_writes(&vm);
    // An observation window for "nothing happens", not a wait for readiness.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        port_writes(&vm),
        frozen,
        "the guest kept writing to its serial port while paused"
    );
    let frozen = vm.output().len();

    assert_eq!(vm.api("PUT", "/vm/resume").0, 204);
    vm.wait_for(|| vm.output().len() > frozen + 10, "output after resume");
    let (_, body) = vm.api("GET", "/vm");
    assert!(body.contains("\"state\":\"running\""), "{body}");

    let (status, body) = vm.api("GET", "/vm/counters");
    assert_eq!(status, 200);
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(counters["exits"]["io_out"].as_u64().unwrap() > 10, "{body}");
    assert!(
        counters["exits"]["interrupted"].as_u64().unwrap() >= 1,
        "{body}"
    );

    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    let run = vm.finish();
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stderr.trim(), "vm stopped");
    assert!(!api.exists(), "the API socket is removed at exit");
}

#[test]
fn power_button_lets_the_guest_shut_down_cleanly() {
    // The guest enables the power-button event, polls PM1 status, acknowledges it and enters S5.
    let mut g = Guest::new(32);
    g.a.mov(dx, 0x602).unwrap();
    g.a.mov(ax, 0x100).unwrap();
    g.a.out(dx, ax).unwrap();
    g.print("armed\n");
    let mut poll = g.label();
    g.set(&mut poll);
    g.a.mov(dx, 0x600).unwrap();
    g.a.in_(ax, dx).unwrap();
    g.a.test(ax, 0x100).unwrap();
    g.a.jz(poll).unwrap();
    g.a.mov(ax, 0x100).unwrap();
    g.a.out(dx, ax).unwrap();
    g.print("power button pressed\n");
    g.poweroff();
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "button.elf", g, vec![]);
    let vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("armed\n");
    assert!(!vm.output().contains("pressed"));
    assert_eq!(vm.api("PUT", "/vm/power-button").0, 204);
    let run = vm.finish();
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stderr.trim(), "guest powered off");
    assert!(
        run.stdout.ends_with("power button pressed\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn bad_requests_get_json_errors_and_the_vm_keeps_running() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("counting\n");

    let (status, body) = vm.api("GET", "/nothing");
    assert_eq!(status, 404);
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "not_found");

    let (status, body) = vm.api("DELETE", "/vm");
    assert_eq!(status, 405);
    assert!(body.contains("method_not_allowed"), "{body}");
    assert_eq!(vm.api("GET", "/vm/pause").0, 405);

    // Not HTTP at all, and a truncated request: the server answers 4xx or closes, never dies.
    let (status, _) = vm.request("\x00\x01garbage\r\n\r\n");
    assert!(
        status == 0 || (400..500).contains(&status),
        "status {status}"
    );
    let (status, body) = vm.request("PUT /vm/pause HTTP/1.1\r\nContent-Length: 3\r\n\r\n{}\n");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unexpected_body"), "{body}");
    assert!(body.contains("running") || vm.api("GET", "/vm").1.contains("running"));

    let (status, body) = vm.api("GET", "/vm");
    assert_eq!(status, 200, "{body}");
    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    assert_eq!(vm.finish().status, 0);
}

#[test]
fn reset_ends_the_vm_as_a_guest_reset() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("counting\n");
    assert_eq!(vm.api("PUT", "/vm/reset").0, 204);
    let run = vm.finish();
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stderr.trim(), "guest reset");
}

#[test]
fn ps_shows_the_vm_as_ferrovmm_dash_dash_name() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let api = dir.path().join("api.sock");
    // --name given last: ferrovmm moves it to the front of its command line.
    let mut child = std::process::Command::new(common::ferrovmm_bin())
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32",
            "--serial",
            "none",
        ])
        .args(["--api-socket", api.to_str().unwrap(), "--name", "web-7"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !api.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "API socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    assert!(words[0].ends_with("ferrovmm"), "{words:?}");
    assert_eq!(
        &words[1..3],
        &["--name".to_string(), "web-7".to_string()],
        "{words:?}"
    );
    assert_eq!(
        common::live::http(&api, "PUT /vm/stop HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        204
    );
    assert!(child.wait().unwrap().success());
}

/// One raw exchange that tolerates the server closing early: sends `raw`, closes the sending
/// side, reads the answer (at most 64 KiB, for at most `wait`). Status 0: no answer.
fn exchange(socket: &std::path::Path, raw: &[u8], wait: Duration) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return (0, String::new());
    };
    let _ = s.set_write_timeout(Some(wait));
    let _ = s.set_read_timeout(Some(wait));
    let _ = s.write_all(raw);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let _ = s.take(64 << 10).read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The VM still runs its guest: GET /vm answers "running" and the guest keeps printing.
fn assert_still_running(vm: &mut LiveVm, context: &str) {
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "ferrovmm died ({context}); stderr: {}",
        vm.stderr.lock().unwrap()
    );
    let (status, body) = vm.api("GET", "/vm");
    assert_eq!(status, 200, "{context}: {body}");
    assert!(body.contains("\"state\":\"running\""), "{context}: {body}");
    let before = vm.output().len();
    vm.wait_for(
        || vm.output().len() > before + 5,
        "the guest to keep printing",
    );
}

#[test]
fn a_huge_content_length_gets_413_and_the_guest_keeps_running() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let mut vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("counting\n");
    let wait = Duration::from_secs(10);

    // Once aborted the process (an allocation of that size).
    let (status, body) = exchange(
        &vm.api,
        b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
        wait,
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    assert_still_running(&mut vm, "after a huge Content-Length");

    // Just over the cap, with the body actually sent.
    let mut req = b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 4097\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'x', 4097));
    assert_eq!(exchange(&vm.api, &req, wait).0, 413);

    // A chunked body is read through the cap: 413 once it passes 4096 bytes.
    let mut req = b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend(b"800\r\n");
        req.extend(std::iter::repeat_n(b'y', 0x800));
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    assert_eq!(exchange(&vm.api, &req, wait).0, 413);

    // A chunk size that overflows, and one that is not a number.
    for size in ["fffffffffffffff0", "ffffffffffffffffffff", "zz", "-1"] {
        let req = format!(
            "PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n{size}\r\nabc\r\n"
        );
        let (status, body) = exchange(&vm.api, req.as_bytes(), wait);
        assert!(
            status == 0 || status == 400 || status == 413,
            "chunk size {size}: {status} {body}"
        );
    }

    // Headers: too long a line, too many of them.
    let long = format!(
        "GET /vm HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let (status, _) = exchange(&vm.api, long.as_bytes(), wait);
    assert!(status == 431 || status == 0, "long header: {status}");
    let many = format!("GET /vm HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(200));
    assert_eq!(
        exchange(&vm.api, many.as_bytes(), wait).0,
        431,
        "many headers"
    );
    assert_still_running(&mut vm, "after hostile requests");

    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    assert_eq!(vm.finish().status, 0);
}

#[test]
fn connections_beyond_the_limit_get_503_until_some_close() {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let mut vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("counting\n");
    // Idle connections that never send a byte hold every slot.
    let idle: Vec<_> = (0..ferrovmm::api::MAX_CONNECTIONS)
        .map(|_| std::os::unix::net::UnixStream::connect(&vm.api).unwrap())
        .collect();
    // Connections are taken in order, so once one more is refused all slots are held.
    let mut refused = (0, String::new());
    vm.wait_for(
        || {
            refused = exchange(
                &vm.api,
                b"GET /vm HTTP/1.1\r\n\r\n",
                Duration::from_secs(10),
            );
            refused.0 == 503
        },
        "a 503 with every slot held",
    );
    assert!(refused.1.contains("\"busy\""), "{}", refused.1);
    drop(idle);
    let mut answer = (0, String::new());
    vm.wait_for(
        || {
            answer = vm.api("GET", "/vm");
            answer.0 == 200
        },
        "the API to answer again once the idle connections closed",
    );
    assert_still_running(&mut vm, "after a connection flood");
    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    assert_eq!(vm.finish().status, 0);
}

/// xorshift64*: a small seeded generator, so a failing run can be replayed exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A malformed variant of a valid request: flipped, inserted, deleted and duplicated bytes,
/// hostile numbers, long and many headers, broken line endings, truncation.
fn malformed_request(rng: &mut Rng) -> Vec<u8> {
    const BASES: &[&str] = &[
        "GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /vm/counters HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n",
        "PUT /vm/resume HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        "PUT /vm/resume HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        "GET /vm?x=1 HTTP/1.0\r\n\r\nGET /vm HTTP/1.1\r\n\r\n",
    ];
    const NUMBERS: &[&str] = &[
        "99999999999",
        "18446744073709551616",
        "-1",
        "0x10",
        "fffffffffffffff0",
        "1e9",
        "",
        " 7 ",
    ];
    let mut req = rng.pick(BASES).as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(req.len() + 1);
        match rng.below(9) {
            0 => {
                if at < req.len() {
                    req[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let n = rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                req.splice(at..at, junk);
            }
            2 => {
                let end = (at + rng.below(12)).min(req.len());
                req.drain(at..end);
            }
            3 => req.truncate(at),
            4 => {
                let n = rng.pick(NUMBERS).to_string();
                let header = format!("Content-Length: {n}\r\n");
                let pos = req
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map_or(0, |p| p + 2);
                req.splice(pos..pos, header.into_bytes());
            }
            5 => {
                let len = rng.below(20_000);
                let header = format!("X-Big: {}\r\n", "h".repeat(len));
                let pos = req
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map_or(0, |p| p + 2);
                req.splice(pos..pos, header.into_bytes());
            }
            6 => {
                let lines = "X-Dup: 1\r\n".repeat(rng.below(300));
                let pos = req
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map_or(0, |p| p + 2);
                req.splice(pos..pos, lines.into_bytes());
            }
            7 => {
                let text = String::from_utf8_lossy(&req)
                    .replace("\r\n", rng.pick::<&str>(&["\n", "\r", "\r\r\n", "\0"]));
                req = text.into_bytes();
            }
            _ => {
                let n = rng.pick(NUMBERS).to_string();
                let text =
                    String::from_utf8_lossy(&req).replacen(|c: char| c.is_ascii_digit(), &n, 1);
                req = text.into_bytes();
            }
        }
    }
    req
}

#[test]
fn randomized_malformed_requests_never_take_the_vm_down() {
    let seed = ferrovirt_testkit::seed_from_env("FERROVMM_API_FUZZ_SEED");
    let count = ferrovirt_testkit::count_from_env("FERROVMM_API_FUZZ_COUNT", 300);
    println!("API fuzz: seed {seed} ({count} requests); replay with FERROVMM_API_FUZZ_SEED={seed}");
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let mut vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("counting\n");
    let mut rng = Rng(seed);
    let mut answered = 0;
    for i in 0..count {
        let req = malformed_request(&mut rng);
        let (status, _) = exchange(&vm.api, &req, Duration::from_secs(2));
        if status != 0 {
            answered += 1;
        }
        assert!(
            vm.child.try_wait().unwrap().is_none(),
            "seed {seed}, request {i} killed ferrovmm: {:?}\nstderr: {}",
            String::from_utf8_lossy(&req[..req.len().min(300)]),
            vm.stderr.lock().unwrap()
        );
    }
    println!("API fuzz: {answered} of {count} requests got an HTTP answer");
    // A surviving PUT /vm/pause may have paused the guest.
    assert_eq!(vm.api("PUT", "/vm/resume").0, 204, "seed {seed}");
    assert_still_running(&mut vm, &format!("seed {seed}"));
    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    assert_eq!(vm.finish().status, 0);
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "count.elf", counting_guest(), vec![]);
    let mut vm = LiveVm::start(&kernel, &dir.path().join("api.sock"), &[]);
    vm.wait_for_output("counting\n");
    let mut slow = std::os::unix::net::UnixStream::connect(&vm.api).unwrap();
    slow.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Wait well past the server's header deadline (5 s): the server must end the connection
    // (EOF or an error status), not our read timeout.
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    let ended = slow.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    match ended {
        Ok(_) => assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        ),
        Err(e) => assert!(
            e.kind() == std::io::ErrorKind::ConnectionReset,
            "the server never closed the slow connection: {e}"
        ),
    }
    assert_still_running(&mut vm, "after a slow sender");
    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    assert_eq!(vm.finish().status, 0);
}
