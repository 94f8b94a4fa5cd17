//! End-to-end tests of ferrovirtd's logic with the in-process `test` driver.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::Duration;

use common::{code, Daemon};
use ferrovirt_api::client::DefFormat;
use ferrovirt_api::state::EventKind;
use ferrovirt_api::DomainOp;
use ferrovirt_api::{DomainState, ErrorCode, StateReason};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

fn toml_def(d: &Daemon, name: &str, extra: &str) -> String {
    let kernel = d.file(
        "vmlinuz",
        "not really a kernel: the test driver does not boot it",
    );
    format!(
        "name = \"{name}\"\ntype = \"test\"\nmemory_mib = 128\n{extra}\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    )
}

/// Collect events on a background subscription.
fn subscribe(d: &Daemon) -> mpsc::Receiver<(String, EventKind, String)> {
    let (tx, rx) = mpsc::channel();
    let client = d.client();
    std::thread::spawn(move || {
        let _ = client.events(|ev| tx.send((ev.domain, ev.kind, ev.detail)).is_ok());
    });
    common::until_subscribed(d, &d.client(), |t| {
        rx.recv_timeout(t).is_ok_and(|ev| ev.0 == common::PROBE)
    });
    rx
}

/// The next event of a test's own domains (the subscription probe's are skipped).
fn next_event(rx: &mpsc::Receiver<(String, EventKind, String)>) -> (String, EventKind, String) {
    loop {
        let ev = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("an event within 5 s");
        if ev.0 != common::PROBE {
            return ev;
        }
    }
}

#[test]
fn full_lifecycle_with_states_reasons_and_events() {
    let d = Daemon::start();
    let c = d.client();
    let events = subscribe(&d);

    let r = c
        .define(&toml_def(&d, "web", ""), DefFormat::Toml, false)
        .unwrap();
    assert_eq!(
        (r.domain.state, r.domain.reason),
        (DomainState::Shutoff, StateReason::Unknown)
    );
    assert!(r.domain.persistent);
    assert_eq!(next_event(&events).1, EventKind::Defined);
    assert!(
        c.list(false).unwrap().is_empty(),
        "list without --all shows only active domains"
    );

    let info = c.action("web", DomainOp::Start).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Booted)
    );
    assert!(info.id.is_some());
    assert_eq!(next_event(&events).1, EventKind::Started);

    assert_eq!(
        c.action("web", DomainOp::Suspend).unwrap().state,
        DomainState::Paused
    );
    assert_eq!(next_event(&events).1, EventKind::Suspended);
    let info = c.action("web", DomainOp::Resume).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Unpaused)
    );
    assert_eq!(next_event(&events).1, EventKind::Resumed);

    // reboot with on_reboot = restart (the default): stays running, restarted.
    let info = c.action("web", DomainOp::Reboot).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Restarted)
    );
    assert_eq!(next_event(&events).1, EventKind::Shutdown);
    assert_eq!(next_event(&events).1, EventKind::Started);

    let info = c.action("web", DomainOp::Shutdown).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Shutdown)
    );
    assert_eq!(next_event(&events).1, EventKind::Shutdown);
    assert_eq!(next_event(&events).1, EventKind::Stopped);

    c.action("web", DomainOp::Start).unwrap();
    next_event(&events);
    let info = c.action("web", DomainOp::Destroy).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Destroyed)
    );
    assert_eq!(
        next_event(&events),
        ("web".into(), EventKind::Stopped, "destroyed".into())
    );

    c.undefine("web").unwrap();
    assert_eq!(next_event(&events).1, EventKind::Undefined);
    assert!(c.list(true).unwrap().is_empty());
}

#[test]
fn on_poweroff_restart_and_transient_domains() {
    let d = Daemon::start();
    let c = d.client();
    c.define(
        &toml_def(&d, "phoenix", "on_poweroff = \"restart\""),
        DefFormat::Toml,
        false,
    )
    .unwrap();
    c.action("phoenix", DomainOp::Start).unwrap();
    let info = c.action("phoenix", DomainOp::Shutdown).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Restarted)
    );

    // create: transient, running at once, gone after it stops.
    let r = c
        .define(&toml_def(&d, "temp", ""), DefFormat::Toml, true)
        .unwrap();
    assert!(!r.domain.persistent);
    assert_eq!(r.domain.state, DomainState::Running);
    c.action("temp", DomainOp::Destroy).unwrap();
    assert_eq!(code(c.get("temp")), ErrorCode::NoDomain);

    // undefine while running: becomes transient, disappears when stopped.
    c.undefine("phoenix").unwrap();
    assert!(!c.get("phoenix").unwrap().persistent);
    c.action("phoenix", DomainOp::Destroy).unwrap();
    assert!(c.list(true).unwrap().is_empty());
}

