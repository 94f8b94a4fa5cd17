//! The optional TCP listener: only with a bearer token, refused without one.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{code, daemon_binary, wait_for, Daemon};
use ferrovirt_api::client::Client;
use ferrovirt_api::ErrorCode;

const TOKEN: &str = "s3cret-token-for-tests-0123456789";

fn token_file(mode: u32) -> PathBuf {
    let p = std::env::temp_dir().join(format!("fv-token-{}-{mode:o}", std::process::id()));
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn tcp_addr(d: &Daemon) -> String {
    let mut addr = String::new();
    wait_for(
        "the TCP listener line in the daemon log",
        Duration::from_secs(5),
        || {
            addr = d
                .log()
                .lines()
                .find_map(|l| l.strip_prefix("ferrovirtd: also listening on tcp://"))
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or("")
                .to_string();
            !addr.is_empty()
        },
    );
    addr
}

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
            .output()
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
