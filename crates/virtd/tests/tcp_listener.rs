//! The optional TCP listener: only with a bearer token, refused without one.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{certificates, code, daemon_binary, tcp_addr, token_file, wait_for, Daemon, TOKEN};
use ferrovirt_api::client::Client;
use ferrovirt_api::ErrorCode;
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

#[test]
fn tcp_needs_the_bearer_token() {
    let token = token_file(0o600);
    let d = Daemon::start_with(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let addr = tcp_addr(&d);
    let good = Client::tcp(&addr, TOKEN);
    assert_eq!(good.version().unwrap().api, "v1");
    assert!(good.list(true).unwrap().is_empty());
    assert_eq!(
        code(Client::tcp(&addr, "wrong-token-wrong-token").list(true)),
        ErrorCode::Unauthorized
    );
    // No Authorization header at all.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /v1/domains HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"unauthorized\""));
    // The Unix socket needs no token.
    assert!(d.client().version().is_ok());
    let _ = std::fs::remove_file(token);
}

#[test]
fn tcp_without_a_safe_token_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("fv-tcp-refused-{}", std::process::id()));
    let run = |args: &[&str]| {
        Command::new(daemon_binary())
            .arg("--state-dir")
            .arg(dir.join("s"))
            .arg("--run-dir")
            .arg(dir.join("r"))
            .args(args)
            .output_within(TOOL_TIMEOUT)
            .unwrap()
    };
    let out = run(&["--listen-tcp", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --token-file"));
    let open_token = token_file(0o644);
    let out = run(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        open_token.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(open_token);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tls_listener_serves_the_api_with_token_and_certificate() {
    let dir = std::env::temp_dir().join(format!("fv-tls-{}", std::process::id()));
    let (ca, cert, key) = certificates(&dir, "a");
    let (other_ca, _, _) = certificates(&dir, "b");
    let token = token_file(0o600);
    let d = Daemon::start_with(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let mut addr = String::new();
    wait_for("the TLS listener line", Duration::from_secs(5), || {
        addr = d
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("ferrovirtd: also listening on tls://"))
            .and_then(|r| r.split(' ').next())
            .unwrap_or("")
            .to_string();
        !addr.is_empty()
    });
    let c = Client::tls(&addr, TOKEN, &ca).unwrap();
    assert_eq!(c.version().unwrap().api, "v1");
    // Events stream over TLS too.
    let (tx, rx) = std::sync::mpsc::channel();
    let events = Client::tls(&addr, TOKEN, &ca).unwrap();
    std::thread::spawn(move || {
        let _ = events.events(|ev| tx.send((ev.domain, ev.kind)).is_ok());
    });
    common::until_subscribed(&d, &c, |t| {
        rx.recv_timeout(t).is_ok_and(|ev| ev.0 == common::PROBE)
    });
    let kernel = d.file("k", "k");
    c.define(
        &format!(
            "name = \"overtls\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n",
            kernel.display()
        ),
        ferrovirt_api::client::DefFormat::Toml,
        false,
    )
    .unwrap();
    let first_own_event = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(5)).ok())
        .find(|ev| ev.0 != common::PROBE);
    assert_eq!(
        first_own_event,
        Some((
            "overtls".to_string(),
            ferrovirt_api::state::EventKind::Defined
        ))
    );
    assert_eq!(c.list(true).unwrap().len(), 1);
    // A client that trusts another certificate does not get through.
    assert!(Client::tls(&addr, TOKEN, &other_ca)
        .unwrap()
        .version()
        .is_err());
    // TLS does not replace the token.
    assert_eq!(
        code(
            Client::tls(&addr, "wrong-token-wrong-token", &ca)
                .unwrap()
                .list(true)
        ),
        ErrorCode::Unauthorized
    );
    // Plain HTTP on the TLS port gets nothing.
    assert!(Client::tcp(&addr, TOKEN).version().is_err());
    let _ = std::fs::remove_file(token);
    let _ = std::fs::remove_dir_all(dir);
}