#[test]
fn state_survives_kill_9_and_autostart_starts_domains() {
    let mut d = Daemon::start();
    let c = d.client();
    c.define(&toml_def(&d, "auto", ""), DefFormat::Toml, false)
        .unwrap();
    c.define(&toml_def(&d, "manual", ""), DefFormat::Toml, false)
        .unwrap();
    c.set_autostart("auto", true).unwrap();
    c.set_memory("manual", 219100, true).unwrap();
    d.kill9();
    d.spawn();
    let c = d.client();
    let auto = c.get("auto").unwrap();
    assert!(auto.autostart);
    assert_eq!(
        (auto.state, auto.reason),
        (DomainState::Running, StateReason::Booted)
    );
    let manual = c.get("manual").unwrap();
    assert_eq!(manual.state, DomainState::Shutoff);
    assert_eq!(manual.memory_kib, 219100);
}

#[test]
fn libvirt_xml_define_warns_about_unsupported_elements_and_dumpxml_round_trips() {
    let d = Daemon::start();
    let c = d.client();
    let kernel = d.file("vmlinuz", "k");
    let xml = format!(
        "<domain type='test'><name>fromlibvirt</name><memory unit='MiB'>300</memory><vcpu current='1'>2</vcpu>\
         <os><type>hvm</type><kernel>{}</kernel></os><features><acpi/></features>\
         <devices><video/><serial type='pty'/></devices></domain>",
        kernel.display()
    );
    let r = c.define(&xml, DefFormat::Xml, false).unwrap();
    assert_eq!(r.domain.memory_kib, 300 * 1024);
    let w = r.warnings.join("\n");
    assert!(
        w.contains("<features>") && w.contains("<video>") && w.contains("current='1'"),
        "warnings: {w}"
    );
    let dumped = c.xml("fromlibvirt").unwrap();
    assert!(
        dumped.contains("<memory unit='KiB'>307200</memory>"),
        "{dumped}"
    );
    assert!(dumped.contains(&format!("<uuid>{}</uuid>", r.domain.uuid)));
    // Redefining from the dumped XML (same uuid) updates the definition.
    let changed = dumped.replace(
        "<vcpu placement='static'>2</vcpu>",
        "<vcpu placement='static'>3</vcpu>",
    );
    let r2 = c.define(&changed, DefFormat::Xml, false).unwrap();
    assert!(r2.warnings.is_empty(), "{:?}", r2.warnings);
    assert_eq!(c.get("fromlibvirt").unwrap().vcpus, 3);
    // The native format.
    let toml = c.definition_toml("fromlibvirt").unwrap();
    assert!(toml.contains("vcpus = 3"), "{toml}");
    // Memory is kept in KiB exactly as given (it used to come back as 218112).
    let exact = changed.replace(
        "<memory unit='KiB'>307200</memory>",
        "<memory unit='KiB'>219100</memory>",
    );
    c.define(&exact, DefFormat::Xml, false).unwrap();
    assert_eq!(c.get("fromlibvirt").unwrap().memory_kib, 219100);
    let dumped = c.xml("fromlibvirt").unwrap();
    assert!(
        dumped.contains("<memory unit='KiB'>219100</memory>")
            && dumped.contains("<currentMemory unit='KiB'>219100</currentMemory>"),
        "{dumped}"
    );
    let toml = c.definition_toml("fromlibvirt").unwrap();
    assert!(toml.contains("memory_kib = 219100\n"), "{toml}");
}

#[test]
fn hostile_domain_xml_gets_a_clear_error_and_the_daemon_keeps_answering() {
    let d = Daemon::start();
    let c = d.client();
    let deep = format!(
        "<domain type='test'><name>deep</name>{}{}</domain>",
        "<x>".repeat(4000),
        "</x>".repeat(4000)
    );
    let mut wide = String::from("<domain type='test'");
    for i in 0..20_000 {
        wide.push_str(&format!(" a{i}='1'"));
    }
    wide.push_str("><name>wide</name></domain>");
    for (xml, limit) in [(deep, "deep (limit 64)"), (wide, "(limit 64 per element)")] {
        match c.define(&xml, DefFormat::Xml, false) {
            Err(ferrovirt_api::client::ClientError::Api(e)) => {
                assert_eq!(e.code, ErrorCode::MalformedBody, "{}", e.message);
                assert!(e.message.contains(limit), "{}", e.message);
            }
            other => panic!("expected an API error, got {other:?}"),
        }
    }
    assert!(c.list(true).unwrap().is_empty());
}

/// Everything observable about the store: the domain list and each definition.
fn snapshot(d: &Daemon) -> String {
    let c = d.client();
    let mut out = serde_json::to_string(&c.list(true).unwrap()).unwrap();
    for dom in c.list(true).unwrap() {
        out.push_str(&c.xml(&dom.name).unwrap());
    }
    out
}

