//! End-to-end tests of the ferrovirt CLI against a real ferrovirtd (test and qemu drivers).

use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn cli_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovirt"))
}

fn daemon_binary() -> PathBuf {
    let p = cli_binary().with_file_name("ferrovirtd");
    assert!(
        p.is_file(),
        "{} is missing: build the daemon first (cargo build -p ferrovirtd)",
        p.display()
    );
    p
}

struct Env {
    dir: PathBuf,
    daemon: Child,
}

impl Env {
    fn start() -> Env {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/fvc-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let daemon = Command::new(daemon_binary())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            // Tests run on the host: no default network (bridge, NAT) there.
            .env("FERROVIRT_NO_DEFAULT_NETWORK", "1")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let env = Env { dir, daemon };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !env.socket().exists() {
            assert!(Instant::now() < deadline, "ferrovirtd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        env
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/ferrovirtd.sock")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cli_binary());
        c.env("FERROVIRT_SOCKET", self.socket()).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output_within(TOOL_TIMEOUT)
            .unwrap()
    }

    /// Run and require success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferrovirt {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "ferrovirt {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn kernel(&self) -> String {
        self.file("vmlinuz", "fake kernel for the test driver")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(out) = self.cmd(&["--json", "list"]).output_within(TOOL_TIMEOUT) {
            if let Ok(doms) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) {
                for d in doms {
                    let _ = self.run(&["destroy", d["name"].as_str().unwrap_or("")]);
                }
            }
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn virsh_verbs_and_output_shapes() {
    let e = Env::start();
    let def = e.file(
        "web.toml",
        &format!(
            "name = \"web\"\ntype = \"test\"\nmemory_mib = 256\n[os]\nkernel = \"{}\"\n",
            e.kernel()
        ),
    );
    assert_eq!(
        e.ok(&["define", &def]),
        format!("Domain 'web' defined from {def}\n\n")
    );
    assert_eq!(
        e.ok(&["list"]),
        " Id   Name   State\n--------------------\n\n"
    );
    assert_eq!(
        e.ok(&["list", "--all"]),
        " Id   Name   State\n-----------------------\n -    web    shut off\n\n"
    );
    assert_eq!(e.ok(&["start", "web"]), "Domain 'web' started\n\n");
    assert_eq!(e.ok(&["domstate", "web"]), "running\n\n");
    assert_eq!(
        e.ok(&["domstate", "--reason", "web"]),
        "running (booted)\n\n"
    );
    let info = e.ok(&["dominfo", "web"]);
    assert!(info.contains("Name:           web\n"), "{info}");
    assert!(info.contains("Max memory:     262144 KiB\n"), "{info}");
    assert!(info.contains("Engine:         test\n"), "{info}");
    assert!(info.contains("State:          running\n"), "{info}");
    assert_eq!(e.ok(&["suspend", "web"]), "Domain 'web' suspended\n\n");
    assert_eq!(e.ok(&["domstate", "--reason", "web"]), "paused (user)\n\n");
    assert_eq!(e.ok(&["resume", "web"]), "Domain 'web' resumed\n\n");
    assert_eq!(
        e.ok(&["autostart", "web"]),
        "Domain 'web' marked as autostarted\n\n"
    );
    assert!(e.ok(&["dominfo", "web"]).contains("Autostart:      enable"));
    assert_eq!(
        e.ok(&["autostart", "--disable", "web"]),
        "Domain 'web' unmarked as autostarted\n\n"
    );
    assert!(e
        .ok(&["setmem", "web", "512M", "--config"])
        .contains("524288 KiB"));
    e.ok(&["setvcpus", "web", "2", "--config"]);
    let xml = e.ok(&["dumpxml", "web"]);
    assert!(
        xml.contains("<memory unit='KiB'>524288</memory>") && xml.contains(">2</vcpu>"),
        "{xml}"
    );
    // Memory is kept in KiB exactly, not rounded to MiB.
    assert!(e
        .ok(&["setmem", "web", "219100", "--config"])
        .contains("219100 KiB"));
    assert!(e
        .ok(&["dominfo", "web"])
        .contains("Max memory:     219100 KiB\n"));
    assert!(e
        .ok(&["dumpxml", "web"])
        .contains("<memory unit='KiB'>219100</memory>"));
    let list: Vec<serde_json::Value> = serde_json::from_str(&e.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "running");
    assert_eq!(
        e.ok(&["shutdown", "web"]),
        "Domain 'web' is being shutdown\n\n"
    );
    assert_eq!(
        e.ok(&["domstate", "--reason", "web"]),
        "shut off (shutdown)\n\n"
    );
    // -c wins over the environment.
    let out = Command::new(cli_binary())
        .env("FERROVIRT_SOCKET", "/nonexistent.sock")
        .args(["-c"])
        .arg(e.socket())
        .args(["list", "--all"])
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));
    assert_eq!(
        e.ok(&["undefine", "web"]),
        "Domain 'web' has been undefined\n\n"
    );
    let v = e.ok(&["version"]);
    assert!(
        v.contains("Running daemon: ferrovirtd") && v.contains("Default driver:"),
        "{v}"
    );
}

#[test]
fn errors_are_one_clear_line_with_a_code_and_exit_1() {
    let e = Env::start();
    // Every error below: exactly one line on stderr.
    let one_line = |err: String| -> String {
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
        err
    };
    let err = one_line(e.fails(&["start", "ghost"]));
    assert!(
        err.starts_with("error: domain 'ghost' not found") && err.contains("[no_domain]"),
        "{err}"
    );
    let bad = e.file("bad.xml", "<domain><name>x</domain>");
    assert!(one_line(e.fails(&["define", &bad])).contains("[malformed_body]"));
    let zero = e.file(
        "zero.toml",
        &format!(
            "name = \"z\"\ntype = \"test\"\nmemory_mib = 0\n[os]\nkernel = \"{}\"\n",
            e.kernel()
        ),
    );
    let err = one_line(e.fails(&["define", &zero]));
    assert!(
        err.contains("memory") && err.contains("[invalid_definition]"),
        "{err}"
    );
    assert!(one_line(e.fails(&["define", "/nonexistent.toml"]))
        .contains("cannot read /nonexistent.toml"));
    let out = Command::new(cli_binary())
        .args(["-c", "/tmp/no-such-ferrovirtd.sock", "list"])
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_line(String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(
        err.contains("cannot talk to ferrovirtd at /tmp/no-such-ferrovirtd.sock")
            && err.contains("is the daemon running"),
        "{err}"
    );
    assert!(one_line(e.fails(&["setmem", "x", "12Q", "--config"])).contains("unknown size unit"));
}

/// What a user sees of the engine behind type='kvm': dominfo's Engine lines, and on a host
/// without hardware virtualization a start refused with the way out (type 'qemu').
#[test]
fn dominfo_shows_the_engine_and_a_kvm_start_without_hardware_names_type_qemu() {
    let e = Env::start();
    let def = e.file(
        "k.toml",
        &format!(
            "name = \"k\"\ntype = \"kvm\"\nmemory = \"219100KiB\"\n[os]\nkernel = \"{}\"\n",
            e.kernel()
        ),
    );
    e.ok(&["define", &def]);
    let info = e.ok(&["dominfo", "k"]);
    assert!(info.contains("Engine:         ferrovmm\n"), "{info}");
    assert!(
        info.contains("Engine reason:  type 'kvm' and ferrovmm supports everything"),
        "{info}"
    );
    assert!(info.contains("Max memory:     219100 KiB\n"), "{info}");
    if ferrovirt_api::host::HostVirt::probe().hardware_kvm() {
        return;
    }
    assert!(
        info.contains("Cannot start:   type 'kvm' needs hardware virtualization"),
        "{info}"
    );
    let err = e.fails(&["start", "k"]);
    assert!(
        err.contains("hardware virtualization")
            && err.contains("type 'qemu'")
            && err.contains("[not_supported]"),
        "{err}"
    );
    assert_eq!(e.ok(&["domstate", "k"]), "shut off\n\n");
}

#[test]
fn install_accepts_virt_install_options_and_creates_thin_volumes() {
    let e = Env::start();
    let images = e.dir.join("state/images");
    // The seed's exact line: type kvm with a CD-ROM and graphics is for QEMU with accel=kvm; on
    // a host without hardware virtualization install says so before creating anything.
    let seed = [
        "install",
        "--virt-type=kvm",
        "--name=CentOSVM",
        "--ram",
        "4096",
        "--vcpus",
        "2",
        "--os-variant=rhel8.3",
        "--cdrom=/path/to.iso",
        "--network=default",
        "--graphics",
        "vnc",
        "--disk",
        "size=16",
    ];
    let err = e.fails(&seed);
    if !ferrovirt_api::host::HostVirt::probe().hardware_kvm() {
        assert!(
            err.contains("hardware virtualization")
                && err.contains("type 'qemu'")
                && err.contains("[not_supported]"),
            "{err}"
        );
    }
    assert!(
        std::fs::read_dir(&images)
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "a volume was left behind"
    );
    // With the qemu driver the missing 'default' network is the error.
    let iso = e.file("to.iso", "");
    let mut qemu_seed: Vec<&str> = seed
        .iter()
        .copied()
        .filter(|a| *a != "--virt-type=kvm")
        .collect();
    qemu_seed.iter_mut().for_each(|a| {
        if *a == "--cdrom=/path/to.iso" {
            *a = "--cdrom"
        }
    });
    let pos = qemu_seed.iter().position(|a| *a == "--cdrom").unwrap();
    qemu_seed.insert(pos + 1, &iso);
    let err = e.fails(&qemu_seed);
    assert!(
        err.contains("network 'default' not found") && err.contains("[no_network]"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(&images)
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "a volume was left behind"
    );

    // A working install (test driver), mixing both option forms.
    let kernel = e.kernel();
    let boot = format!("kernel={kernel},kernel_args=console=ttyS0 quiet no_timer_check");
    let out = e.ok(&[
        "install",
        "--name",
        "inst",
        "--memory=512",
        "--vcpus=2",
        "--virt-type",
        "test",
        "--boot",
        &boot,
        "--disk",
        "size=16",
        "--disk=size=0.5",
        "--network",
        "none",
        "--graphics=none",
        "--noautoconsole",
    ]);
    assert!(out.contains("Domain 'inst' started"), "{out}");
    let vol = images.join("inst.qcow2");
    assert!(
        std::fs::metadata(&vol).unwrap().len() < 1 << 20,
        "the 16 GiB volume is not thin"
    );
    let qi = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&vol)
        .output_within(TOOL_TIMEOUT)
        .expect("qemu-img");
    let info: serde_json::Value = serde_json::from_slice(&qi.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16u64 << 30);
    assert!(images.join("inst-1.qcow2").exists());
    let xml = e.ok(&["dumpxml", "inst"]);
    assert!(
        xml.contains("inst.qcow2")
            && xml.contains("<cmdline>console=ttyS0 quiet no_timer_check</cmdline>"),
        "{xml}"
    );
    assert_eq!(e.ok(&["domstate", "inst"]), "running\n\n");
    // Same name again: refused before any volume is made.
    let err = e.fails(&[
        "install",
        "--name",
        "inst",
        "--memory",
        "64",
        "--virt-type",
        "test",
        "--import",
        "--disk",
        "size=1",
        "--noautoconsole",
    ]);
    assert!(err.contains("[domain_exists]"), "{err}");
    let err = e.fails(&[
        "install",
        "--name",
        "x",
        "--memory",
        "64",
        "--virt-type",
        "test",
        "--import",
        "--disk",
        "path=/nonexistent.img",
    ]);
    assert!(
        err.contains("/nonexistent.img") && err.contains("size="),
        "{err}"
    );
    let err = e.fails(&[
        "install", "--name", "x", "--memory", "64", "--disk", "size=1",
    ]);
    assert!(err.contains("install method"), "{err}");
}

/// `ferrovirt event` running in the background, its stdout read line by line.
struct EventWatcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl EventWatcher {
    fn spawn(e: &Env, args: &[&str]) -> EventWatcher {
        let mut child = e.cmd(args).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                if line.map(|l| tx.send(l)).is_err() {
                    break;
                }
            }
        });
        EventWatcher {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (at most `within`) for a line containing `text`; true when it came.
    fn saw(&mut self, text: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.seen.iter().any(|l| l.contains(text)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return false,
            }
        }
    }

