//! save, restore and managed save with the qemu driver, end to end: a real TCG guest (the
//! busybox test guest) runs a counter process and writes a file; after a restore the same
//! process counts on and the file is there. Bad inputs are one clear error each, and the VM
//! is as it was.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    console_roundtrip, console_until, pid_alive, qemu_def, qmp_status, wait_booted, wait_for,
    Daemon, Tmpfs,
};
use ferrovirt_api::client::{Client, ClientError, DefFormat};
use ferrovirt_api::{DomainOp, DomainState, ErrorCode, StateReason};

/// Starts the counter process (its pid in the answer) and writes a marker file. Answers are
/// spelled with `""` inside so the terminal's echo of the command never looks like one.
const SETUP: &str = "echo saved-by-ferrovirt > /tmp/marker; \
    (i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done) & \
    echo counter\"\"-pid=$!=";

/// Defines and boots `name`, starts the guest's counter; returns the counter's pid.
fn boot_counting(d: &Daemon, name: &str) -> u32 {
    let c = d.client();
    c.define(&qemu_def(name, "", ""), DefFormat::Toml, false)
        .unwrap();
    c.action(name, DomainOp::Start).unwrap();
    wait_booted(d, name);
    let out = console_until(&c, name, SETUP, "the counter's pid", |o| {
        value(o, "counter-pid=").is_some()
    });
    let pid = value(&out, "counter-pid=").unwrap();
    assert!(count(&c, name) >= 1);
    pid
}

/// The number between `key` and the next '=' in `out` (the echoed command line has `$` there).
fn value(out: &str, key: &str) -> Option<u32> {
    out.match_indices(key).find_map(|(at, _)| {
        let rest = &out[at + key.len()..];
        rest.split('=').next()?.trim().parse().ok()
    })
}

/// The guest's counter, read on its console.
fn count(c: &Client, name: &str) -> u32 {
    let out = console_until(
        c,
        name,
        "echo co\"\"unt=$(cat /tmp/count)=",
        "a count",
        |o| value(o, "count=").is_some(),
    );
    value(&out, "count=").unwrap()
}

/// The counter grows past `at_least` in the same process, and the marker file is there.
fn still_counting(c: &Client, name: &str, pid: u32, at_least: u32) {
    let out = console_roundtrip(
        c,
        name,
        &format!("kill -0 {pid} && echo al\"\"ive={pid}=; echo marker-$(cat /tmp/marker)"),
        "marker-saved-by-ferrovirt",
    );
    assert!(
        out.contains(&format!("alive={pid}=")),
        "the counter process {pid} is gone: {out}"
    );
    let first = count(c, name);
    assert!(
        first >= at_least,
        "the count went back: {first} < {at_least}"
    );
    wait_for("the counter to count on", Duration::from_secs(60), || {
        count(c, name) > first
    });
}

