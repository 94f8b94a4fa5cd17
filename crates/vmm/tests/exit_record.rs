//! `--exit-file`: every way a VM ends leaves one JSON exit record saying how (the typed
//! `ferrovmm_api::ExitRecord` the kvm driver reads), written atomically before the process exits.

mod common;

use std::path::Path;

use common::asm::Guest;
use common::live::LiveVm;
use common::pvh_kernel;
use ferrovmm_api::{CrashCause, ExitReason, ExitRecord};
use iced_x86::code_asm::*;

fn record(path: &Path) -> ExitRecord {
    ExitRecord::read(path).unwrap_or_else(|e| panic!("no exit record: {e}"))
}

/// Boots a guest to its end with an exit file; returns the run and the record.
fn boot_to_end(g: Guest, extra: &[&str]) -> (common::Run, ExitRecord) {
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "guest.elf", g, vec![]);
    let exit = dir.path().join("exit.json");
    let mut args = vec!["--exit-file", exit.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = common::boot(&kernel, &args);
    let rec = record(&exit);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("exit.json."))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    (run, rec)
}

#[test]
fn poweroff_is_recorded() {
    let mut g = Guest::new(32);
    g.print("bye\n");
    g.poweroff();
    let (run, rec) = boot_to_end(g, &[]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(rec.reason, ExitReason::Poweroff);
    assert_eq!(rec.status, 0);
}

#[test]
fn a_guest_reset_is_recorded() {
    let mut g = Guest::new(32);
    g.a.mov(al, 0xfe).unwrap();
    g.a.out(0x64, al).unwrap();
    g.halt_forever();
    let (run, rec) = boot_to_end(g, &[]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(
        rec,
        ExitRecord {
            reason: ExitReason::Reset,
            status: 0
        }
    );
}

#[test]
fn an_emulation_failure_is_a_crash_with_its_cause() {
    // Fetching code from guest-physical memory that no memory slot backs: KVM can only try to
    // emulate the fetch, and fails.
    let mut g = Guest::new(32);
    g.a.mov(eax, 0xd000_0000u32).unwrap();
    g.a.jmp(eax).unwrap();
    let (run, rec) = boot_to_end(g, &[]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert_eq!(rec.status, 1);
    let ExitReason::Crash { cause, detail, .. } = &rec.reason else {
        panic!("want a crash record, got {rec:?}");
    };
    assert!(
        matches!(
            cause,
            CrashCause::KvmInternalError | CrashCause::UnhandledExit
        ),
        "{rec:?}"
    );
    assert!(detail.starts_with("vcpu0: "), "{detail}");
    // One line for people; the register dump stays on stderr.
    assert!(
        !detail.contains('\n') && !detail.contains("rip="),
        "{detail}"
    );
    assert!(run.stderr.contains("rip="), "stderr: {}", run.stderr);
}

#[test]
fn an_api_stop_is_recorded() {
    let mut g = Guest::new(32);
    g.print("up\n");
    g.halt_forever();
    let dir = common::tempdir();
    let kernel = pvh_kernel(dir.path(), "idle.elf", g, vec![]);
    let exit = dir.path().join("exit.json");
    // A stale record from an earlier run.
    std::fs::write(&exit, r#"{"reason":"poweroff","status":0}"#).unwrap();
    let vm = LiveVm::start(
        &kernel,
        &dir.path().join("api.sock"),
        &["--exit-file", exit.to_str().unwrap()],
    );
    vm.wait_for_output("up\n");
    assert!(
        !exit.exists(),
        "no record while the VM runs, not even an old one"
    );
    assert_eq!(vm.api("PUT", "/vm/stop").0, 204);
    assert_eq!(vm.finish().status, 0);
    assert_eq!(
        record(&exit),
        ExitRecord {
            reason: ExitReason::Stopped,
            status: 0
        }
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&exit).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn usage_errors_are_recorded_with_their_message() {
    let dir = common::tempdir();
    let exit = dir.path().join("exit.json");
    let kernel = dir.path().join("no-such-kernel");
    let e = exit.to_str().unwrap();
    let k = kernel.to_str().unwrap();

    // Refused by ferrovmm's checks.
    let run = common::run(&["--name", "u", "--kernel", k, "--exit-file", e]);
    assert_eq!(run.status, 2, "stderr: {}", run.stderr);
    let rec = record(&exit);
    assert_eq!(rec.status, 2);
    let ExitReason::Error { message } = &rec.reason else {
        panic!("want an error record, got {rec:?}");
    };
    assert!(
        message.contains("--kernel") && message.contains("cannot open"),
        "{message}"
    );

    // Refused by the command-line grammar itself, the exit file given as --exit-file=PATH.
    std::fs::remove_file(&exit).unwrap();
    let arg = format!("--exit-file={e}");
    let run = common::run(&["--kernel", k, &arg, "--disk", "path=/x,speed=fast"]);
    assert_eq!(run.status, 2, "stderr: {}", run.stderr);
    let rec = record(&exit);
    assert_eq!(rec.status, 2);
    let ExitReason::Error { message } = &rec.reason else {
        panic!("want an error record, got {rec:?}");
    };
    assert!(message.contains("speed"), "{message}");
}
