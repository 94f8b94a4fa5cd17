//! Hostile clients against the real daemon: malformed and oversized requests, floods of
//! connections, slow senders, bodies sent without the token, randomized garbage. After each, the
//! daemon must still be up and answer `GET /v1/domains` at once.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{certificates, tcp_addr, token_file, wait_for, Daemon, TOKEN};

/// How long an answer may take before the test calls the daemon stuck.
const ANSWER: Duration = Duration::from_secs(10);

fn unix(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(d.socket()).expect("connect to the daemon's socket");
    s.set_read_timeout(Some(ANSWER)).unwrap();
    s.set_write_timeout(Some(ANSWER)).unwrap();
    s
}

fn tcp(addr: &str) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).expect("connect to the daemon's TCP listener");
    s.set_read_timeout(Some(ANSWER)).unwrap();
    s.set_write_timeout(Some(ANSWER)).unwrap();
    s
}

/// Send `request`, then read what comes back until the daemon closes (or ANSWER passes).
/// A write the daemon refused (it closed first) is fine: what it answered is what counts.
fn exchange(mut s: impl Read + Write, request: &[u8]) -> String {
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

const LIST: &[u8] = b"GET /v1/domains HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// The daemon is up and lists its domains at once on a fresh connection.
fn assert_serving(d: &Daemon) {
    let answer = exchange(unix(d), LIST);
    assert_eq!(
        status(&answer),
        200,
        "GET /v1/domains: {answer}\n{}",
        d.log()
    );
    assert!(answer.ends_with("[]"), "{answer}");
}

/// The request from the issue: a chunk size that overflows, before any authentication.
/// The daemon then waits for that chunk's data: the body read timeout ends it (408), or the
/// route's body limit once more data than that arrives (413).
const CHUNK_OVERFLOW: &[u8] = b"POST /v1/version HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\nfffffffffffffff0\r\n";

/// CHUNK_OVERFLOW followed by more data than any route takes.
fn chunk_overflow_with_data() -> Vec<u8> {
    let mut r = CHUNK_OVERFLOW.to_vec();
    r.extend_from_slice(&[b'x'; 70 * 1024]);
    r
}

fn with_token(request: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(request);
    text.replacen(
        "Host: x\r\n",
        &format!("Host: x\r\nAuthorization: Bearer {TOKEN}\r\n"),
        1,
    )
    .into_bytes()
}

fn assert_refused_cleanly(answer: &str) {
    let code = status(answer);
    assert!(
        (400..500).contains(&code),
        "expected a 4xx answer, got: {answer}"
    );
}

#[test]
fn chunk_size_overflow_is_answered_on_unix_tcp_and_tls() {
    let token = token_file(0o600);
    let d = Daemon::start_with(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
        "--read-timeout",
        "2",
    ]);
    let answer = exchange(unix(&d), CHUNK_OVERFLOW);
    assert_eq!(status(&answer), 408, "{answer}");
    assert_serving(&d);
    let answer = exchange(unix(&d), &chunk_overflow_with_data());
    assert_eq!(status(&answer), 413, "{answer}");
    assert_serving(&d);
    let addr = tcp_addr(&d);
    // With the token (the body is read, and refused) and without (401 before the body).
    assert_refused_cleanly(&exchange(tcp(&addr), &with_token(CHUNK_OVERFLOW)));
    assert_serving(&d);
    assert_refused_cleanly(&exchange(
        tcp(&addr),
        &with_token(&chunk_overflow_with_data()),
    ));
    assert_serving(&d);
    assert_eq!(status(&exchange(tcp(&addr), CHUNK_OVERFLOW)), 401);
    assert_serving(&d);

    let dir = d.dir.join("certs");
    let (ca, cert, key) = certificates(&dir, "t");
    let tls = Daemon::start_with(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--read-timeout",
        "2",
    ]);
    let mut addr = String::new();
    wait_for("the TLS listener line", Duration::from_secs(5), || {
        addr = tls
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("ferrovirtd: also listening on tls://"))
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or("")
            .to_string();
        !addr.is_empty()
    });
    let config = ferrovirt_api::tls::client_config(&ca).unwrap();
    let tls_stream = || {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        rustls::StreamOwned::new(conn, tcp(&addr))
    };
    assert_refused_cleanly(&exchange(tls_stream(), &with_token(CHUNK_OVERFLOW)));
    assert_refused_cleanly(&exchange(
        tls_stream(),
        &with_token(&chunk_overflow_with_data()),
    ));
    assert_serving(&tls);
    let list = exchange(tls_stream(), &with_token(LIST));
    assert_eq!(status(&list), 200, "{list}");
    let _ = std::fs::remove_file(token);
}

