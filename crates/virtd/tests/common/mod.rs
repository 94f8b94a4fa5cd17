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

/// Type a shell command on a guest's live console (re-sent now and then: keystrokes typed while
/// the shell starts can be lost) until `expect` appears in the output; returns the output.
pub fn console_roundtrip(c: &Client, name: &str, command: &str, expect: &str) -> String {
    console_until(c, name, command, expect, |seen| seen.contains(expect))
}

/// The same, until `done` says the output (the terminal's echo of the command included) has
/// what the caller waits for, described by `what`.
pub fn console_until(
    c: &Client,
    name: &str,
    command: &str,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    use std::io::{Read, Write};
    let mut conn = c.console(name, false).expect("attach console");
    conn.set_read_timeout(Some(Duration::from_millis(500)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    let mut last_send = Instant::now() - Duration::from_secs(10);
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "no {what} on the console; got: {seen}"
        );
        if last_send.elapsed() > Duration::from_secs(3) {
            conn.write_all(format!("{command}\n").as_bytes()).unwrap();
            last_send = Instant::now();
        }
        let mut buf = [0u8; 4096];
        if let Ok(n) = conn.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    seen
}

// The qemu driver's test guest (guest/make-test-guest.sh).

/// How long a TCG guest may take to reach its init.
pub const BOOT: Duration = Duration::from_secs(90);

/// A qemu-driver (TCG) definition of the test guest; `extra` goes into the TOML.
pub fn qemu_def(name: &str, cmdline_extra: &str, extra: &str) -> String {
    let (kernel, initrd) = ferrovirt_testkit::qemu_test_guest();
    format!(
        "name = \"{name}\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 192\n{extra}\n[os]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet no_timer_check {cmdline_extra}\"\n",
        kernel.display(),
        initrd.display()
    )
}

pub fn console_log(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(d.state_dir().join("logs").join(format!("{name}.log")))
        .unwrap_or_default()
}

pub fn wait_booted(d: &Daemon, name: &str) {
    wait_for("the guest's init banner in the console log", BOOT, || {
        console_log(d, name).contains("FERROVIRT-GUEST-UP")
    });
}

/// The process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// QEMU's own view of the VM (`query-status`), asked on its QMP socket.
pub fn qmp_status(d: &Daemon, name: &str) -> String {
    use std::io::{BufRead, Write};
    let sock = d.run_dir().join("vms").join(name).join("qmp.sock");
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
        .unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(status) = v.pointer("/return/status") {
            return status.as_str().unwrap().to_string();
        }
    }
}

/// A tmpfs of `size` mounted for the test (the save target that runs out of space).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status_within(TOOL_TIMEOUT)
            .expect("run mount");
        assert!(st.success(), "mounting a small tmpfs needs root");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.0)
            .status_within(TOOL_TIMEOUT);
        let _ = std::fs::remove_dir(&self.0);
    }
}
