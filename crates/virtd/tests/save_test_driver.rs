//! save, restore and managed save through the real daemon with the `test` driver: the states,
//! reasons, files and errors a user sees (the drivers' payloads are tested in save_qemu.rs and
//! save_kvm.rs).

mod common;

use common::{code, Daemon};
use ferrovirt_api::client::{ClientError, DefFormat};
use ferrovirt_api::save::StartState;
use ferrovirt_api::{DomainOp, DomainState, ErrorCode, StateReason};

fn define(d: &Daemon, name: &str) {
    let kernel = d.file("vmlinuz", "not a kernel: the test driver boots nothing");
    let def = format!(
        "name = \"{name}\"\ntype = \"test\"\nmemory_mib = 64\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    d.client()
        .define(&def, DefFormat::Toml, false)
        .expect("define");
}

fn state(d: &Daemon, name: &str) -> (DomainState, StateReason) {
    let i = d.client().get(name).expect("domain");
    (i.state, i.reason)
}

fn message<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    match r {
        Err(ClientError::Api(e)) => e.message,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn save_then_restore_with_states_reasons_and_the_file() {
    let d = Daemon::start();
    let c = d.client();
    define(&d, "web");
    c.action("web", DomainOp::Start).unwrap();
    let file = d.dir.join("web.save");
    let f = file.to_str().unwrap();
    let info = c.save("web", f, None).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Saved)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read(&file).unwrap().starts_with(b"FERROSAV"));

    // A saved domain is not running: saving it again is one clear error.
    assert_eq!(code(c.save("web", f, None)), ErrorCode::OperationInvalid);

    let info = c.restore(f, None).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Restored)
    );
    // Its file restores a domain that is not running.
    let e = message(c.restore(f, None));
    assert!(e.contains("is running"), "{e}");
    assert_eq!(
        state(&d, "web"),
        (DomainState::Running, StateReason::Restored)
    );

    // An existing target is refused and nothing changes; so is a relative path.
    let e = message(c.save("web", f, None));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        state(&d, "web"),
        (DomainState::Running, StateReason::Restored)
    );
    assert_eq!(
        code(c.save("web", "relative.save", None)),
        ErrorCode::InvalidArgument
    );

    // A paused domain saved --running comes back running; restore --paused overrides the file.
    c.action("web", DomainOp::Suspend).unwrap();
    let second = d.dir.join("second.save");
    let s = second.to_str().unwrap();
    c.save("web", s, Some(StartState::Running)).unwrap();
    let info = c.restore(s, Some(StartState::Paused)).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Paused, StateReason::User)
    );
    c.action("web", DomainOp::Destroy).unwrap();
    let info = c.restore(s, None).unwrap();
    assert_eq!(info.state, DomainState::Running);
}

#[test]
fn bad_save_files_are_one_clear_error_and_change_nothing() {
    let d = Daemon::start();
    let c = d.client();
    define(&d, "db");
    c.action("db", DomainOp::Start).unwrap();
    let file = d.dir.join("db.save");
    c.save("db", file.to_str().unwrap(), None).unwrap();
    let good = std::fs::read(&file).unwrap();
    let before = c.get("db").unwrap();

    let missing = d.dir.join("missing.save");
    let e = message(c.restore(missing.to_str().unwrap(), None));
    assert!(
        e.contains("cannot open") && e.contains("missing.save"),
        "{e}"
    );

    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated", good[..good.len() - 3].to_vec(), "truncated"),
        (
            "garbage",
            b"this is not a save file at all, just text\n".to_vec(),
            "not a ferrovirt save file",
        ),
        (
            "flipped",
            {
                let mut g = good.clone();
                g[100] ^= 0x40;
                g
            },
            "corrupted",
        ),
        ("empty", Vec::new(), "not a ferrovirt save file"),
    ];
    for (name, bytes, expect) in cases {
        let p = d.dir.join(format!("{name}.save"));
        std::fs::write(&p, bytes).unwrap();
        let e = message(c.restore(p.to_str().unwrap(), None));
        assert!(e.contains(expect), "{name}: {e}");
        let after = c.get("db").unwrap();
        assert_eq!((after.state, after.reason), (before.state, before.reason));
    }
    // The good file still restores.
    c.restore(file.to_str().unwrap(), None).unwrap();
    assert_eq!(state(&d, "db").0, DomainState::Running);
}

#[test]
fn a_save_file_of_an_unknown_domain_restores_it_as_transient() {
    let d = Daemon::start();
    let c = d.client();
    define(&d, "gone");
    c.action("gone", DomainOp::Start).unwrap();
    let file = d.dir.join("gone.save");
    let f = file.to_str().unwrap();
    c.save("gone", f, None).unwrap();
    c.undefine("gone").unwrap();
    let info = c.restore(f, None).unwrap();
    assert_eq!((info.name.as_str(), info.persistent), ("gone", false));
    assert_eq!(info.state, DomainState::Running);
    // A transient domain that is saved disappears, as with virsh.
    let file2 = d.dir.join("gone2.save");
    c.save("gone", file2.to_str().unwrap(), None).unwrap();
    assert_eq!(code(c.get("gone")), ErrorCode::NoDomain);

    // Another domain with the file's name but another uuid is not overwritten.
    define(&d, "gone");
    let e = message(c.restore(f, None));
    assert!(e.contains("uuid"), "{e}");
    assert_eq!(state(&d, "gone").0, DomainState::Shutoff);
}

#[test]
fn managed_save_then_start_resumes_and_remove_forgets() {
    let d = Daemon::start();
    let c = d.client();
    define(&d, "app");
    c.action("app", DomainOp::Start).unwrap();
    let info = c.managed_save("app", None).unwrap();
    assert_eq!(
        (info.state, info.reason, info.managed_save),
        (DomainState::Shutoff, StateReason::Saved, true)
    );
    let file = d.state_dir().join("save/app.save");
    assert!(file.exists());
    // undefine keeps no orphan file.
    let e = message(c.undefine("app"));
    assert!(e.contains("managedsave-remove"), "{e}");

    let info = c.action("app", DomainOp::Start).unwrap();
    assert_eq!(
        (info.state, info.reason, info.managed_save),
        (DomainState::Running, StateReason::Restored, false)
    );
    assert!(!file.exists(), "a resumed managed save is removed");

    c.managed_save("app", Some(StartState::Paused)).unwrap();
    let info = c.managed_save_remove("app").unwrap();
    assert!(!info.managed_save);
    assert_eq!(
        code(c.managed_save_remove("app")),
        ErrorCode::OperationInvalid
    );
    let info = c.action("app", DomainOp::Start).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Booted)
    );

    // A managed save that was damaged is kept, and the start says how to boot afresh.
    c.managed_save("app", None).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 1);
    std::fs::write(&file, bytes).unwrap();
    let e = message(c.action("app", DomainOp::Start));
    assert!(
        e.contains("truncated") && e.contains("managedsave-remove"),
        "{e}"
    );
    assert_eq!(state(&d, "app"), (DomainState::Shutoff, StateReason::Saved));
    c.managed_save_remove("app").unwrap();
    c.action("app", DomainOp::Start).unwrap();
}
