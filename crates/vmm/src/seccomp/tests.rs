use super::*;
use ferrovmm_api::{CrashCause, ExitReason, ExitRecord, SeccompViolation};

#[test]
fn every_kind_of_thread_has_a_filter_in_both_modes() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::Log, SeccompMode::On] {
            let p = program(kind, mode).unwrap().expect("a filter");
            assert!(p.len() > 10, "{kind:?}: {} instructions", p.len());
        }
        assert!(program(kind, SeccompMode::Off).unwrap().is_none());
    }
}

#[test]
fn the_handlers_record_is_an_exit_record_naming_the_call() {
    let json = report::record_for_test(101, "blk-io3");
    let rec: ExitRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(rec.status, 1);
    assert_eq!(
        rec.reason,
        ExitReason::Crash {
            cause: CrashCause::Seccomp,
            detail: "blk-io3: seccomp forbids syscall ptrace (101)".into(),
            seccomp: Some(SeccompViolation {
                syscall: 101,
                name: "ptrace".into(),
                thread: "blk-io3".into(),
            }),
        }
    );
    // A name that is not plain cannot break the JSON; an unknown number still gets a record.
    let rec: ExitRecord = serde_json::from_str(&report::record_for_test(9999, "a\"b\\c")).unwrap();
    let ExitReason::Crash {
        seccomp: Some(v), ..
    } = rec.reason
    else {
        panic!("{rec:?}");
    };
    assert_eq!((v.name.as_str(), v.thread.as_str()), ("unknown", "a?b?c"));
}

#[test]
fn the_name_table_is_sorted_and_knows_the_usual_calls() {
    assert!(names::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(names::name(0), Some("read"));
    assert_eq!(names::name(libc::SYS_ioctl as u32), Some("ioctl"));
    assert_eq!(names::name(100_000), None);
}
