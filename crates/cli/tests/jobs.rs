//! The stuck-VM case as a user meets it, through the CLI: a qemu-driver VM stopped with SIGSTOP,
//! `ferrovirt shutdown` twice, then a third in the background. `list` answers, the stuck
//! domain's operations fail with a timeout error, `domjobinfo` shows the job, `domjobabort`
//! says it cannot be cancelled; after SIGCONT everything works again.

use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every ferrovirt command here ends well within this (the daemon's deadlines are seconds).
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

fn cli_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovirt"))
}

struct Env {
    dir: PathBuf,
    daemon: Child,
}

impl Env {
    fn start(extra: &[&str]) -> Env {
        let dir = PathBuf::from(format!("/tmp/fvj-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let daemon = Command::new(cli_binary().with_file_name("ferrovirtd"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(extra)
            .env("FERROVIRT_NO_DEFAULT_NETWORK", "1")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferrovirtd (cargo build -p ferrovirtd)");
        let env = Env { dir, daemon };
        let give_up = Instant::now() + Duration::from_secs(20);
        while env.run(&["version"]).status.code() != Some(0) {
            assert!(Instant::now() < give_up, "ferrovirtd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        env
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cli_binary());
        c.env("FERROVIRT_SOCKET", self.dir.join("run/ferrovirtd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        finish(self.cmd(args).spawn().unwrap(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferrovirt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "ferrovirt {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// Wait for a ferrovirt process, killing it past COMMAND_LIMIT.
fn finish(mut child: Child, args: &[&str]) -> Output {
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

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["destroy", "stuck"]);
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The qemu-driver test guest, as strings for definitions and command lines.
fn guest() -> (String, String) {
    let (kernel, initrd) = ferrovirt_testkit::qemu_test_guest();
    (
        kernel.to_string_lossy().into_owned(),
        initrd.to_string_lossy().into_owned(),
    )
}

fn signal(pid: &str, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, pid])
        .status_within(TOOL_TIMEOUT);
}

#[test]
fn a_stopped_vm_times_out_its_own_operations_and_list_keeps_answering() {
    let e = Env::start(&["--op-timeout", "6"]);
    let (kernel, initrd) = guest();
    let def = e.dir.join("stuck.toml");
    std::fs::write(
        &def,
        format!("name = \"stuck\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 128\n[os]\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\ncmdline = \"console=ttyS0 quiet no_timer_check\"\n"),
    )
    .unwrap();
    e.ok(&["define", &def.to_string_lossy()]);
    assert_eq!(e.ok(&["domjobinfo", "stuck"]), "Job type:         None\n\n");
    e.ok(&["start", "stuck"]);
    let info: serde_json::Value =
        serde_json::from_str(&e.ok(&["--json", "dominfo", "stuck"])).unwrap();
    let pid = info["pid"].as_u64().expect("qemu's pid").to_string();

    signal(&pid, "-STOP");
    for _ in 0..2 {
        let err = e.fails(&["shutdown", "stuck"]);
        assert!(
            err.starts_with("error: domain 'stuck': shutdown timed out after 6 s:")
                && err.trim_end().ends_with("[timeout]"),
            "{err}"
        );
    }
    let third = e.cmd(&["shutdown", "stuck"]).spawn().unwrap();
    let give_up = Instant::now() + COMMAND_LIMIT;
    let job = loop {
        let job = e.ok(&["domjobinfo", "stuck"]);
        if job.contains("Operation:        shutdown\n") {
            break job;
        }
        assert!(Instant::now() < give_up, "no shutdown job: {job}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(job.starts_with("Job type:         Unbounded\n"), "{job}");
    assert!(job.contains("Cancellable:      no\n"), "{job}");
    let list = e.ok(&["list"]);
    assert!(
        list.contains(" stuck ") && list.contains("running"),
        "{list}"
    );
    let err = e.fails(&["suspend", "stuck"]);
    assert!(
        err.starts_with("error: domain 'stuck' is busy with shutdown (started "),
        "{err}"
    );
    let err = e.fails(&["domjobabort", "stuck"]);
    assert!(err.contains("cannot be cancelled"), "{err}");
    let out = finish(third, &["shutdown", "stuck"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    signal(&pid, "-CONT");
    // Once continued, QEMU answers again: --wait rides over any job still finishing.
    assert_eq!(
        e.ok(&["suspend", "--wait", "30", "stuck"]),
        "Domain 'stuck' suspended\n\n"
    );
    assert_eq!(e.ok(&["domstate", "stuck"]), "paused\n\n");
    assert_eq!(e.ok(&["destroy", "stuck"]), "Domain 'stuck' destroyed\n\n");
    assert_eq!(e.ok(&["domjobinfo", "stuck"]), "Job type:         None\n\n");
    let err = e.fails(&["domjobabort", "stuck"]);
    assert!(err.contains("has no job running"), "{err}");
}