    /// Handshake: define and undefine a probe domain until its event is printed, so the
    /// subscription is known to be live (no guess of how long subscribing takes).
    fn until_subscribed(&mut self, e: &Env) {
        let probe = e.file(
            "probe.toml",
            &format!(
                "name = \"probe\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n",
                e.kernel()
            ),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.saw("for domain 'probe'", Duration::from_millis(100)) {
            assert!(
                Instant::now() < deadline,
                "event never saw the probe domain"
            );
            e.ok(&["define", &probe]);
            e.ok(&["undefine", "probe"]);
        }
    }
}

impl Drop for EventWatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn event_prints_lifecycle_events() {
    let e = Env::start();
    let mut ev = EventWatcher::spawn(&e, &["event", "--loop", "--timeout", "60"]);
    ev.until_subscribed(&e);
    let def = e.file(
        "ev.toml",
        &format!(
            "name = \"ev\"\ntype = \"test\"\n[os]\nkernel = \"{}\"\n",
            e.kernel()
        ),
    );
    e.ok(&["define", &def]);
    e.ok(&["start", "ev"]);
    e.ok(&["destroy", "ev"]);
    for line in [
        "event 'lifecycle' for domain 'ev': Defined Added",
        "event 'lifecycle' for domain 'ev': Started Booted",
        "event 'lifecycle' for domain 'ev': Stopped Destroyed",
    ] {
        assert!(
            ev.saw(line, Duration::from_secs(10)),
            "no '{line}' in {:?}",
            ev.seen
        );
    }
    // In the order they happened.
    let own: Vec<&String> = ev.seen.iter().filter(|l| l.contains("'ev'")).collect();
    assert_eq!(own.len(), 3, "{own:?}");
    assert!(own[0].contains("Defined") && own[1].contains("Started") && own[2].contains("Stopped"));

