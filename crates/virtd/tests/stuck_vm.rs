//! One stuck VM must not freeze the daemon: a real QEMU (TCG) stopped with SIGSTOP makes its
//! own operations fail with a timeout error naming domain and operation, while `list` and the
//! operations on another domain keep answering; after SIGCONT everything works again, and
//! destroy gets past a stopped process (SIGKILL).

mod common;

use std::thread;
use std::time::Duration;

use common::{wait_for, Daemon};
use ferrovirt_api::client::{Client, ClientError, DefFormat};
use ferrovirt_api::{ApiError, DomainOp, DomainState, ErrorCode, StateReason};
use ferrovirt_testkit::qemu_test_guest as guest;
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

/// The daemon's deadline for one operation on a VM (`--op-timeout`).
const OP_TIMEOUT: &str = "6";
const PATIENCE: Duration = Duration::from_secs(60);

fn qemu_def(name: &str) -> String {
    let (kernel, initrd) = guest();
    format!(
        "name = \"{name}\"\ntype = \"qemu\"\naccel = \"tcg\"\nmemory_mib = 128\n[os]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet no_timer_check\"\n",
        kernel.display(),
        initrd.display()
    )
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status_within(TOOL_TIMEOUT)
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// SIGCONT on drop, so a failing test leaves no stopped QEMU behind.
struct Stopped(u32);
impl Stopped {
    fn new(pid: u32) -> Self {
        signal(pid, "-STOP");
        Stopped(pid)
    }
}
impl Drop for Stopped {
    fn drop(&mut self) {
        // The process may be gone already (destroyed): then there is nothing to continue.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status_within(TOOL_TIMEOUT);
    }
}

fn api_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ApiError {
    match r {
        Err(ClientError::Api(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn assert_timeout(e: &ApiError, op: &str) {
    assert_eq!(e.code, ErrorCode::Timeout, "{e}");
    let head = format!("domain 'stuck': {op} timed out after {OP_TIMEOUT} s");
    assert!(e.message.starts_with(&head), "{e}");
}

/// Wait until the domain's job is `name` (it is inside the driver).
fn wait_job(c: &Client, name: &str) -> u64 {
    let mut started = 0;
    wait_for(&format!("the {name} job"), PATIENCE, || {
        match c.job("stuck").unwrap().job {
            Some(j) if j.name == name => {
                started = j.started_ms;
                true
            }
            _ => false,
        }
    });
    started
}

fn in_background(
    d: &Daemon,
    op: DomainOp,
) -> thread::JoinHandle<Result<ferrovirt_api::DomainInfo, ClientError>> {
    let c = d.client();
    thread::spawn(move || c.action("stuck", op))
}

#[test]
fn a_stopped_qemu_fails_its_own_operations_and_blocks_nobody_else() {
    let d = Daemon::start_with(&["--op-timeout", OP_TIMEOUT]);
    let c = d.client();
    c.define(&qemu_def("stuck"), DefFormat::Toml, false)
        .unwrap();
    c.define(&qemu_def("other"), DefFormat::Toml, false)
        .unwrap();
    let pid = c.action("stuck", DomainOp::Start).unwrap().pid.unwrap();
    c.action("other", DomainOp::Start).unwrap();
    // Paused: it costs no CPU, and resume/suspend are QMP calls on another VM.
    c.action("other", DomainOp::Suspend).unwrap();

    let stop = Stopped::new(pid);
    // Twice in a row: each fails at its deadline with a message that says what and why.
    for _ in 0..2 {
        assert_timeout(
            &api_error(c.action("stuck", DomainOp::Shutdown)),
            "shutdown",
        );
    }
    // A third in the background: while it waits on the stopped VM, everything else answers.
    let third = in_background(&d, DomainOp::Shutdown);
    let started = wait_job(&c, "shutdown");
    assert_eq!(c.list(true).unwrap().len(), 2);
    assert_eq!(c.get("stuck").unwrap().state, DomainState::Running);
    assert_eq!(
        c.action("other", DomainOp::Resume).unwrap().state,
        DomainState::Running
    );
    assert_eq!(
        c.action("other", DomainOp::Suspend).unwrap().state,
        DomainState::Paused
    );
    let busy = api_error(c.action("stuck", DomainOp::Suspend));
    assert_eq!(busy.code, ErrorCode::DomainBusy, "{busy}");
    assert!(
        busy.message
            .starts_with("domain 'stuck' is busy with shutdown (started "),
        "{busy}"
    );
    let job = c
        .job("stuck")
        .unwrap()
        .job
        .expect("the shutdown still runs");
    assert_eq!(
        (job.name.as_str(), job.started_ms),
        ("shutdown", started),
        "all of the above ran while the stuck shutdown did"
    );
    assert!(!job.cancellable);
    assert_timeout(&api_error(third.join().unwrap()), "shutdown");
    assert!(c.job("stuck").unwrap().job.is_none());

    // Continued, the VM answers again and its state never went astray.
    drop(stop);
    wait_for("QMP to answer again", PATIENCE, || {
        c.action("stuck", DomainOp::Suspend).is_ok()
    });
    assert_eq!(c.get("stuck").unwrap().state, DomainState::Paused);
    let info = c.action("stuck", DomainOp::Resume).unwrap();
    assert_eq!((info.state, info.pid), (DomainState::Running, Some(pid)));

    // Stopped again, with a shutdown stuck on it: destroy kills the process and goes through.
    let stop = Stopped::new(pid);
    let stuck = in_background(&d, DomainOp::Shutdown);
    wait_job(&c, "shutdown");
    let info = c.action("stuck", DomainOp::Destroy).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Destroyed)
    );
    assert!(stuck.join().unwrap().is_err());
    wait_for("the stopped QEMU to be gone", PATIENCE, || !pid_alive(pid));
    drop(stop);
    // Its exit, reported by the monitor, does not turn the destroy into a crash.
    let info = c.get("stuck").unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Destroyed)
    );
    assert!(c.job("stuck").unwrap().job.is_none());

    // A stopped process with no job on it: destroy sees it stopped and SIGKILLs it at once.
    let pid = c.action("stuck", DomainOp::Start).unwrap().pid.unwrap();
    let stop = Stopped::new(pid);
    let info = c
        .action("stuck", DomainOp::Destroy)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_eq!(info.state, DomainState::Shutoff);
    wait_for("the stopped QEMU to be gone", PATIENCE, || !pid_alive(pid));
    drop(stop);
    c.action("other", DomainOp::Destroy).unwrap();
}