#[test]
fn bad_input_gets_a_stable_error_code_and_changes_nothing() {
    let mut d = Daemon::start();
    let c = d.client();
    c.define(&toml_def(&d, "vm1", ""), DefFormat::Toml, false)
        .unwrap();
    c.action("vm1", DomainOp::Start).unwrap();
    let before = snapshot(&d);

    let kernel = d.dir.join("vmlinuz");
    let cases: Vec<(&str, ErrorCode, Result<(), ferrovirt_api::client::ClientError>)> = vec![
        ("duplicate name", ErrorCode::DomainExists, c.define(&toml_def(&d, "vm1", ""), DefFormat::Toml, false).map(|_| ())),
        ("duplicate name (create)", ErrorCode::DomainExists, c.define(&toml_def(&d, "vm1", ""), DefFormat::Toml, true).map(|_| ())),
        ("unknown VM start", ErrorCode::NoDomain, c.action("nosuch", DomainOp::Start).map(|_| ())),
        ("unknown VM info", ErrorCode::NoDomain, c.get("nosuch").map(|_| ())),
        ("unknown VM undefine", ErrorCode::NoDomain, c.undefine("nosuch")),
        ("memory 0", ErrorCode::InvalidDefinition, c.define(&toml_def(&d, "m0", "memory_mib = 0").replace("memory_mib = 128\n", ""), DefFormat::Toml, false).map(|_| ())),
        (
            "missing kernel",
            ErrorCode::InvalidDefinition,
            c.define("name = \"k\"\ntype = \"test\"\n[os]\nkernel = \"/nonexistent/vmlinuz\"\n", DefFormat::Toml, false).map(|_| ()),
        ),
        (
            "missing disk",
            ErrorCode::InvalidDefinition,
            c.define(
                &format!("name = \"dk\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n[[disk]]\npath = \"/nonexistent/disk.qcow2\"\nformat = \"qcow2\"\n", kernel.display()),
                DefFormat::Toml,
                false,
            )
            .map(|_| ()),
        ),
        ("malformed XML", ErrorCode::MalformedBody, c.define("<domain><name>x</domain>", DefFormat::Xml, false).map(|_| ())),
        ("malformed TOML", ErrorCode::MalformedBody, c.define("name = \"x\n[os", DefFormat::Toml, false).map(|_| ())),
        ("malformed JSON", ErrorCode::MalformedBody, c.define("{\"name\": ", DefFormat::Json, false).map(|_| ())),
        ("unknown TOML key", ErrorCode::MalformedBody, c.define("name = \"x\"\nmemroy = 1\n", DefFormat::Toml, false).map(|_| ())),
        ("empty body", ErrorCode::MalformedBody, c.define("", DefFormat::Json, false).map(|_| ())),
        ("bad name", ErrorCode::InvalidDefinition, c.define(&toml_def(&d, "a/b", ""), DefFormat::Toml, false).map(|_| ())),
        ("start running VM", ErrorCode::OperationInvalid, c.action("vm1", DomainOp::Start).map(|_| ())),
        ("resume running VM", ErrorCode::OperationInvalid, c.action("vm1", DomainOp::Resume).map(|_| ())),
        ("live setmem", ErrorCode::NotSupported, c.set_memory("vm1", 64, false).map(|_| ())),
        ("setmem 0", ErrorCode::InvalidDefinition, c.set_memory("vm1", 0, true).map(|_| ())),
        ("network default", ErrorCode::NoNetwork, c.define(&toml_def(&d, "n", "[[interface]]\ntype = \"network\"\nsource = \"default\""), DefFormat::Toml, false).map(|_| ())),
        ("console of test VM", ErrorCode::NotSupported, c.console("vm1", false).map(|_| ())),
    ];
    for (what, expected, result) in cases {
        match result {
            Err(ferrovirt_api::client::ClientError::Api(e)) => {
                assert_eq!(e.code, expected, "{what}: {}", e.message);
                assert!(!e.message.is_empty());
            }
            other => panic!("{what}: expected {expected:?}, got {other:?}"),
        }
    }
    assert_eq!(snapshot(&d), before, "the store changed");
    // Still unchanged after a restart, i.e. on disk.
    d.kill9();
    d.spawn();
    assert_eq!(snapshot(&d), before, "the stored state changed");
}

