//! Shared helpers for end-to-end tests: a real ferrovirtd in a temporary folder.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrovirt_api::client::{Client, ClientError, DefFormat};
use ferrovirt_api::DomainOp;
use ferrovirt_api::ErrorCode;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
}

pub fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovirtd"))
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Start with extra command-line arguments; `{dir}` in them is replaced by the test folder.
    pub fn start_with(extra: &[&str]) -> Daemon {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Short paths: Unix socket paths are limited to 108 bytes.
        let dir = PathBuf::from(format!("/tmp/fvd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let extra_args = extra
            .iter()
            .map(|a| a.replace("{dir}", &dir.to_string_lossy()))
            .collect();
        let mut d = Daemon {
            dir,
            child: None,
            extra_args,
        };
        d.spawn();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("ferrovirtd.sock")
    }
    pub fn client(&self) -> Client {
        Client::new(self.socket())
    }

    /// Start (or restart) the daemon process and wait until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log");
        let child = Command::new(daemon_binary())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .args(&self.extra_args)
            // Tests run on the host: no default network (bridge, NAT) there.
            .env("FERROVIRT_NO_DEFAULT_NETWORK", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferrovirtd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.client().version().is_err() {
            assert!(
                Instant::now() < deadline,
                "ferrovirtd did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9 the daemon (VMs must survive).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Write a file into the test folder and return its path.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, content).expect("write");
        p
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Take every VM down so no test leaves QEMU processes behind.
        if self.child.is_some() {
            let c = self.client();
            if let Ok(doms) = c.list(false) {
                for d in doms {
                    let _ = c.action(&d.name, DomainOp::Destroy);
                }
            }
        }
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The API error code of a failed call.
pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api(e)) => e.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The domain `until_subscribed` defines and undefines; tests skip its events.
pub const PROBE: &str = "events-probe";

/// Wait until a new event subscription is live: define and undefine a probe domain (test driver)
/// until `seen_probe` (waiting at most the given time) reports one of its events, instead of
/// guessing how long subscribing takes.
pub fn until_subscribed(d: &Daemon, c: &Client, mut seen_probe: impl FnMut(Duration) -> bool) {
    let kernel = d.file(
        "probe-kernel",
        "not a kernel: the test driver boots nothing",
    );
    let def = format!(
        "name = \"{PROBE}\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n",
        kernel.display()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.define(&def, DefFormat::Toml, false)
            .expect("define the probe");
        c.undefine(PROBE).expect("undefine the probe");
        if seen_probe(Duration::from_millis(100)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the event subscription never saw the probe domain"
        );
    }
}