    // Without --loop: one event of the domain, then exit. Which one depends on when the
    // subscription became live (a filtered watcher cannot be probed): start and destroy until
    // it has one.
    let mut one = EventWatcher::spawn(&e, &["event", "--domain", "ev", "--timeout", "60"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while one.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "event --domain ev did not exit");
        e.ok(&["start", "ev"]);
        e.ok(&["destroy", "ev"]);
    }
    assert!(one.child.try_wait().unwrap().unwrap().success());
    assert!(
        one.saw("events received: 1", Duration::from_secs(5)),
        "{:?}",
        one.seen
    );
    let printed: Vec<&String> = one
        .seen
        .iter()
        .filter(|l| l.contains("event 'lifecycle'"))
        .collect();
    assert_eq!(printed.len(), 1, "{printed:?}");
    assert!(
        printed[0].contains("for domain 'ev': Started Booted")
            || printed[0].contains("for domain 'ev': Stopped Destroyed"),
        "{printed:?}"
    );
}

#[test]
fn host_validate_reports_every_check_as_the_host_is() {
    use std::os::unix::fs::FileTypeExt;
    let out = Command::new(cli_binary())
        .args(["-c", "/nonexistent/ferrovirtd.sock", "host-validate"])
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Each verdict as the test finds the host itself, independently of the product's probes.
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let kvm_dev = std::fs::metadata("/dev/kvm").is_ok_and(|m| m.file_type().is_char_device());
    let kvm_rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok();
    let qemu = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .any(|d| d.join("qemu-system-x86_64").is_file());
    let verdict = |ok: bool, bad: &'static str| if ok { "PASS" } else { bad };
    let mut expected = vec![
        ("hardware virtualization", verdict(hw, "WARN")),
        ("/dev/kvm exists", verdict(kvm_dev, "FAIL")),
        (
            "kvm modules loaded",
            verdict(
                ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
                    .iter()
                    .any(|m| module(m)),
                "FAIL",
            ),
        ),
        (
            "PVM nested virtualization",
            verdict(!module("kvm_pvm"), "WARN"),
        ),
        ("/dev/net/tun", verdict(tun, "WARN")),
        ("qemu-system-x86_64 present", verdict(qemu, "WARN")),
    ];
    if kvm_dev {
        expected.push(("/dev/kvm is accessible", verdict(kvm_rw, "FAIL")));
    }
    for (check, want) in expected {
        let line = text
            .lines()
            .find(|l| l.contains(check))
            .unwrap_or_else(|| panic!("no line for {check}: {text}"));
        assert!(line.contains(&format!(": {want} (")), "want {want}: {line}");
    }
    // Bridges and nftables are what this suite's network tests use: the host must have them.
    for check in ["bridge support", "nftables support"] {
        let line = text.lines().find(|l| l.contains(check)).unwrap();
        assert!(line.contains(": PASS ("), "{line}");
    }
    // Leftover network objects are checked exactly in crates/cli/tests/network.rs; here only
    // that the daemon's absence is no failure of the host.
    let leftovers = text
        .lines()
        .find(|l| l.contains("ferrovirt network leftovers"))
        .unwrap_or_else(|| panic!("no leftovers line: {text}"));
    assert!(!leftovers.contains(": FAIL"), "{leftovers}");
    let any_fail = text.contains(": FAIL");
    assert_eq!(out.status.success(), !any_fail);
}

/// The qemu-driver test guest, as strings for definitions and command lines.
fn guest() -> (String, String) {
    let (kernel, initrd) = ferrovirt_testkit::qemu_test_guest();
    (
        kernel.to_string_lossy().into_owned(),
        initrd.to_string_lossy().into_owned(),
    )
}

#[test]
fn install_with_qemu_attaches_the_console_and_ctrl_close_bracket_detaches() {
    let e = Env::start();
    let (kernel, initrd) = guest();
    let boot =
        format!("kernel={kernel},initrd={initrd},kernel_args=console=ttyS0 quiet no_timer_check");
    let mut child = e
        .cmd(&[
            "install",
            "--name",
            "con",
            "--memory",
            "192",
            "--virt-type",
            "qemu",
            "--boot",
            &boot,
            "--network",
            "none",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = e.dir.join("state/logs/con.log");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("FERROVIRT-GUEST-UP")
    {
        assert!(Instant::now() < deadline, "guest did not boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdin = child.stdin.take().unwrap();
    // Keystrokes can be lost while the shell starts: type until the answer shows up in the log.
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("sum-579")
    {
        assert!(Instant::now() < deadline, "no answer from the guest shell");
        stdin.write_all(b"echo sum-$((123+456))\n").unwrap();
        std::thread::sleep(Duration::from_millis(1000));
    }
    stdin.write_all(&[0x1d]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FERROVIRT-GUEST-UP"),
        "the replayed boot output is missing: {stdout}"
    );
    assert!(stdout.contains("sum-579"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Escape character is ^]"));
    // Detaching leaves the VM running.
    assert_eq!(e.ok(&["domstate", "con"]), "running\n\n");
}

fn iso_file(iso: &Path, file: &str) -> String {
    let out = Command::new("isoinfo")
        .args(["-R", "-x", file, "-i"])
        .arg(iso)
        .output_within(TOOL_TIMEOUT)
        .expect("isoinfo (Debian package genisoimage) is needed as the oracle");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn install_cloud_init_makes_a_nocloud_seed_iso() {
    let e = Env::start();
    let images = e.dir.join("state/images");
    let user_data = e.file("user-data", "#cloud-config\nhostname: from-test\n");
    let out = e.ok(&[
        "install",
        "--name",
        "ci",
        "--memory",
        "64",
        "--virt-type",
        "test",
        "--import",
        "--disk",
        "size=1",
        &format!("--cloud-init=user-data={user_data}"),
        "--noautoconsole",
    ]);
    assert!(out.contains("Domain 'ci' started"), "{out}");
    let iso = images.join("ci-cidata.iso");
    let label = Command::new("isoinfo")
        .arg("-d")
        .arg("-i")
        .arg(&iso)
        .output_within(TOOL_TIMEOUT)
        .expect("isoinfo");
    assert!(String::from_utf8_lossy(&label.stdout).contains("Volume id: cidata"));
    assert_eq!(
        iso_file(&iso, "/user-data"),
        "#cloud-config\nhostname: from-test\n"
    );
    assert_eq!(
        iso_file(&iso, "/meta-data"),
        "instance-id: ci\nlocal-hostname: ci\n"
    );
    let xml = e.ok(&["dumpxml", "ci"]);
    assert!(
        xml.contains("device='cdrom'") && xml.contains("ci-cidata.iso"),
        "{xml}"
    );

    // Without options: a generated root password, printed once and put in the seed.
    let out = e.ok(&[
        "install",
        "--name",
        "ci2",
        "--memory",
        "64",
        "--virt-type",
        "test",
        "--import",
        "--disk",
        "size=1",
        "--cloud-init",
        "--noautoconsole",
    ]);
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("Generated password for first root login: "))
        .unwrap_or_else(|| panic!("no generated password: {out}"));
    let ud = iso_file(&images.join("ci2-cidata.iso"), "/user-data");
    assert!(
        ud.starts_with("#cloud-config\n") && ud.contains(&format!("root:{password}")),
        "{ud}"
    );
    let err = e.fails(&[
        "install",
        "--name",
        "ci3",
        "--memory",
        "64",
        "--virt-type",
        "test",
        "--import",
        "--disk",
        "size=1",
        "--cloud-init=bogus=1",
    ]);
    assert!(err.contains("'bogus'"), "{err}");
    assert!(!images.join("ci3.qcow2").exists());
}

/// save, restore, managedsave and managedsave-remove as virsh shows them (test driver): the
/// "saved" / "restored" reasons, dominfo's "Managed save", list --managed-save, and a relative
/// FILE resolved against the caller's directory.
#[test]
fn save_restore_and_managed_save_verbs() {
    let e = Env::start();
    let def = e.file(
        "app.toml",
        &format!(
            "name = \"app\"\ntype = \"test\"\nmemory_mib = 64\n[os]\nkernel = \"{}\"\n",
            e.kernel()
        ),
    );
    e.ok(&["define", &def]);
    e.ok(&["start", "app"]);
    let out = e
        .cmd(&["save", "app", "app.save"])
        .current_dir(&e.dir)
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    let file = e.dir.join("app.save");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("Domain 'app' saved to {}\n\n", file.display())
    );
    assert!(file.is_file());
    assert_eq!(
        e.ok(&["domstate", "--reason", "app"]),
        "shut off (saved)\n\n"
    );
    let err = e.fails(&["save", "app", file.to_str().unwrap()]);
    assert!(err.starts_with("error: domain 'app' is shut off"), "{err}");
    assert_eq!(
        e.ok(&["restore", file.to_str().unwrap()]),
        format!("Domain 'app' restored from {}\n\n", file.display())
    );
    assert_eq!(
        e.ok(&["domstate", "--reason", "app"]),
        "running (restored)\n\n"
    );
    let err = e.fails(&[
        "save",
        "app",
        file.to_str().unwrap(),
        "--running",
        "--paused",
    ]);
    assert!(err.contains("exclude each other"), "{err}");

    assert_eq!(
        e.ok(&["managedsave", "app"]),
        "Domain 'app' state saved by ferrovirtd\n\n"
    );
    assert!(e.ok(&["dominfo", "app"]).contains("Managed save:   yes\n"));
    assert_eq!(
        e.ok(&["list", "--all", "--managed-save"]),
        " Id   Name   State\n--------------------\n -    app    saved\n\n"
    );
    assert!(e.ok(&["list", "--all"]).contains(" -    app    shut off\n"));
    assert!(e
        .ok(&["list", "--all", "--without-managed-save"])
        .ends_with("-\n\n"));
    assert_eq!(
        e.ok(&["managedsave-remove", "app"]),
        "Removed managedsave image for domain 'app'\n\n"
    );
    assert!(e.ok(&["dominfo", "app"]).contains("Managed save:   no\n"));
    let err = e.fails(&["restore", "/nonexistent/app.save"]);
    assert!(err.contains("cannot open the save file"), "{err}");
}