#[test]
fn raw_http_errors_are_json_with_codes() {
    let d = Daemon::start();
    let resp =
        ferrovirt_api::http::unix_request(&d.socket(), "GET", "/v2/nothing", None, b"", None)
            .unwrap();
    assert_eq!(resp.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // Garbage instead of HTTP: a 400 and the daemon keeps serving.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(d.client().version().is_ok());
}

#[test]
fn socket_mode_and_side_by_side_daemons() {
    let a = Daemon::start();
    let b = Daemon::start();
    let mode = std::fs::metadata(a.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    a.client()
        .define(&toml_def(&a, "only-in-a", ""), DefFormat::Toml, false)
        .unwrap();
    assert!(b.client().list(true).unwrap().is_empty());
    // A second daemon on the same state dir refuses to start.
    let out = std::process::Command::new(common::daemon_binary())
        .arg("--state-dir")
        .arg(a.state_dir())
        .arg("--run-dir")
        .arg(a.dir.join("run2"))
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another ferrovirtd"));
    assert_eq!(a.client().list(true).unwrap().len(), 1);
}

/// type='kvm' means hardware acceleration: a kvm domain ferrovmm cannot run (a CD-ROM, graphics)
/// is defined for QEMU with accel=kvm; on a host without hardware virtualization (this one) its
/// start is refused naming type 'qemu' (TCG), as libvirt does.
#[test]
fn a_kvm_domain_gets_its_engine_by_what_it_asks_for_and_this_host_offers() {
    let d = Daemon::start();
    let c = d.client();
    let iso = d.file("x.iso", "");
    let def = format!(
        "name = \"k\"\ntype = \"kvm\"\n[[disk]]\npath = \"{}\"\ndevice = \"cdrom\"\n[graphics]\ntype = \"vnc\"\n",
        iso.display()
    );
    let r = c.define(&def, DefFormat::Toml, false).expect("defined");
    let engine = &r.domain.engine;
    assert_eq!(engine.engine, ferrovirt_api::engine::Engine::Qemu);
    assert_eq!(engine.accel, Some(ferrovirt_api::def::Accel::Kvm));
    assert!(engine.reason.contains("CD-ROMs"), "{}", engine.reason);
    // An explicit ferrovmm for what ferrovmm cannot run is refused at define.
    let explicit = def.replace(
        "type = \"kvm\"\n",
        "type = \"kvm\"\nemulator = \"ferrovmm\"\n",
    );
    match c.define(
        &explicit.replace("name = \"k\"", "name = \"k2\""),
        DefFormat::Toml,
        false,
    ) {
        Err(ferrovirt_api::client::ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::NotSupported);
            assert!(
                e.message.contains("ferrovmm does not support CD-ROMs"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    if ferrovirt_api::host::HostVirt::probe().hardware_kvm() {
        return;
    }
    let why = engine
        .cannot_start
        .clone()
        .expect("no hardware virtualization here");
    assert!(why.contains("type 'qemu'"), "{why}");
    match c.action("k", DomainOp::Start) {
        Err(ferrovirt_api::client::ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::NotSupported);
            assert!(
                e.message.contains("hardware virtualization") && e.message.contains("type 'qemu'"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.get("k").unwrap().state, DomainState::Shutoff);
}

#[test]
fn volumes_are_created_thin_in_the_default_pool() {
    let d = Daemon::start();
    let c = d.client();
    let req = ferrovirt_api::msg::VolumeCreateRequest {
        name: "big.qcow2".into(),
        capacity_bytes: 16 << 30,
        format: "qcow2".into(),
    };
    let vol = c.create_volume(&req).unwrap();
    assert_eq!(
        std::path::Path::new(&vol.path),
        d.state_dir().join("images/big.qcow2")
    );
    let meta = std::fs::metadata(&vol.path).unwrap();
    assert!(
        meta.len() < 1 << 20,
        "a thin 16 GiB qcow2 should take kilobytes, not {}",
        meta.len()
    );
    // qemu-img as the oracle for the virtual size.
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", &vol.path])
        .output_within(TOOL_TIMEOUT)
        .expect("qemu-img (qemu-utils) is needed");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16u64 << 30);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(code(c.create_volume(&req)), ErrorCode::StorageError);
    c.delete_volume("big.qcow2").unwrap();
    assert!(!std::path::Path::new(&vol.path).exists());
    // Sizes that are not whole sectors: the capacity reported is the image's, as
    // qemu-img info reads it, not the number asked for.
    for (name, format, asked) in [
        ("odd.qcow2", "qcow2", 1000u64),
        ("odd.raw", "raw", (1 << 30) + 1),
    ] {
        let req = ferrovirt_api::msg::VolumeCreateRequest {
            name: name.into(),
            capacity_bytes: asked,
            format: format.into(),
        };
        let vol = c.create_volume(&req).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format, &vol.path])
            .output_within(TOOL_TIMEOUT)
            .expect("qemu-img (qemu-utils) is needed");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["virtual-size"], vol.capacity_bytes, "{name}");
        assert_eq!(vol.capacity_bytes, asked.div_ceil(512) * 512, "{name}");
        c.delete_volume(name).unwrap();
    }
}
