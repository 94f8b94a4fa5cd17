//! Shared helpers for end-to-end tests: a real ferrovirtd in a temporary folder.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrovirt_api::client::{Client, ClientError, DefFormat};
use ferrovirt_api::DomainOp;
use ferrovirt_api::ErrorCode;
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) for the daemon process, if set.
    pub fd_limit: Option<u64>,
    /// Run the daemon in a network namespace of its own (for tests that make bridges/TAPs).
    pub own_netns: bool,
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
        Self::start_limited(extra, None)
    }

    /// Start with extra arguments and, if given, this file descriptor limit.
    pub fn start_limited(extra: &[&str], fd_limit: Option<u64>) -> Daemon {
        Self::start_full(extra, fd_limit, false)
    }

    fn start_full(extra: &[&str], fd_limit: Option<u64>, own_netns: bool) -> Daemon {
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
            fd_limit,
            own_netns,
        };
        d.spawn();
        d
    }

    /// A daemon in a fresh network namespace of its own (gone with it).
    pub fn start_in_own_netns() -> Daemon {
        Self::start_full(&[], None, true)
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
        let mut cmd = Command::new(daemon_binary());
        let (fd_limit, own_netns) = (self.fd_limit, self.own_netns);
        if fd_limit.is_some() || own_netns {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit, unshare and mount (async-signal-safe) run between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(n) = fd_limit {
                        let rl = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    // As `ip netns exec` does: a /sys that shows this namespace's devices.
                    if own_netns
                        && (libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0
                            || libc::mount(
                                std::ptr::null(),
                                c"/".as_ptr(),
                                std::ptr::null(),
                                libc::MS_REC | libc::MS_PRIVATE,
                                std::ptr::null(),
                            ) != 0
                            || libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) != 0
                            || libc::mount(
                                c"sysfs".as_ptr(),
                                c"/sys".as_ptr(),
                                c"sysfs".as_ptr(),
                                0,
                                std::ptr::null(),
                            ) != 0)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
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

// The TCP/TLS listener: token file, listener address, test certificates.

pub const TOKEN: &str = "s3cret-token-for-tests-0123456789";

pub fn token_file(mode: u32) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("fv-token-{}-{n}-{mode:o}", std::process::id()));
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// The address of the daemon's plain TCP listener, from its log.
pub fn tcp_addr(d: &Daemon) -> String {
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

pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output_within(TOOL_TIMEOUT)
        .expect("openssl is needed to make test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it; returns (ca cert, server cert, server key).
pub fn certificates(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let p = |f: &str| {
        dir.join(format!("{name}-{f}"))
            .to_string_lossy()
            .into_owned()
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=ferrovirt test CA",
    ];
    ca.extend(ec);
    let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    openssl(&ca);
    let (key, csr, crt, ext) = (
        p("server.key"),
        p("server.csr"),
        p("server.crt"),
        p("server.ext"),
    );
    let mut req = vec!["req", "-subj", "/CN=127.0.0.1"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr]);
    openssl(&req);
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "1",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-extfile",
        &ext,
        "-out",
        &crt,
    ]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (ca_crt.into(), crt.into(), key.into())
}
