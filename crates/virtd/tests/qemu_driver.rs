//! End-to-end tests of the qemu driver: real qemu-system-x86_64 (TCG) booting Debian's cloud
//! kernel with a busybox initramfs (guest/make-test-guest.sh).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    console_log, console_roundtrip, pid_alive, qemu_def, qmp_status, wait_booted, wait_for, Daemon,
    BOOT,
};
use ferrovirt_api::client::DefFormat;
use ferrovirt_api::DomainOp;
use ferrovirt_api::{DomainState, StateReason};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

/// A stream whose read timeout can be set (the Unix socket and TCP).
trait Timeout {
    fn read_timeout(&self, t: Duration);
}
impl Timeout for std::os::unix::net::UnixStream {
    fn read_timeout(&self, t: Duration) {
        self.set_read_timeout(Some(t)).unwrap();
    }
}
impl Timeout for std::net::TcpStream {
    fn read_timeout(&self, t: Duration) {
        self.set_read_timeout(Some(t)).unwrap();
    }
}

/// The same over a WebSocket (`GET .../console`, binary messages), as a browser would do it:
/// on the Unix socket, or on TCP with the token as a subprotocol (browsers cannot set headers).
fn websocket_console_roundtrip<S: Read + Write + Timeout>(
    stream: S,
    protocols: Option<&str>,
    name: &str,
    command: &str,
    expect: &str,
) {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let mut req = format!("ws://localhost/v1/domains/{name}/console")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    stream.read_timeout(Duration::from_secs(30));
    let (mut ws, resp) = tungstenite::client(req, stream).expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    let chosen = resp.headers().get("sec-websocket-protocol");
    match protocols {
        Some(_) => assert_eq!(chosen.unwrap(), "ferrovirt.console"),
        None => assert!(chosen.is_none(), "{chosen:?}"),
    }
    ws.get_ref().read_timeout(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    let mut last_send = Instant::now() - Duration::from_secs(10);
    while !seen.contains(expect) {
        assert!(
            Instant::now() < deadline,
            "no '{expect}' on the WebSocket console; got: {seen}"
        );
        if last_send.elapsed() > Duration::from_secs(3) {
            ws.send(Message::Binary(format!("{command}\n").into_bytes().into()))
                .unwrap();
            last_send = Instant::now();
        }
        match ws.read() {
            Ok(Message::Binary(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(other) => panic!("unexpected WebSocket message {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("WebSocket console: {e}"),
        }
    }
    let _ = ws.close(None);
}

/// What a WebSocket handshake on TCP offering these subprotocols (and no Authorization) gets.
fn tcp_websocket_status(addr: &str, name: &str, protocols: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /v1/domains/{name}/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
    )
    .unwrap();
    let mut answer = [0u8; 4096];
    let n = s.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[test]
fn boots_a_guest_with_console_log_and_live_console_then_destroys_it() {
    let token = common::token_file(0o600);
    let d = Daemon::start_with(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let addr = common::tcp_addr(&d);
    let c = d.client();
    c.define(&qemu_def("tiny", "", ""), DefFormat::Toml, false)
        .unwrap();
    let started = Instant::now();
    let info = c.action("tiny", DomainOp::Start).unwrap();
    assert_eq!(info.state, DomainState::Running);
    let pid = info.pid.expect("qemu pid");
    assert!(pid_alive(pid));
    wait_booted(&d, "tiny");
    eprintln!("guest reached init {:?} after start", started.elapsed());
    console_roundtrip(&c, "tiny", "echo answer-$((6*7))", "answer-42");
    let unix = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    websocket_console_roundtrip(
        unix,
        None,
        "tiny",
        "echo ws-answer-$((6*7))",
        "ws-answer-42",
    );
    // On TCP as a browser does it: the token in a subprotocol, ours chosen in the answer.
    let bearer = format!(
        "ferrovirt.bearer.{}",
        data_encoding::BASE64URL_NOPAD.encode(common::TOKEN.as_bytes())
    );
    let offered = format!("ferrovirt.console, {bearer}");
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    let cmd = "echo tcp-ws-answer-$((6*7))";
    websocket_console_roundtrip(tcp, Some(&offered), "tiny", cmd, "tcp-ws-answer-42");
    for refused in [
        "ferrovirt.console",
        "ferrovirt.console, ferrovirt.bearer.d3Jvbmc",
    ] {
        let answer = tcp_websocket_status(&addr, "tiny", refused);
        assert!(answer.starts_with("HTTP/1.1 401"), "{refused}: {answer}");
    }
    let answer = tcp_websocket_status(&addr, "tiny", &bearer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("ferrovirt.console"), "{answer}");
    // The console log caught the live session too.
    wait_for("console log of the session", Duration::from_secs(5), || {
        console_log(&d, "tiny").contains("answer-42")
    });

    // suspend/resume really pause QEMU: ask QMP ourselves.
    c.action("tiny", DomainOp::Suspend).unwrap();
    assert_eq!(qmp_status(&d, "tiny"), "paused");
    c.action("tiny", DomainOp::Resume).unwrap();
    assert_eq!(qmp_status(&d, "tiny"), "running");

    let info = c.action("tiny", DomainOp::Destroy).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Destroyed)
    );
    assert!(!pid_alive(pid), "qemu {pid} still runs after destroy");
    let _ = std::fs::remove_file(token);
}

#[test]
fn guest_power_off_follows_on_poweroff() {
    let d = Daemon::start();
    let c = d.client();
    let r = c
        .define(&qemu_def("offer", "fv.poweroff", ""), DefFormat::Toml, true)
        .unwrap();
    let pid = r.domain.pid.unwrap();
    // Transient + guest powered off + on_poweroff = destroy: the domain is gone.
    wait_for("the transient domain to disappear", BOOT, || {
        c.get("offer").is_err()
    });
    assert!(console_log(&d, "offer").contains("FERROVIRT-GUEST-POWEROFF"));
    wait_for("qemu to exit", Duration::from_secs(10), || !pid_alive(pid));

    c.define(
        &qemu_def("keeper", "fv.poweroff", ""),
        DefFormat::Toml,
        false,
    )
    .unwrap();
    c.action("keeper", DomainOp::Start).unwrap();
    wait_for("shut off after the guest's poweroff", BOOT, || {
        c.get("keeper").unwrap().state == DomainState::Shutoff
    });
    assert_eq!(c.get("keeper").unwrap().reason, StateReason::Shutdown);
}

#[test]
fn vms_survive_kill_9_of_the_daemon_and_are_reattached() {
    let mut d = Daemon::start();
    let c = d.client();
    c.define(&qemu_def("survivor", "", ""), DefFormat::Toml, false)
        .unwrap();
    c.define(&qemu_def("vanisher", "", ""), DefFormat::Toml, false)
        .unwrap();
    let pid = c.action("survivor", DomainOp::Start).unwrap().pid.unwrap();
    let pid2 = c.action("vanisher", DomainOp::Start).unwrap().pid.unwrap();
    wait_booted(&d, "survivor");

    d.kill9();
    // While the daemon is down one VM ends.
    unsafe_kill(pid2);
    wait_for("vanisher's qemu to end", Duration::from_secs(10), || {
        !pid_alive(pid2)
    });
    assert!(pid_alive(pid), "the VM died with the daemon");
    d.spawn();
    let c = d.client();
    let info = c.get("survivor").unwrap();
    assert_eq!((info.state, info.pid), (DomainState::Running, Some(pid)));
    let gone = c.get("vanisher").unwrap();
    assert_eq!(
        (gone.state, gone.reason),
        (DomainState::Shutoff, StateReason::Vanished)
    );
    // The reattached VM is fully controllable: console and monitor work.
    console_roundtrip(&c, "survivor", "echo still-$((40+2))", "still-42");
    // Its end is noticed without the daemon being its parent.
    unsafe_kill(pid);
    wait_for("crash detection", Duration::from_secs(20), || {
        c.get("survivor").unwrap().state == DomainState::Crashed
    });
    assert_eq!(c.get("survivor").unwrap().reason, StateReason::Crashed);
    assert!(Path::new(&d.state_dir()).exists());
}

fn unsafe_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status_within(TOOL_TIMEOUT)
        .unwrap();
    assert!(status.success());
}

#[test]
fn cdrom_and_vnc_graphics_with_seabios() {
    let d = Daemon::start();
    let c = d.client();
    // Any ISO will do: SeaBIOS finds no boot sector on it, the VM keeps running its firmware.
    let iso = d.dir.join("empty.iso");
    let made = std::process::Command::new("genisoimage")
        .args(["-quiet", "-volid", "EMPTY", "-o"])
        .arg(&iso)
        .arg(d.file("readme.txt", "nothing to boot here\n"))
        .status_within(TOOL_TIMEOUT)
        .expect("genisoimage (Debian package genisoimage) is needed");
    assert!(made.success());
    let def = format!(
        "name = \"fw\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 64\n[os]\nboot = [\"cdrom\"]\n[[disk]]\npath = \"{}\"\ndevice = \"cdrom\"\n[graphics]\ntype = \"vnc\"\n",
        iso.display()
    );
    c.define(&def, DefFormat::Toml, false).unwrap();
    c.action("fw", DomainOp::Start).unwrap();
    let uri = c.display("fw").unwrap().uri.expect("a VNC display");
    let display: u16 = uri
        .strip_prefix("vnc://127.0.0.1:")
        .and_then(|n| n.parse().ok())
        .expect(&uri);
    // A real VNC server; on loopback without a password it offers security type None (1).
    assert_eq!(vnc_security_types(5900 + display), vec![1]);
    let xml = c.xml("fw").unwrap();
    assert!(
        xml.contains("<graphics type='vnc'")
            && xml.contains("device='cdrom'")
            && xml.contains("<boot dev='cdrom'/>"),
        "{xml}"
    );
    c.action("fw", DomainOp::Destroy).unwrap();
    assert!(c.display("fw").is_err(), "a stopped domain has no display");
}

/// The RFB handshake up to the server's list of security types (1 None, 2 VNC password).
fn vnc_security_types(port: u16) -> Vec<u8> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to VNC");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).unwrap();
    assert!(banner.starts_with(b"RFB 003."), "{banner:?}");
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut n = [0u8; 1];
    s.read_exact(&mut n).unwrap();
    let mut types = vec![0u8; n[0] as usize];
    s.read_exact(&mut types).unwrap();
    types
}

/// With --allow-remote-vnc a display may listen beyond loopback, with a password: QEMU then
/// asks for it, and domdisplay says where it really listens. Console and QEMU logs are 0600.
#[test]
fn remote_vnc_has_a_password_and_domdisplay_says_where_it_listens() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start_with(&["--allow-remote-vnc"]);
    let c = d.client();
    let def = qemu_def(
        "rvnc",
        "",
        "[graphics]\ntype = \"vnc\"\nlisten = \"0.0.0.0\"\npasswd = \"s3cret\"\n",
    );
    c.define(&def, DefFormat::Toml, false).unwrap();
    c.action("rvnc", DomainOp::Start).unwrap();
    let uri = c.display("rvnc").unwrap().uri.expect("a VNC display");
    let display: u16 = uri
        .strip_prefix("vnc://0.0.0.0:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("domdisplay should say 0.0.0.0: {uri}"));
    assert_eq!(vnc_security_types(5900 + display), vec![2]);
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(d.state_dir().join("logs/rvnc.log")), 0o600);
    assert_eq!(mode(d.run_dir().join("vms/rvnc/qemu.log")), 0o600);
    assert_eq!(mode(d.run_dir().join("vms/rvnc")), 0o700);
    c.action("rvnc", DomainOp::Destroy).unwrap();
}

#[test]
fn a_vm_that_cannot_start_is_a_driver_error_and_changes_nothing() {
    let d = Daemon::start();
    let c = d.client();
    let bogus = d.file("not-a-kernel", "this is text, not a Linux kernel\n");
    let def = format!(
        "name = \"broken\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 64\n[os]\nkernel = \"{}\"\n",
        bogus.display()
    );
    c.define(&def, DefFormat::Toml, false).unwrap();
    let before = c.get("broken").unwrap();
    match c.action("broken", DomainOp::Start) {
        Err(ferrovirt_api::client::ClientError::Api(e)) => {
            assert_eq!(e.code, ferrovirt_api::ErrorCode::DriverError);
            assert!(e.message.contains("qemu failed to start"), "{}", e.message);
        }
        other => panic!("expected a driver error, got {other:?}"),
    }
    let after = c.get("broken").unwrap();
    assert_eq!((after.state, after.reason), (before.state, before.reason));
    assert!(c.version().is_ok(), "the daemon keeps running");
}
