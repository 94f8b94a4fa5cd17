//! The HTTP APIs as a local client can hit them: raw request bytes to a real ferrovirtd process
//! (test driver, no default network, in a network namespace of its own) and to a real ferrovmm
//! running a tiny guest (its control API on `--api-socket`). After each input the server must
//! still answer a valid request; a ferrovmm that exited must have exited cleanly (an input may
//! legitimately `PUT /vm/stop`), and is started again.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::engine::{Outcome, Target};

const HTTP_DICT: &[&[u8]] = &[
    b"GET ",
    b"PUT ",
    b"POST ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n",
    b" HTTP/2.0\r\n",
    b"\r\n",
    b"\r\n\r\n",
    b"Host: x\r\n",
    b"Content-Length: ",
    b"Content-Length: 18446744073709551616\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"ffffffffffffffff\r\n",
    b"0\r\n\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Expect: 100-continue\r\n",
    b"Content-Type: application/json\r\n",
    b"Content-Type: application/xml\r\n",
    b"Content-Type: application/toml\r\n",
    b"Authorization: Bearer x\r\n",
    b"/vm",
    b"/vm/pause",
    b"/vm/resume",
    b"/vm/counters",
    b"/vm/power-button",
    b"/vm/stop",
    b"/vm/reset",
    b"/v1/version",
    b"/v1/domains",
    b"/v1/domains/fz",
    b"/v1/domains/fz/xml",
    b"/v1/networks",
    b"/v1/events",
    b"?format=toml",
    b"?format=xml",
    b"%00",
    b"%2f..%2f",
    b"/../../",
    b"{\"name\":\"fz\",\"memory_kib\":65536}",
    b"<domain type='test'><name>fz</name></domain>",
];

pub const FERROVIRTD_RAW: Target = Target {
    name: "ferrovirtd_http",
    dict: HTTP_DICT,
    max_len: 16 << 10,
};
pub const FERROVIRTD_JSON: Target = Target {
    name: "ferrovirtd_json",
    dict: crate::targets::definitions::JSON_DICT,
    max_len: 16 << 10,
};
pub const FERROVMM_RAW: Target = Target {
    name: "ferrovmm_api",
    dict: HTTP_DICT,
    max_len: 16 << 10,
};

/// The workspace's binaries sit next to the test binary's folder (target/debug/deps/..).
pub(crate) fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target folder");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p {})",
        p.display(),
        match name {
            "ferrovmm" => "ferrovmm",
            "ferrovirt" => "ferrovirt",
            _ => "ferrovirtd",
        }
    );
    p
}

pub(crate) fn wait_for_socket(p: &Path, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(p).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before serving its socket: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not serve {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `bytes` while reading whatever comes back (so a server that answers as it reads never
/// blocks on us), half-closes, and returns the response (bounded in size and time).
pub(crate) fn exchange(sock: &Path, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    talk(sock, bytes, wait, true)
}

/// Like [`exchange`] without the half-close: hyper takes a client's EOF as the client leaving
/// (and answers nothing), so for ferrovirtd the connection stays open until the server closes
/// it or nothing came for `wait`.
pub(crate) fn exchange_open(sock: &Path, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    talk(sock, bytes, wait, false)
}

fn talk(sock: &Path, bytes: &[u8], wait: Duration, half_close: bool) -> Option<Vec<u8>> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut r = s.try_clone().ok()?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while out.len() < (4 << 20) {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        out
    });
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    reader.join().ok()
}

/// A well-formed request that must get a 200.
fn healthy(sock: &Path, path: &str) -> Result<(), String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let resp = exchange_open(sock, req.as_bytes(), Duration::from_secs(20))
        .ok_or_else(|| "cannot connect".to_string())?;
    let text = String::from_utf8_lossy(&resp);
    if text.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("GET {path} answered: {:.200}", text))
    }
}

/// Inputs must not make the daemon start VMs or networks (QEMU processes, dnsmasq) or make
/// volumes: every "start", "create" and "pools" is defused. What remains is the parser, routing and the handlers.
fn defuse(input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for w in [&b"start"[..], b"create", b"START", b"Start", b"pools"] {
        let mut i = 0;
        while i + w.len() <= v.len() {
            if &v[i..i + w.len()] == w {
                v[i + 2] = b'x';
            }
            i += 1;
        }
    }
    v
}

pub struct DaemonTarget {
    dir: tempfile::TempDir,
    child: Child,
}

