//! A ferrovmm process under test with its API socket and live console output.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub struct LiveVm {
    pub child: Child,
    pub api: PathBuf,
    pub output: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    /// Each pipe reader says here when it reached the end of its pipe.
    drained: mpsc::Receiver<()>,
}

/// Copy a pipe into `into` until its end, then report on `done`.
fn collect<R: Read + Send + 'static>(mut r: R, into: Arc<Mutex<String>>, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let _ = done.send(());
    });
}

impl LiveVm {
    pub fn start(kernel: &Path, api: &Path, extra: &[&str]) -> Self {
        let child = Command::new(super::ferrovmm_bin())
            .args([
                "--name",
                "live",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "32",
            ])
            .args(["--api-socket", api.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferrovmm");
        Self::attach(child, api)
    }

    /// Follows an already started ferrovmm (stdout and stderr piped) with its API on `api`.
    pub fn attach(mut child: Child, api: &Path) -> Self {
        let output = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (done, drained) = mpsc::channel();
        collect(child.stdout.take().unwrap(), output.clone(), done.clone());
        collect(child.stderr.take().unwrap(), stderr.clone(), done);
        let vm = LiveVm {
            child,
            api: api.to_path_buf(),
            output,
            stderr,
            drained,
        };
        vm.wait_for(|| vm.api.exists(), "the API socket");
        vm
    }

    pub fn wait_for(&self, mut cond: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; output: {} stderr: {}",
                self.output(),
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn wait_for_output(&self, text: &str) {
        self.wait_for(|| self.output().contains(text), text);
    }

    /// Sends one request; returns status code and body.
    pub fn request(&self, raw: &str) -> (u16, String) {
        http(&self.api, raw)
    }

    pub fn api(&self, method: &str, path: &str) -> (u16, String) {
        self.request(&format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
    }

    pub fn finish(mut self) -> super::Run {
        let (child, output, stderr) = (&mut self.child, self.output.clone(), self.stderr.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferrovmm did not exit; stderr: {}", stderr.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Both pipes read to their end (no helper process may keep them open).
        for pipe in ["stdout", "stderr"] {
            self.drained
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("ferrovmm's {pipe} stayed open after it exited"));
        }
        let stdout = output.lock().unwrap().clone();
        let stderr = stderr.lock().unwrap().clone();
        super::Run {
            status: status.code().unwrap_or(-1),
            stdout,
            stderr,
        }
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP/1.1 exchange over a Unix socket.
pub fn http(socket: &Path, raw: &str) -> (u16, String) {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        // Status 0: the caller's assertion says what the VM printed.
        Err(e) => return (0, format!("cannot connect to {}: {e}", socket.display())),
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}
