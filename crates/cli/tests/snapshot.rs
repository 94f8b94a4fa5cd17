//! Domain snapshots end to end: a real ferrovirtd, the `ferrovirt` CLI, and a TCG guest under
//! the qemu driver whose busybox writes markers to its disk (raw sectors of /dev/vda) and to
//! its RAM (/run), and keeps a counter process running. Every image is checked with
//! `qemu-img check`; shut-off cases check disk contents with `qemu-io` as the oracle.
//! One test per complaint users have about libvirt's snapshots (named `libvirt_*`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrovirt_api::client::{Client, ClientError};
use ferrovirt_api::snapshot::{DiskSpec, Location, RevertRequest, SnapshotRequest};
use ferrovirt_api::{DomainOp, DomainState, ErrorCode};
use ferrovirt_testkit::{guest_kernel, scratch_dir, Initramfs, RunWithin, TOOL_TIMEOUT};

/// Every ferrovirt command ends well within this.
const COMMAND_LIMIT: Duration = Duration::from_secs(180);
const BOOT: Duration = Duration::from_secs(120);

const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1 </dev/console
/bin/ferrovirt-load-modules
mkdir -p /run
(n=0; while true; do n=$((n+1)); echo $n > /run/c.new; mv /run/c.new /run/counter; sleep 1; done) &
echo $! > /run/counter.pid
echo FERROVIRT-GUEST-UP
while true; do sh; done
"#;

/// (kernel, initrd) of a guest with virtio-blk, built once per test process.
fn guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let kernel = guest_kernel().expect("guest kernel");
        let dir = scratch_dir("snapshot-guest").expect("scratch dir");
        let initrd = Initramfs::new()
            .init_script(INIT)
            .modules(&["virtio_pci", "virtio_blk"])
            .kernel(&kernel)
            .build(dir.join("initrd.img"))
            .expect("initramfs");
        (kernel.bzimage, initrd)
    })
}

struct Env {
    dir: PathBuf,
    daemon: Child,
    c: Client,
}

static ENVS: AtomicU32 = AtomicU32::new(0);

impl Env {
    fn start() -> Env {
        let n = ENVS.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/fvs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let daemon = Self::spawn(&dir);
        let c = Client::new(dir.join("run/ferrovirtd.sock"));
        let env = Env { dir, daemon, c };
        env.wait_ready();
        env
    }