impl DaemonTarget {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrovirt-fuzz-http-")
            .tempdir()
            .expect("a scratch folder");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        // A network namespace of its own: nothing an input does can touch the host's network.
        let mut child = Command::new("unshare")
            .arg("--net")
            .arg(binary("ferrovirtd"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .env("FERROVIRT_NO_DEFAULT_NETWORK", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("unshare --net ferrovirtd");
        wait_for_socket(
            &dir.path().join("run/ferrovirtd.sock"),
            &mut child,
            "ferrovirtd",
        );
        DaemonTarget { dir, child }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("run/ferrovirtd.sock")
    }

    pub fn one(&mut self, input: &[u8]) -> Outcome {
        // Bytes the server is still waiting on would hold the connection until its header
        // timeout: give up after a short silence instead.
        let _ = exchange_open(&self.sock(), &defuse(input), Duration::from_millis(25));
        if let Err(e) = healthy(&self.sock(), "/v1/version") {
            let status = self.child.try_wait().ok().flatten();
            let log =
                std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
            panic!(
                "ferrovirtd no longer answers ({e}); exit status {status:?}; log tail:\n{}",
                &log[log.len().saturating_sub(2000)..]
            );
        }
        Outcome::Accepted
    }
}

/// Where a JSON body goes: the first input byte picks one, the rest is the body.
const JSON_ENDPOINTS: &[(&str, &str)] = &[
    ("POST", "/v1/domains"),
    ("POST", "/v1/networks"),
    ("PUT", "/v1/domains/fz/autostart"),
    ("PUT", "/v1/domains/fz/memory"),
    ("PUT", "/v1/domains/fz/vcpus"),
    ("PUT", "/v1/networks/fz/autostart"),
    ("POST", "/v1/domains/fz/shutdown"),
    ("POST", "/v1/domains/fz/suspend"),
    ("POST", "/v1/domains/fz/destroy"),
    ("DELETE", "/v1/domains/fz/job"),
];

impl DaemonTarget {
    /// A JSON body to one of the handlers, then the emitters on whatever got defined.
    pub fn json(&mut self, input: &[u8]) -> Outcome {
        let Some((&pick, body)) = input.split_first() else {
            return Outcome::Rejected;
        };
        let (method, path) = JSON_ENDPOINTS[usize::from(pick) % JSON_ENDPOINTS.len()];
        let body = defuse(body);
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let resp = exchange_open(&self.sock(), &req, Duration::from_secs(5)).unwrap_or_default();
        let accepted = resp.starts_with(b"HTTP/1.1 2");
        for get in [
            "/v1/domains/fz/xml",
            "/v1/domains/fz/definition?format=toml",
            "/v1/domains/fz/definition",
            "/v1/networks/fz/xml",
            "/v1/networks/fz/definition?format=toml",
        ] {
            let req = format!("GET {get} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let _ = exchange_open(&self.sock(), req.as_bytes(), Duration::from_secs(5));
        }
        for del in ["/v1/domains/fz", "/v1/networks/fz"] {
            let req = format!("DELETE {del} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let _ = exchange_open(&self.sock(), req.as_bytes(), Duration::from_secs(5));
        }
        self.one(b"");
        if accepted {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        }
    }
}

impl Drop for DaemonTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny PVH guest that halts forever (hlt; jmp back), costing no CPU.
fn halting_kernel(dir: &Path) -> PathBuf {
    use ferrovirt_testkit::image::{elf, Segment};
    const BASE: u64 = 0x10_0000;
    let image = elf(
        &[Segment {
            addr: BASE,
            data: vec![0xfa, 0xf4, 0xeb, 0xfd], // cli; hlt; jmp hlt
        }],
        BASE,
        Some(BASE as u32),
    );
    let p = dir.join("halt.elf");
    std::fs::write(&p, image).expect("write the guest");
    p
}

pub struct VmmTarget {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    child: Child,
}

impl VmmTarget {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrovirt-fuzz-vmm-")
            .tempdir()
            .expect("a scratch folder");
        let kernel = halting_kernel(dir.path());
        let child = Self::spawn(dir.path(), &kernel);
        VmmTarget { dir, kernel, child }
    }

    fn spawn(dir: &Path, kernel: &Path) -> Child {
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
        let mut child = Command::new(binary("ferrovmm"))
            .args(["--name", "fuzz", "--memory", "16", "--serial", "none"])
            .arg("--kernel")
            .arg(kernel)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--exit-file")
            .arg(dir.join("exit.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferrovmm");
        wait_for_socket(&sock, &mut child, "ferrovmm");
        child
    }

    /// Its control API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    pub fn one(&mut self, input: &[u8]) -> Outcome {
        let sock = self.socket();
        let _ = exchange(&sock, input, Duration::from_secs(2));
        if healthy(&sock, "/vm").is_ok() {
            return Outcome::Accepted;
        }
        // Ended: only a clean end an API request asks for is acceptable (stop, reset).
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("ferrovmm runs but its API no longer answers GET /vm");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let record = std::fs::read_to_string(self.dir.path().join("exit.json")).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.path().join("vmm.log")).unwrap_or_default();
        assert!(
            status.success() && (record.contains("\"stopped\"") || record.contains("\"reset\"")),
            "ferrovmm ended after an API request: {status}, exit record {record}, log:\n{log}"
        );
        let _ = std::fs::remove_file(self.dir.path().join("exit.json"));
        self.child = Self::spawn(self.dir.path(), &self.kernel);
        Outcome::Rejected
    }
}

impl Drop for VmmTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