fn api_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ferrovirt_api::ApiError {
    match r {
        Err(ClientError::Api(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_restored_guest_counts_on_in_the_same_process_with_its_files() {
    let d = Daemon::start();
    let c = d.client();
    let pid = boot_counting(&d, "saver");
    let before = count(&c, "saver");
    let qemu = c.get("saver").unwrap().pid.unwrap();

    let file = d.dir.join("saver.save");
    let info = c.save("saver", s(&file), None).unwrap();
    assert_eq!(
        (info.state, info.reason, info.pid),
        (DomainState::Shutoff, StateReason::Saved, None)
    );
    wait_for(
        "QEMU to exit after the save",
        Duration::from_secs(10),
        || !pid_alive(qemu),
    );
    // The payload is QEMU's migration stream, after our header.
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(b"FERROSAV"));
    assert_eq!(
        &bytes[4096..4100],
        b"QEVM",
        "QEMU's stream at the payload offset"
    );

    let info = c.restore(s(&file), None).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Restored)
    );
    assert_eq!(qmp_status(&d, "saver"), "running");
    still_counting(&c, "saver", pid, before);

    // managedsave; a later start resumes where it was.
    let at_save = count(&c, "saver");
    let info = c.managed_save("saver", None).unwrap();
    assert_eq!(
        (info.state, info.reason, info.managed_save),
        (DomainState::Shutoff, StateReason::Saved, true)
    );
    let info = c.action("saver", DomainOp::Start).unwrap();
    assert_eq!(
        (info.state, info.reason, info.managed_save),
        (DomainState::Running, StateReason::Restored, false)
    );
    still_counting(&c, "saver", pid, at_save);

    // restore --paused leaves QEMU paused until resume.
    let paused = d.dir.join("paused.save");
    c.save("saver", s(&paused), None).unwrap();
    let info = c
        .restore(s(&paused), Some(ferrovirt_api::save::StartState::Paused))
        .unwrap();
    assert_eq!(info.state, DomainState::Paused);
    assert_eq!(qmp_status(&d, "saver"), "paused");
    c.action("saver", DomainOp::Resume).unwrap();
    still_counting(&c, "saver", pid, at_save);
}

#[test]
fn bad_inputs_are_one_clear_error_and_the_vm_is_as_it_was() {
    let d = Daemon::start();
    let c = d.client();
    let pid = boot_counting(&d, "keeper");
    let qemu = c.get("keeper").unwrap().pid.unwrap();
    let unchanged = |what: &str| {
        let i = c.get("keeper").unwrap();
        assert_eq!(
            (i.state, i.reason, i.pid),
            (DomainState::Running, StateReason::Booted, Some(qemu)),
            "after {what}"
        );
        assert_eq!(
            qmp_status(&d, "keeper"),
            "running",
            "after {what}; daemon log: {}",
            d.log()
        );
    };

    // An existing target is never overwritten.
    let existing = d.file("existing.save", "precious\n");
    let e = api_error(c.save("keeper", s(&existing), None));
    assert!(e.message.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "precious\n");
    unchanged("a save to an existing file");

    // A disk that fills up during the save: a clear error, no file left, the VM runs on.
    let small = Tmpfs::mount(d.dir.join("small"), "2m");
    let target = small.0.join("full.save");
    let e = api_error(c.save("keeper", s(&target), None));
    assert!(
        e.message.contains("No space left on device") || e.message.contains("space"),
        "{e}"
    );
    assert!(!target.exists(), "a failed save leaves no file");
    unchanged("a save to a full disk");
    still_counting(&c, "keeper", pid, 1);
    drop(small);

    // A good file for a domain that runs: refused, the running VM untouched.
    let file = d.dir.join("keeper.save");
    c.save("keeper", s(&file), None).unwrap();
    c.restore(s(&file), None).unwrap();
    let qemu = c.get("keeper").unwrap().pid.unwrap();
    let e = api_error(c.restore(s(&file), None));
    assert!(e.message.contains("is running"), "{e}");
    assert_eq!(c.get("keeper").unwrap().pid, Some(qemu));
    c.action("keeper", DomainOp::Destroy).unwrap();

    // Missing, truncated and corrupted files; each leaves the domain shut off as it was.
    let shut = |what: &str| {
        let i = c.get("keeper").unwrap();
        assert_eq!(
            (i.state, i.reason),
            (DomainState::Shutoff, StateReason::Destroyed),
            "after {what}"
        );
    };
    let e = api_error(c.restore(s(&d.dir.join("nope.save")), None));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("cannot open"), "{e}");
    shut("a missing file");
    let good = std::fs::read(&file).unwrap();
    let truncated = d.dir.join("truncated.save");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let e = api_error(c.restore(s(&truncated), None));
    assert!(e.message.contains("truncated"), "{e}");
    shut("a truncated file");
    // Damage inside QEMU's stream (the header is intact): QEMU refuses to load it.
    let corrupt = d.dir.join("corrupt.save");
    let mut bad = good.clone();
    for b in &mut bad[4096..4096 + 64] {
        *b ^= 0xa5;
    }
    std::fs::write(&corrupt, bad).unwrap();
    let e = api_error(c.restore(s(&corrupt), None));
    assert_eq!(e.code, ErrorCode::DriverError, "{e}");
    assert!(e.message.contains("could not load"), "{e}");
    shut("a corrupted stream");
    // After all that, the good file still restores the guest where it was.
    c.restore(s(&file), None).unwrap();
    still_counting(&c, "keeper", pid, 1);
}