#[test]
fn oversized_requests_get_413_or_431_before_they_are_read() {
    let d = Daemon::start();
    // A definition larger than the definitions' limit (1 MiB), announced by Content-Length: 413
    // at once, without sending the body.
    let answer = exchange(
        unix(&d),
        b"POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\nContent-Length: 2000000\r\n\r\n",
    );
    assert_eq!(status(&answer), 413, "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert_serving(&d);
    // An action's body is capped far lower (64 KiB), chunked too: cut off while reading.
    let mut req =
        b"POST /v1/domains/x/start HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..40 {
        req.extend_from_slice(b"1000\r\n");
        req.extend_from_slice(&[b'a'; 0x1000]);
        req.extend_from_slice(b"\r\n");
    }
    let answer = exchange(unix(&d), &req);
    assert_eq!(status(&answer), 413, "{answer}");
    assert_serving(&d);
    // A definition a bit over 1 MiB, sent in full: 413 too, nothing defined.
    let mut big = b"POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: application/toml\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..17 {
        big.extend_from_slice(b"10000\r\n");
        big.extend_from_slice(&[b'#'; 0x10000]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status(&exchange(unix(&d), &big)), 413);
    // Headers beyond 16 KiB: 431 from hyper.
    let mut huge_header = b"GET /v1/domains HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    huge_header.extend_from_slice(&[b'p'; 20 * 1024]);
    huge_header.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status(&exchange(unix(&d), &huge_header)), 431);
    // Too many headers: 431 as well.
    let mut many = b"GET /v1/domains HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(status(&exchange(unix(&d), &many)), 431);
    assert_serving(&d);
    assert!(d.client().list(true).unwrap().is_empty());
}

