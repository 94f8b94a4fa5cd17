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
    let (status, body) = vm.request("PUT /vm/pause HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n{");
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