    fn spawn(dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        Command::new(PathBuf::from(env!("CARGO_BIN_EXE_ferrovirt")).with_file_name("ferrovirtd"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(["--op-timeout", "8"])
            .env("FERROVIRT_NO_DEFAULT_NETWORK", "1")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferrovirtd (cargo build -p ferrovirtd)")
    }

    fn wait_ready(&self) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while self.c.version().is_err() {
            assert!(Instant::now() < give_up, "ferrovirtd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 and start the daemon again on the same state.
    fn restart_daemon(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        self.daemon = Self::spawn(&self.dir);
        self.wait_ready();
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovirt"))
            .env("FERROVIRT_SOCKET", self.dir.join("run/ferrovirtd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let give_up = Instant::now() + COMMAND_LIMIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > give_up {
                let _ = child.kill();
                panic!("ferrovirt {args:?} did not end");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferrovirt {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn images(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// A qcow2 (or raw) disk of 16 MiB in the test's image folder.
    fn disk(&self, name: &str, format: &str) -> PathBuf {
        let p = self.images().join(name);
        tool("qemu-img", &["create", "-q", "-f", format, &s(&p), "16M"]);
        p
    }

    fn define(&self, name: &str, disks: &[&Path]) {
        let (kernel, initrd) = guest();
        let mut toml = format!(
            "name = \"{name}\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 160\n[os]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet no_timer_check\"\n",
            kernel.display(),
            initrd.display()
        );
        for d in disks {
            let fmt = if s(d).ends_with(".raw") {
                "raw"
            } else {
                "qcow2"
            };
            toml.push_str(&format!(
                "[[disk]]\npath = \"{}\"\nformat = \"{fmt}\"\n",
                d.display()
            ));
        }
        let f = self.dir.join(format!("{name}.toml"));
        std::fs::write(&f, toml).unwrap();
        self.ok(&["define", &s(&f)]);
    }

    fn console_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("state/logs/{name}.log"))).unwrap_or_default()
    }

    /// Wait for the guest's banner in the console log (a start begins a new log), then for
    /// its shell: keys typed while the shell starts can be lost or mangled.
    fn wait_banner(&self, name: &str, count: usize) {
        let give_up = Instant::now() + BOOT;
        while self.console_log(name).matches("FERROVIRT-GUEST-UP").count() < count {
            assert!(
                Instant::now() < give_up,
                "the guest did not boot:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        while self.sh(name, "echo READY") != "READY" {
            assert!(
                Instant::now() < give_up,
                "the guest's shell does not answer"
            );
        }
    }

    /// Run a shell command in the guest over its serial console; its output.
    fn sh(&self, name: &str, cmd: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let (begin, end) = (format!("B{n}X"), format!("E{n}X"));
        // The typed line echoes as B{n}''X, which does not contain the markers.
        let line = format!("echo B{n}''X; {cmd}; echo E{n}''X\n");
        let attach = || {
            let mut conn = self.c.console(name, false).expect("attach the console");
            conn.set_read_timeout(Some(Duration::from_millis(300)));
            conn
        };
        let mut conn = attach();
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut seen = String::new();
        let mut sent = None::<Instant>;
        loop {
            if let Some(at) = seen.find(&begin) {
                if let Some(stop) = seen[at..].find(&end) {
                    return seen[at + begin.len()..at + stop]
                        .replace('\r', "")
                        .trim()
                        .to_string();
                }
            }
            assert!(
                Instant::now() < give_up,
                "no answer to '{cmd}' on the console; got: {seen}"
            );
            // Keystrokes typed while the shell starts can be lost: type again until it echoes.
            if !seen.contains(&begin) && sent.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                if conn.write_all(line.as_bytes()).is_err() {
                    // The console connection ended (the daemon drops a client that falls behind
                    // the guest's output): attach again and type again.
                    conn = attach();
                    continue;
                }
                sent = Some(Instant::now());
            }
            let mut buf = [0u8; 4096];
            if let Ok(k) = conn.read(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..k]));
            }
        }
    }

    /// Write `mark` into sector 8 of the guest's /dev/vda and flush it to the disk.
    fn write_disk(&self, name: &str, mark: &str) {
        self.sh(
            name,
            &format!("printf {mark} | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null; sync"),
        );
    }

    fn read_disk(&self, name: &str) -> String {
        self.sh(
            name,
            "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 8",
        )
    }

    fn counter(&self, name: &str) -> u64 {
        let out = self.sh(name, "kill -0 $(cat /run/counter.pid) && cat /run/counter");
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no running counter: {out}"))
    }

    /// The counter process runs: its value grows.
    fn counter_runs(&self, name: &str) -> u64 {
        let first = self.counter(name);
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.counter(name);
            if now > first {
                return first;
            }
            assert!(Instant::now() < give_up, "the counter stopped at {first}");
        }
    }

    fn state(&self, name: &str) -> DomainState {
        self.c.get(name).unwrap().state
    }

    /// `qemu-img check` of every image in the test's folders.
    fn check_images(&self) {
        for dir in [self.images(), self.dir.join("state/snapshots")] {
            for f in walk(&dir) {
                let out = Command::new("qemu-img")
                    .args(["check", "-U", &s(&f)])
                    .output_within(TOOL_TIMEOUT)
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                let raw = String::from_utf8_lossy(&out.stderr).contains("does not support checks");
                assert!(
                    out.status.success() || raw,
                    "qemu-img check {}: {text}{}",
                    f.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
        if let Ok(doms) = self.c.list(false) {
            for d in doms {
                let _ = self.c.action(&d.name, DomainOp::Destroy);
            }
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn tool(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output_within(TOOL_TIMEOUT)
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fill the first 64 KiB of the disk's current image chain with `byte` (host side, VM off).
fn write_host(img: &Path, byte: u8) {
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {byte} 0 64k"),
            &s(img),
        ],
    );
}

/// The byte the first 64 KiB of the image chain holds (checked whole), as `qemu-io` reads it.
fn read_host(img: &Path) -> u8 {
    for byte in 0..=255u8 {
        let out = Command::new("qemu-io")
            .args(["-r", "-U", "-c", &format!("read -P {byte} 0 64k"), &s(img)])
            .output_within(TOOL_TIMEOUT)
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && !text.contains("Pattern verification failed") {
            return byte;
        }
        if byte > 16 {
            break;
        }
    }
    panic!(
        "{}: first 64 KiB are not one of the test's patterns",
        img.display()
    );
}

/// The image the domain's disk vda uses now (from its TOML definition).
fn disk_path(c: &Client, name: &str) -> PathBuf {
    let toml = c.definition_toml(name).unwrap();
    let line = toml
        .lines()
        .skip_while(|l| l.trim() != "[[disk]]")
        .find_map(|l| l.trim().strip_prefix("path = "))
        .unwrap_or_else(|| panic!("no disk in {toml}"));
    PathBuf::from(line.trim_matches('"'))
}

fn api_code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api(e)) => e.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn snap(name: &str) -> SnapshotRequest {
    SnapshotRequest {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn revert(e: &Env, dom: &str, name: &str) {
    e.ok(&["snapshot-revert", dom, name]);
}

/// Full, disk-only, internal and external snapshots of one running guest; reverts among them
/// in several orders (leaf, middle, root, again), continuing in between; deletes in the middle
/// while running; the counter process survives every full revert.
#[test]
fn a_running_guest_reverts_among_full_and_disk_only_snapshots_and_deletes_them() {
    let e = Env::start();
    let disk = e.disk("g.qcow2", "qcow2");
    e.define("g", &[&disk]);
    e.ok(&["start", "g"]);
    e.wait_banner("g", 1);

    e.write_disk("g", "MARK-AAA");
    e.sh("g", "touch /run/m1");
    let before = e.counter_runs("g");
    assert_eq!(
        e.ok(&["snapshot-create-as", "g", "s1", "--description", "first"]),
        "Domain snapshot s1 created\n\n"
    );
    assert_eq!(e.state("g"), DomainState::Running);
    e.write_disk("g", "MARK-BBB");
    e.sh("g", "touch /run/m2");
    e.ok(&["snapshot-create-as", "g", "s2", "--disk-only", "--atomic"]);
    e.write_disk("g", "MARK-CCC");
    e.sh("g", "touch /run/m3");
    e.ok(&[
        "snapshot-create-as",
        "g",
        "s3",
        "--diskspec",
        "vda,snapshot=internal",
    ]);
    e.write_disk("g", "MARK-DDD");

    // Bad input changes nothing: a name twice, an overlay that exists, an unknown snapshot.
    let err = e.fails(&["snapshot-create-as", "g", "s1"]);
    assert!(err.contains("already has a snapshot 's1'"), "{err}");
    let taken = e.images().join("taken.qcow2");
    std::fs::write(&taken, b"mine").unwrap();
    let err = e.fails(&[
        "snapshot-create-as",
        "g",
        "s9",
        "--disk-only",
        "--diskspec",
        &format!("vda,file={}", taken.display()),
    ]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
    std::fs::remove_file(&taken).unwrap();
    let err = e.fails(&["snapshot-revert", "g", "nope"]);
    assert!(
        err.contains("has no snapshot 'nope'") && err.contains("[no_snapshot]"),
        "{err}"
    );
    assert_eq!(e.read_disk("g"), "MARK-DDD");

    let info = e.ok(&["snapshot-info", "g", "s3"]);
    assert!(
        info.contains("State:          running\n")
            && info.contains("Location:       mixed\n")
            && info.contains("Parent:         s2\n"),
        "{info}"
    );
    let tree = e.ok(&["snapshot-list", "g", "--tree"]);
    assert_eq!(tree, "s1\n  |\n  +- s2\n      |\n      +- s3\n\n", "{tree}");

    // A full external snapshot: the VM is back where it was, the counter still running.
    revert(&e, "g", "s1");
    assert_eq!(e.state("g"), DomainState::Running);
    assert_eq!(e.read_disk("g"), "MARK-AAA");
    assert_eq!(e.sh("g", "ls /run | grep '^m' | tr '\\n' ' '"), "m1");
    assert!(e.counter_runs("g") >= before);
    e.write_disk("g", "MARK-EEE");

    // The full internal one (memory in a file, disk inside the qcow2 it was taken on).
    revert(&e, "g", "s3");
    assert_eq!(e.read_disk("g"), "MARK-CCC");
    assert_eq!(e.sh("g", "ls /run | grep '^m' | tr '\\n' ' '"), "m1 m2 m3");
    e.counter_runs("g");

    // Disk-only: the domain is off afterwards, or boots from the snapshot's disk with --running.
    revert(&e, "g", "s2");
    assert_eq!(e.state("g"), DomainState::Shutoff);
    assert_eq!(
        e.ok(&["domstate", "g", "--reason"]),
        "shut off (from-snapshot)\n\n"
    );
    e.ok(&["snapshot-revert", "g", "s2", "--running"]);
    e.wait_banner("g", 1);
    assert_eq!(e.read_disk("g"), "MARK-BBB");

    // The middle snapshot goes while the VM runs; the others still revert correctly.
    e.ok(&["snapshot-delete", "g", "s2"]);
    assert_eq!(e.ok(&["snapshot-parent", "g", "s3"]), "s1\n\n");
    revert(&e, "g", "s3");
    assert_eq!(e.read_disk("g"), "MARK-CCC");
    revert(&e, "g", "s1");
    assert_eq!(e.read_disk("g"), "MARK-AAA");
    e.check_images();

    // The metadata survives a daemon restart (kill -9); the VM keeps running.
    let mut e = e;
    e.restart_daemon();
    assert_eq!(e.ok(&["snapshot-current", "g", "--name"]), "s1\n\n");
    assert_eq!(e.ok(&["snapshot-list", "g", "--name"]), "s1\ns3\n\n");
    let err = e.fails(&["undefine", "g"]);
    assert!(err.contains("--snapshots-metadata"), "{err}");

    e.ok(&["snapshot-delete", "g", "s1"]);
    revert(&e, "g", "s3");
    assert_eq!(e.read_disk("g"), "MARK-CCC");
    e.ok(&["snapshot-delete", "g", "s3"]);
    assert_eq!(e.ok(&["snapshot-list", "g", "--name"]), "\n");
    assert_eq!(e.read_disk("g"), "MARK-CCC");
    e.ok(&["destroy", "g"]);
    e.check_images();
    // Nothing is left behind but the domain's image: every overlay was merged or removed.
    let left = walk(&e.images());
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(read_guest_sector(&left[0]), "MARK-CCC");
    assert!(walk(&e.dir.join("state/snapshots")).is_empty());
}

/// Sector 8 of an image chain, as qemu-img sees it.
fn read_guest_sector(img: &Path) -> String {
    let raw = img.with_extension("check.raw");
    tool(
        "qemu-img",
        &["convert", "-U", "-O", "raw", &s(img), &s(&raw)],
    );
    let mut f = std::fs::File::open(&raw).unwrap();
    let mut buf = [0u8; 8];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(8 * 512)).unwrap();
    f.read_exact(&mut buf).unwrap();
    std::fs::remove_file(&raw).unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// libvirt: "deleting an external snapshot after a revert to a non-leaf is not implemented".
#[test]
fn libvirt_delete_external_after_revert_to_non_leaf() {
    let e = Env::start();
    let disk = e.disk("n.qcow2", "qcow2");
    e.define("n", &[&disk]);
    e.ok(&["start", "n"]);
    e.wait_banner("n", 1);
    e.write_disk("n", "MARK-111");
    e.ok(&["snapshot-create-as", "n", "a"]);
    e.write_disk("n", "MARK-222");
    e.ok(&["snapshot-create-as", "n", "b"]);
    e.write_disk("n", "MARK-333");
    e.ok(&["snapshot-create-as", "n", "c"]);
    revert(&e, "n", "a");
    e.write_disk("n", "MARK-444");
    // b is in the middle of the old branch, a is the parent the VM now runs from.
    e.ok(&["snapshot-delete", "n", "b"]);
    e.ok(&["snapshot-delete", "n", "a"]);
    assert_eq!(e.read_disk("n"), "MARK-444");
    revert(&e, "n", "c");
    assert_eq!(e.read_disk("n"), "MARK-333");
    e.counter_runs("n");
    e.ok(&["destroy", "n"]);
    e.check_images();
    assert_eq!(read_guest_sector(&disk_path(&e.c, "n")), "MARK-333");
}

/// libvirt: deleting an external snapshot of a paused VM fails ("Block node is read-only").
#[test]
fn libvirt_delete_external_snapshot_of_a_paused_vm() {
    let e = Env::start();
    let disk = e.disk("p.qcow2", "qcow2");
    e.define("p", &[&disk]);
    e.ok(&["start", "p"]);
    e.wait_banner("p", 1);
    e.write_disk("p", "MARK-PPP");
    e.ok(&["suspend", "p"]);
    e.ok(&["snapshot-create-as", "p", "full"]);
    assert!(e
        .ok(&["snapshot-info", "p", "full"])
        .contains("State:          paused\n"));
    e.ok(&["snapshot-create-as", "p", "disks", "--disk-only"]);
    assert_eq!(e.state("p"), DomainState::Paused);
    e.ok(&["snapshot-delete", "p", "full"]);
    e.ok(&["snapshot-delete", "p", "disks"]);
    assert_eq!(e.state("p"), DomainState::Paused);
    e.ok(&["resume", "p"]);
    assert_eq!(e.read_disk("p"), "MARK-PPP");
    e.write_disk("p", "MARK-QQQ");
    e.ok(&["destroy", "p"]);
    e.check_images();
    // Both overlays were merged back: the domain runs on its own image again.
    assert_eq!(disk_path(&e.c, "p"), disk);
    assert_eq!(read_guest_sector(&disk), "MARK-QQQ");
}

/// libvirt: after a revert to an internal parent, deleting an external child deleted the base.
#[test]
fn libvirt_delete_external_child_after_revert_to_internal_parent() {
    let e = Env::start();
    let disk = e.disk("i.qcow2", "qcow2");
    e.define("i", &[&disk]);
    write_host(&disk, 1);
    e.ok(&[
        "snapshot-create-as",
        "i",
        "parent",
        "--diskspec",
        "vda,snapshot=internal",
    ]);
    write_host(&disk, 2);
    e.ok(&["snapshot-create-as", "i", "child"]);
    write_host(&disk_path(&e.c, "i"), 3);
    revert(&e, "i", "parent");
    assert_eq!(read_host(&disk_path(&e.c, "i")), 1);
    e.ok(&["snapshot-delete", "i", "child"]);
    // The base image (holder of the parent) is still there, and still reverts.
    assert!(disk.exists());
    write_host(&disk_path(&e.c, "i"), 4);
    revert(&e, "i", "parent");
    assert_eq!(read_host(&disk_path(&e.c, "i")), 1);
    e.check_images();
}

/// libvirt: mixed internal/external chains refuse to delete.
#[test]
fn libvirt_mixed_internal_external_chain_deletes_in_any_order() {
    let e = Env::start();
    let disk = e.disk("m.qcow2", "qcow2");
    e.define("m", &[&disk]);
    write_host(&disk, 1);
    e.ok(&[
        "snapshot-create-as",
        "m",
        "i1",
        "--diskspec",
        "vda,snapshot=internal",
    ]);
    write_host(&disk, 2);
    e.ok(&["snapshot-create-as", "m", "e2"]);
    write_host(&disk_path(&e.c, "m"), 3);
    e.ok(&[
        "snapshot-create-as",
        "m",
        "i3",
        "--diskspec",
        "vda,snapshot=internal",
    ]);
    write_host(&disk_path(&e.c, "m"), 4);
    e.ok(&["snapshot-create-as", "m", "e4"]);
    write_host(&disk_path(&e.c, "m"), 5);
    // Middle first, then the root, then a leaf; every remaining one reverts correctly.
    e.ok(&["snapshot-delete", "m", "e2"]);
    for (name, byte) in [("i1", 1), ("i3", 3), ("e4", 4)] {
        revert(&e, "m", name);
        assert_eq!(
            read_host(&disk_path(&e.c, "m")),
            byte,
            "after revert to {name}"
        );
    }
    e.ok(&["snapshot-delete", "m", "i1"]);
    e.ok(&["snapshot-delete", "m", "e4"]);
    revert(&e, "m", "i3");
    assert_eq!(read_host(&disk_path(&e.c, "m")), 3);
    e.ok(&["snapshot-delete", "m", "i3"]);
    assert_eq!(read_host(&disk_path(&e.c, "m")), 3);
    e.check_images();
}

/// libvirt before 9.9: reverting to an external snapshot was impossible. Here a shut-off
/// domain reverts to external snapshots at every position, and continues each time.
#[test]
fn libvirt_revert_to_external_snapshots_of_a_shut_off_domain() {
    let e = Env::start();
    let disk = e.disk("x.qcow2", "qcow2");
    e.define("x", &[&disk]);
    let mut expected = Vec::new();
    for (i, name) in ["x1", "x2", "x3"].iter().enumerate() {
        write_host(&disk_path(&e.c, "x"), i as u8 + 1);
        e.ok(&["snapshot-create-as", "x", name]);
        expected.push((*name, i as u8 + 1));
    }
    for (name, byte) in expected.iter().rev().chain(expected.iter()) {
        revert(&e, "x", name);
        assert_eq!(
            read_host(&disk_path(&e.c, "x")),
            *byte,
            "after revert to {name}"
        );
        write_host(&disk_path(&e.c, "x"), 9);
    }
    let info = e.ok(&["snapshot-info", "x", "x2"]);
    assert!(
        info.contains("State:          shutoff\n") && info.contains("Location:       external\n"),
        "{info}"
    );
    let xml = e.ok(&["snapshot-dumpxml", "x", "x2"]);
    assert!(
        xml.contains("<name>x2</name>")
            && xml.contains("<parent>\n    <name>x1</name>")
            && xml.contains("snapshot='external'"),
        "{xml}"
    );
    e.check_images();
}

/// Bad input: one clear error each, and the domain and its images as they were.
#[test]
fn bad_snapshot_input_is_refused_and_changes_nothing() {
    let e = Env::start();
    let raw = e.disk("r.raw", "raw");
    e.define("r", &[&raw]);
    let err = e.fails(&[
        "snapshot-create-as",
        "r",
        "s",
        "--diskspec",
        "vda,snapshot=internal",
    ]);
    assert!(
        err.contains("only qcow2 images can hold an internal snapshot")
            && err.contains("snapshot=external"),
        "{err}"
    );
    let err = e.fails(&["snapshot-create-as", "r", "s", "--diskspec", "vdb"]);
    assert!(err.contains("has no disk 'vdb'"), "{err}");
    let err = e.fails(&["snapshot-create-as", "r", "bad/name"]);
    assert!(err.contains("snapshot name"), "{err}");
    let err = e.fails(&["snapshot-create-as", "r", "q", "--quiesce"]);
    assert!(err.contains("guest agent"), "{err}");
    assert_eq!(walk(&e.images()), vec![raw.clone()]);
    // A raw disk gets an external snapshot.
    e.ok(&["snapshot-create-as", "r", "ext"]);
    assert_eq!(
        api_code(e.c.snapshot_create("r", &snap("ext"))),
        ErrorCode::OperationInvalid
    );
    assert_eq!(
        api_code(e.c.snapshot_get("r", "nope")),
        ErrorCode::NoSnapshot
    );
    assert_eq!(
        api_code(e.c.snapshot_revert("r", "nope", &RevertRequest::default())),
        ErrorCode::NoSnapshot
    );
    let err = e.fails(&["snapshot-delete", "r", "nope"]);
    assert!(err.contains("no snapshot 'nope'"), "{err}");
    let mut two = snap("two");
    two.disks.push(DiskSpec {
        target: "vda".into(),
        snapshot: Location::External,
        file: Some("relative.qcow2".into()),
    });
    assert_eq!(
        api_code(e.c.snapshot_create("r", &two)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(e.ok(&["snapshot-list", "r", "--name"]), "ext\n\n");
    // undefine needs --snapshots-metadata, which forgets them (the images stay).
    let err = e.fails(&["undefine", "r"]);
    assert!(err.contains("has 1 snapshot(s)"), "{err}");
    e.ok(&["undefine", "r", "--snapshots-metadata"]);
    assert!(raw.exists());
}

/// A revert while another job runs on the domain: domain_busy, and nothing changes.
#[test]
fn a_revert_while_another_job_runs_is_refused() {
    let e = Env::start();
    let disk = e.disk("b.qcow2", "qcow2");
    e.define("b", &[&disk]);
    e.ok(&["start", "b"]);
    e.wait_banner("b", 1);
    e.ok(&["snapshot-create-as", "b", "s", "--disk-only"]);
    let pid = e.c.get("b").unwrap().pid.unwrap().to_string();
    tool("kill", &["-STOP", &pid]);
    let sock = e.dir.join("run/ferrovirtd.sock");
    let stuck = std::thread::spawn(move || Client::new(sock).action("b", DomainOp::Suspend));
    let give_up = Instant::now() + Duration::from_secs(30);
    while e.c.job("b").unwrap().job.is_none() {
        assert!(Instant::now() < give_up, "the suspend job never showed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = e.fails(&["snapshot-revert", "b", "s"]);
    assert!(
        err.contains("is busy with suspend") && err.contains("[domain_busy]"),
        "{err}"
    );
    let err = e.fails(&["snapshot-delete", "b", "s"]);
    assert!(err.contains("[domain_busy]"), "{err}");
    tool("kill", &["-CONT", &pid]);
    let _ = stuck.join();
    assert_eq!(e.ok(&["snapshot-list", "b", "--name"]), "s\n\n");
    assert_eq!(e.c.get("b").unwrap().pid.unwrap().to_string(), pid);
}

/// The listing, editing and bookkeeping verbs on a shut-off domain: snapshot-create from XML,
/// snapshot-list --parent/--current, snapshot-current, snapshot-edit, snapshot-delete
/// --children / --metadata, --no-metadata.
#[test]
fn listing_editing_and_deleting_subtrees_work_like_virsh() {
    let e = Env::start();
    let disk = e.disk("v.qcow2", "qcow2");
    e.define("v", &[&disk]);
    let xml = e.dir.join("s.xml");
    std::fs::write(
        &xml,
        "<domainsnapshot><name>root</name><description>from XML</description>\
         <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>",
    )
    .unwrap();
    assert_eq!(
        e.ok(&["snapshot-create", "v", &s(&xml)]),
        format!("Domain snapshot root created from '{}'\n\n", xml.display())
    );
    e.ok(&["snapshot-create-as", "v", "a"]);
    e.ok(&["snapshot-create-as", "v", "a2"]);
    revert(&e, "v", "root");
    e.ok(&["snapshot-create-as", "v", "b"]);
    let list = e.ok(&["snapshot-list", "v", "--parent"]);
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            vec![w[0], w[w.len() - 1]]
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["root", "shutoff"],
            vec!["a", "root"],
            vec!["a2", "a"],
            vec!["b", "root"]
        ],
        "{list}"
    );
    assert!(e.ok(&["snapshot-list", "v", "--current"]).contains(" b "));
    assert_eq!(e.ok(&["snapshot-current", "v", "--name"]), "b\n\n");
    e.ok(&["snapshot-current", "v", "a"]);
    assert_eq!(e.ok(&["snapshot-current", "v", "--name"]), "a\n\n");
    e.ok(&["snapshot-edit", "v", "root", "--description", "the base"]);
    assert!(e
        .ok(&["snapshot-dumpxml", "v", "root"])
        .contains("<description>the base</description>"));
    let err = e.fails(&["snapshot-parent", "v", "root"]);
    assert!(err.contains("has no parent"), "{err}");

    // --children-only keeps a, --children takes b's subtree, --metadata keeps the files.
    e.ok(&["snapshot-delete", "v", "a", "--children-only"]);
    assert_eq!(e.ok(&["snapshot-list", "v", "--name"]), "root\na\nb\n\n");
    e.ok(&["snapshot-delete", "v", "root", "--children"]);
    assert_eq!(e.ok(&["snapshot-list", "v", "--name"]), "\n");
    let err = e.fails(&["snapshot-current", "v"]);
    assert!(err.contains("has no current snapshot"), "{err}");
    e.check_images();
    e.ok(&["snapshot-create-as", "v", "keep"]);
    let overlay = disk_path(&e.c, "v");
    e.ok(&["snapshot-delete", "v", "keep", "--metadata"]);
    assert!(overlay.exists() && disk_path(&e.c, "v") == overlay);
    // --no-metadata: the overlay is made and used, no snapshot is recorded.
    e.ok(&["snapshot-create-as", "v", "ghost", "--no-metadata"]);
    assert_eq!(e.ok(&["snapshot-list", "v", "--name"]), "\n");
    assert_ne!(disk_path(&e.c, "v"), overlay);
    e.ok(&["undefine", "v"]);
}

/// A base image below the domain's disk (shared with other VMs, say) is never written: not by
/// a revert to an internal snapshot that needs a private copy, nor by the merges of deletes.
#[test]
fn a_shared_base_below_the_domains_disk_is_never_written() {
    let e = Env::start();
    let golden = e.disk("golden.qcow2", "qcow2");
    write_host(&golden, 7);
    let vm = e.images().join("vm.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &s(&golden),
            &s(&vm),
        ],
    );
    let before = std::fs::read(&golden).unwrap();
    e.define("g", &[&vm]);
    write_host(&vm, 1);
    let internal = [
        "snapshot-create-as",
        "g",
        "i1",
        "--diskspec",
        "vda,snapshot=internal",
    ];
    e.ok(&internal);
    write_host(&vm, 2);
    e.ok(&["snapshot-create-as", "g", "e2"]);
    write_host(&disk_path(&e.c, "g"), 3);
    revert(&e, "g", "i1");
    assert_eq!(read_host(&disk_path(&e.c, "g")), 1);
    e.ok(&["snapshot-delete", "g", "e2"]);
    e.ok(&["snapshot-delete", "g", "i1"]);
    assert_eq!(read_host(&disk_path(&e.c, "g")), 1);
    assert_ne!(disk_path(&e.c, "g"), golden);
    let after = std::fs::read(&golden).unwrap();
    assert!(after == before, "golden.qcow2 was written");
    assert_eq!(read_host(&golden), 7);
    e.check_images();
}