#[test]
fn over_tcp_no_body_is_read_before_the_token_is_checked() {
    let token = token_file(0o600);
    let d = Daemon::start_with(&[
        "--listen-tcp",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let addr = tcp_addr(&d);
    // A terabyte announced with a wrong token, and with none: 401 at once, nothing sent after
    // the headers (the read timeout on our side would fail the test if the daemon waited).
    for auth in ["Authorization: Bearer wrong-token-wrong-token\r\n", ""] {
        let head = format!(
            "POST /v1/domains HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000000000000\r\n\r\n"
        );
        let answer = exchange(tcp(&addr), head.as_bytes());
        assert_eq!(status(&answer), 401, "{answer}");
        assert!(answer.contains("\"unauthorized\""), "{answer}");
    }
    // With the right token the same request is refused by its size, also before reading.
    let head = format!(
        "POST /v1/domains HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000000000000\r\n\r\n"
    );
    assert_eq!(status(&exchange(tcp(&addr), head.as_bytes())), 413);
    // Many such connections at once do not make the daemon hold their bodies.
    let conns: Vec<_> = (0..20)
        .map(|_| {
            let mut s = tcp(&addr);
            s.write_all(b"POST /v1/domains HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope-nope-nope-nope\r\nContent-Length: 16777216\r\n\r\n").unwrap();
            let _ = s.write_all(&vec![b'x'; 256 * 1024]);
            s
        })
        .collect();
    assert_serving(&d);
    drop(conns);
    let rss_kib =
        std::fs::read_to_string(format!("/proc/{}/status", d.child.as_ref().unwrap().id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap();
    eprintln!("daemon RSS after 20 unauthenticated 16 MiB uploads: {rss_kib} KiB");
    assert!(
        rss_kib < 64 * 1024,
        "the daemon holds {rss_kib} KiB: bodies were buffered"
    );
    let _ = std::fs::remove_file(token);
}

#[test]
fn a_connection_flood_gets_503_and_the_daemon_recovers() {
    let d = Daemon::start_with(&["--max-connections", "8"]);
    // Fill the limit with keep-alive connections that each finished one request, until the
    // daemon turns one away.
    let mut open = Vec::new();
    let refused = loop {
        assert!(open.len() <= 8, "more than 8 connections were served");
        let mut s = unix(&d);
        s.write_all(b"GET /v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        if status(&head) == 503 {
            break head;
        }
        assert_eq!(status(&head), 200, "{head}");
        open.push(s);
    };
    assert!(refused.contains("\"too_many_connections\""), "{refused}");
    assert!(open.len() >= 6, "only {} connections served", open.len());
    // A flood beyond the limit: each is answered 503 or closed, none is served, none hangs.
    let flood: Vec<_> = (0..300)
        .filter_map(|_| UnixStream::connect(d.socket()).ok())
        .collect();
    for s in flood.iter().take(20) {
        s.set_read_timeout(Some(ANSWER)).unwrap();
        let answer = exchange(s, LIST);
        assert!(
            answer.is_empty() || status(&answer) == 503,
            "a connection beyond the limit was answered: {answer}"
        );
    }
    drop(flood);
    drop(open);
    // Once they are gone the daemon serves again.
    wait_for("the daemon to serve again", ANSWER, || {
        status(&exchange(unix(&d), LIST)) == 200
    });
    assert_serving(&d);
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_the_daemon_backs_off_instead_of_spinning() {
    // 40 descriptors: fewer than the (minimum) 16 connections plus what the daemon holds, so
    // accept() hits EMFILE before the connection limit.
    let d = Daemon::start_limited(&[], Some(40));
    let pid = d.child.as_ref().unwrap().id();
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = UnixStream::connect(d.socket()) {
            held.push(s);
        }
    }
    wait_for("the daemon to report EMFILE", ANSWER, || {
        d.log().contains("pausing new connections")
    });
    // While descriptors stay exhausted the accept loop sleeps between tries: over a second it
    // uses a small fraction of a second of CPU (a spin would use all of it).
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    assert!(
        used * 2 < hz,
        "the daemon used {used} of {hz} ticks in a second: it spins on accept"
    );
    drop(held);
    wait_for("the daemon to serve again", ANSWER, || {
        status(&exchange(unix(&d), LIST)) == 200
    });
    assert_serving(&d);
}

#[test]
fn slow_senders_and_idle_connections_are_cut_off() {
    let d = Daemon::start_with(&["--read-timeout", "1"]);
    // Idle: connect and send nothing.
    let mut idle = unix(&d);
    // Headers one byte at a time, a byte every 200 ms: never finished within the timeout.
    let slow = unix(&d);
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in b"GET /v1/domains HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain([b'a'; 400].iter())
        {
            if writer.write_all(&[*b]).is_err() {
                return true; // the daemon closed the connection
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });
    // A body announced and never finished.
    let mut slow_body = unix(&d);
    slow_body
        .write_all(
            b"PUT /v1/domains/x/autostart HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        )
        .unwrap();
    // Meanwhile the daemon serves others.
    assert_serving(&d);
    // The idle one is closed without an answer, the slow header sender is cut off, the slow
    // body gets a 408.
    let mut buf = [0u8; 256];
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0, "idle connection kept");
    assert!(trickle.join().unwrap(), "the slow sender was never cut off");
    let answer = exchange(&mut slow_body, b"");
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert_serving(&d);
}

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// One randomized, mostly malformed request.
fn fuzz_request(rng: &mut Rng) -> Vec<u8> {
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "G\0T", "", "GET GET", "\u{7f}",
    ];
    let paths = [
        "/v1/version",
        "/v1/domains",
        "/v1/domains/x",
        "/v1/domains/%ff%fe/start",
        "/v1/domains/x/console",
        "/v1/networks",
        "/v1/pools/default/volumes",
        "/v1/domains/..%2f..%2fetc/xml",
        "*",
        "/%",
        "http://x/v1/domains",
        "/v1/domains?all=%zz&&=&",
    ];
    let versions = [
        "HTTP/1.1",
        "HTTP/1.0",
        "HTTP/2.0",
        "HTTP/9",
        "",
        "HTTP/1.1 extra",
    ];
    let headers = [
        "Host: x",
        "Content-Length: 5",
        "Content-Length: -1",
        "Content-Length: 18446744073709551616",
        "Content-Length: 3, 4",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: identity",
        "Content-Type: application/xml",
        "Content-Type: application/json",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Expect: 100-continue",
        "X-Bad\0Name: v",
        ": no name",
        "NoColon",
        " folded: line",
    ];
    let bodies = [
        "",
        "{}",
        "<domain type='test'><name>fz</name><memory>1</memory>",
        "5\r\nhello\r\n0\r\n\r\n",
        "ffffffffffffffffff\r\n",
        "10\r\nshort\r\n",
        "0\r\n\r\n",
        "-1\r\n",
        "\u{0}\u{1}\u{2}\u{ff}",
        "name = \"fz\"\nmemory = 1",
    ];
    let mut req = String::new();
    req.push_str(rng.pick(&methods));
    req.push_str([" ", "  ", "\t", ""][rng.below(4)]);
    req.push_str(rng.pick(&paths));
    req.push(' ');
    req.push_str(rng.pick(&versions));
    req.push_str(["\r\n", "\n", "\r", ""][rng.below(4)]);
    for _ in 0..rng.below(6) {
        req.push_str(rng.pick(&headers));
        req.push_str(["\r\n", "\n"][rng.below(2)]);
    }
    req.push_str(["\r\n", "\n", ""][rng.below(3)]);
    req.push_str(rng.pick(&bodies));
    let mut bytes = req.into_bytes();
    // Flip, insert or cut a few bytes.
    for _ in 0..rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        match rng.below(3) {
            0 => bytes[at] = rng.next() as u8,
            1 => bytes.insert(at, rng.next() as u8),
            _ => bytes.truncate(at),
        }
    }
    bytes
}

#[test]
fn randomized_malformed_requests_never_take_the_daemon_down() {
    let seed = ferrovirt_testkit::seed_from_env("FERROVIRT_FUZZ_SEED");
    let count = ferrovirt_testkit::count_from_env("FERROVIRT_FUZZ_COUNT", 300);
    eprintln!("fuzz seed {seed} ({count} requests; rerun with FERROVIRT_FUZZ_SEED={seed})");
    let d = Daemon::start_with(&["--read-timeout", "1"]);
    let pid = d.child.as_ref().unwrap().id();
    let mut rng = Rng(seed);
    for i in 0..count {
        let req = fuzz_request(&mut rng);
        let s = unix(&d);
        // A request the daemon still waits on ends at its read timeout; do not wait longer.
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = exchange(s, &req);
        if i % 50 == 49 {
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "seed {seed}: the daemon died at request {i}: {:?}\n{}",
                String::from_utf8_lossy(&req),
                d.log()
            );
            assert_serving_or_seed(&d, seed, i);
        }
    }
    assert_serving_or_seed(&d, seed, count);
    assert!(!d.log().contains("panicked"), "seed {seed}: {}", d.log());
}

fn assert_serving_or_seed(d: &Daemon, seed: u64, i: usize) {
    // Fuzzed definitions may have defined domains: only the answer matters here.
    let answer = exchange(unix(d), LIST);
    assert_eq!(
        status(&answer),
        200,
        "seed {seed}: no answer after request {i}: {answer}\n{}",
        d.log()
    );
}

#[test]
fn console_routes_refuse_bad_upgrades_with_clear_errors() {
    let d = Daemon::start();
    let kernel = d.file("vmlinuz", "the test driver does not boot it");
    let def = format!(
        "name = \"t\"\ntype = \"test\"\nmemory_mib = 64\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    d.client()
        .define(&def, ferrovirt_api::client::DefFormat::Toml, false)
        .unwrap();
    // GET without a WebSocket upgrade.
    let answer = exchange(
        unix(&d),
        b"GET /v1/domains/t/console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&answer), 400, "{answer}");
    assert!(answer.contains("Upgrade: websocket"), "{answer}");
    // A proper WebSocket handshake on a domain without a console: the driver's error.
    let answer = exchange(
        unix(&d),
        b"GET /v1/domains/t/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(
        answer.contains("\"operation_invalid\"") || answer.contains("\"not_supported\""),
        "{answer}"
    );
    let answer = exchange(
        unix(&d),
        b"GET /v1/domains/nope/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(status(&answer), 404, "{answer}");
    assert_serving_defined(&d);
}

fn assert_serving_defined(d: &Daemon) {
    let answer = exchange(
        unix(d),
        b"GET /v1/domains?all=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.contains("\"t\""), "{answer}");
}

#[test]
fn a_client_that_closes_its_side_after_the_request_still_gets_the_answer() {
    // As `printf 'GET /v1/domains ...' | nc -U SOCKET` does.
    let d = Daemon::start();
    let mut s = unix(&d);
    s.write_all(LIST).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert_eq!(status(&answer), 200, "{answer}");
    assert_serving(&d);
}
