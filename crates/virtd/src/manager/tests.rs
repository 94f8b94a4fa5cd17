//! The manager with a fake driver from the registry whose calls block until the test lets them
//! go: jobs, busy errors, waiting, deadlines, cancellation and commit order.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferrovirt_api::host::HostVirt;
use ferrovirt_api::{ApiError, DomainDef, DomainOp, DomainState, ErrorCode, StateReason, VirtType};

use super::{Limits, Manager, Setup};
use crate::deadline::Deadline;
use crate::driver::registry::Drivers;
use crate::driver::{Driver, Started, VmCtx, VmRef};
use crate::runtime::{ExitKind, Paths, Runtime};

/// How long a test waits for something that should happen at once (a handshake, not a budget).
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct GateState {
    /// Operations that block when called.
    held: HashSet<&'static str>,
    /// Operations blocked right now.
    inside: Vec<&'static str>,
    /// Blocked calls give up at their deadline (a well-behaved driver); else they ignore it.
    honor_deadline: bool,
    /// The VM process was killed: blocked and later calls fail at once.
    killed: bool,
    destroys: u32,
}

/// A driver whose calls block on a gate the test controls.
#[derive(Default)]
struct FakeDriver {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl FakeDriver {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, op: &'static str, honor_deadline: bool) {
        let mut s = self.lock();
        s.held.insert(op);
        s.honor_deadline = honor_deadline;
    }

    fn release(&self, op: &'static str) {
        self.lock().held.remove(op);
        self.changed.notify_all();
    }

    /// Wait until a call of `op` is blocked in the driver.
    fn wait_inside(&self, op: &'static str) {
        let give_up = Instant::now() + PATIENCE;
        let mut s = self.lock();
        while !s.inside.contains(&op) {
            assert!(Instant::now() < give_up, "no {op} call reached the driver");
            s = self.changed.wait_timeout(s, PATIENCE).unwrap().0;
        }
    }

    fn pass(&self, op: &'static str, deadline: &Deadline) -> Result<(), ApiError> {
        let mut s = self.lock();
        // Destroying a dead VM succeeds (its process is already gone).
        if s.killed && op != "start" && op != "destroy" {
            return Err(ApiError::driver("VM process is gone"));
        }
        if !s.held.contains(op) {
            return Ok(());
        }
        s.inside.push(op);
        self.changed.notify_all();
        let result = loop {
            if !s.held.contains(op) {
                break Ok(());
            }
            if s.killed {
                break Err(ApiError::driver("VM process is gone"));
            }
            if s.honor_deadline {
                if let Err(e) = deadline.check() {
                    break Err(e);
                }
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap()
                .0;
        };
        s.inside.retain(|o| *o != op);
        result
    }
}

impl Driver for FakeDriver {
    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError> {
        self.lock().killed = false;
        self.pass("start", &ctx.deadline)?;
        Ok(Started {
            runtime: Runtime {
                id: ctx.id,
                pid: None,
                vnc_port: None,
                vnc_listen: None,
                engine: None,
            },
            console: None,
        })
    }
    fn reattach(&self, _ctx: VmCtx, runtime: &Runtime) -> Option<Started> {
        Some(Started {
            runtime: runtime.clone(),
            console: None,
        })
    }
    fn destroy(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.pass("destroy", vm.deadline)?;
        self.lock().destroys += 1;
        Ok(())
    }
    fn shutdown(&self, vm: &VmRef) -> Result<Option<ExitKind>, ApiError> {
        // Like a real guest: it acts later, not within the call.
        self.pass("shutdown", vm.deadline).map(|()| None)
    }
    fn suspend(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.pass("suspend", vm.deadline)
    }
    fn resume(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.pass("resume", vm.deadline)
    }
    fn reset(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.pass("reset", vm.deadline)
    }
    fn check(&self, _def: &DomainDef) -> Result<(), ApiError> {
        Ok(())
    }
    fn kill(&self, _vm: &VmRef) -> Result<(), ApiError> {
        self.lock().killed = true;
        self.changed.notify_all();
        Ok(())
    }
}

struct Fixture {
    dir: PathBuf,
    mgr: Arc<Manager>,
    fake: Arc<FakeDriver>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(limits: Limits) -> Fixture {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("fv-mgr-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // No default network (bridge, NAT) for a unit test.
    std::env::set_var("FERROVIRT_NO_DEFAULT_NETWORK", "1");
    let paths = Paths {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        socket: dir.join("run/sock"),
    };
    let fake = Arc::new(FakeDriver::default());
    let drivers = Drivers::default().with(VirtType::Test, fake.clone());
    let setup = Setup {
        host: HostVirt::probe(),
        drivers,
        limits,
        allow_remote_vnc: false,
    };
    let mgr = Manager::open(paths, setup).expect("open manager");
    Fixture { dir, mgr, fake }
}

fn define(f: &Fixture, name: &str) {
    let kernel = f.dir.join("kernel");
    std::fs::write(&kernel, b"not booted by the fake driver").unwrap();
    let mut def = DomainDef::new(name);
    def.virt_type = Some(VirtType::Test);
    def.os.kernel = Some(kernel);
    f.mgr.define(def, Vec::new(), false, false).expect("define");
}

fn state(mgr: &Manager, name: &str) -> (DomainState, StateReason) {
    let d = mgr.domain(name).unwrap();
    (d.state, d.reason)
}

fn in_background(
    mgr: &Arc<Manager>,
    name: &str,
    op: DomainOp,
    wait: Option<Duration>,
) -> thread::JoinHandle<Result<ferrovirt_api::DomainInfo, ApiError>> {
    let mgr = mgr.clone();
    let name = name.to_string();
    thread::spawn(move || mgr.action(&name, op, wait))
}

#[test]
fn queries_and_other_domains_answer_while_a_start_is_blocked_in_the_driver() {
    let f = fixture(Limits::default());
    define(&f, "stuck");
    define(&f, "other");
    f.mgr.action("other", DomainOp::Start, None).unwrap();
    f.fake.hold("start", false);
    let start = in_background(&f.mgr, "stuck", DomainOp::Start, None);
    f.fake.wait_inside("start");

    // The start is inside the driver: nothing else waits for it.
    assert_eq!(f.mgr.list(true).len(), 2);
    assert_eq!(state(&f.mgr, "stuck").0, DomainState::Shutoff);
    let job = f.mgr.job_info("stuck").unwrap().job.expect("a job");
    assert_eq!(
        (job.name.as_str(), job.kind, job.cancellable),
        ("start", ferrovirt_api::JobKind::Operation, true)
    );
    let progress = job.progress.expect("a start reports its steps");
    assert_eq!(
        (progress.phase.as_deref(), progress.done, progress.total),
        (Some("starting the VM"), 2, Some(4))
    );
    assert!(f.mgr.job_info("other").unwrap().job.is_none());
    let paused = f.mgr.action("other", DomainOp::Suspend, None).unwrap();
    assert_eq!(paused.state, DomainState::Paused);

    f.fake.release("start");
    let info = start.join().unwrap().unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Running, StateReason::Booted)
    );
    assert!(f.mgr.job_info("stuck").unwrap().job.is_none());
    // Ids are handed out under the lock: two starts never share one.
    let other_id = f.mgr.domain("other").unwrap().id;
    assert!(info.id.is_some() && info.id != other_id);
}

#[test]
fn a_second_operation_on_a_busy_domain_is_refused_with_409_or_waits_when_asked() {
    let f = fixture(Limits::default());
    define(&f, "web");
    f.mgr.action("web", DomainOp::Start, None).unwrap();
    f.fake.hold("shutdown", false);
    let shutdown = in_background(&f.mgr, "web", DomainOp::Shutdown, None);
    f.fake.wait_inside("shutdown");

    let e = f.mgr.action("web", DomainOp::Suspend, None).unwrap_err();
    assert_eq!((e.code, e.code.http_status()), (ErrorCode::DomainBusy, 409));
    assert!(
        e.message
            .starts_with("domain 'web' is busy with shutdown (started "),
        "{e}"
    );
    // Definition and existence do not change under a running job either.
    assert_eq!(
        f.mgr.undefine("web").unwrap_err().code,
        ErrorCode::DomainBusy
    );
    let mut redefined = f.mgr.definition("web").unwrap();
    redefined.vcpus = 2;
    let e = f
        .mgr
        .define(redefined, Vec::new(), false, false)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::DomainBusy);
    // A domjobabort of a job that cannot be cancelled says so.
    let e = f.mgr.abort_job("web").unwrap_err();
    assert!(e.message.contains("cannot be cancelled"), "{e}");

    // With a wait, the second operation runs once the first is done.
    let suspend = in_background(
        &f.mgr,
        "web",
        DomainOp::Suspend,
        Some(Duration::from_secs(30)),
    );
    f.fake.release("shutdown");
    // The shutdown answers with the domain as it is then: running, or already paused by the
    // suspend that waited for it.
    shutdown.join().unwrap().expect("the shutdown went through");
    assert_eq!(suspend.join().unwrap().unwrap().state, DomainState::Paused);
    let e = f.mgr.abort_job("web").unwrap_err();
    assert!(e.message.contains("has no job running"), "{e}");
}

fn short_limits() -> Limits {
    Limits {
        op: Duration::from_millis(200),
        start: Duration::from_millis(300),
        destroy: Duration::from_secs(5),
        // Long enough that a driver honoring its deadline answers first, even on a busy machine.
        grace: Duration::from_secs(1),
        max_wait: Duration::from_secs(30),
    }
}

#[test]
fn a_driver_call_past_its_deadline_is_a_timeout_and_state_stays_consistent() {
    let f = fixture(short_limits());
    define(&f, "slow");
    f.mgr.action("slow", DomainOp::Start, None).unwrap();

    // A driver that honors its deadline: the operation fails cleanly, the job ends.
    f.fake.hold("suspend", true);
    let e = f.mgr.action("slow", DomainOp::Suspend, None).unwrap_err();
    assert_eq!((e.code, e.code.http_status()), (ErrorCode::Timeout, 504));
    assert!(
        e.message
            .starts_with("domain 'slow': suspend timed out after 200 ms"),
        "{e}"
    );
    assert_eq!(
        state(&f.mgr, "slow"),
        (DomainState::Running, StateReason::Booted)
    );
    assert!(f.mgr.job_info("slow").unwrap().job.is_none());
    f.fake.release("suspend");

    // A driver that ignores it: the client gets its timeout at the deadline anyway; the job
    // stays until the driver returns, and the start nobody heard of is taken down again.
    define(&f, "late");
    f.fake.hold("start", false);
    let e = f.mgr.action("late", DomainOp::Start, None).unwrap_err();
    assert_eq!(e.code, ErrorCode::Timeout, "{e}");
    assert!(
        e.message.starts_with("domain 'late': start timed out"),
        "{e}"
    );
    let job = f
        .mgr
        .job_info("late")
        .unwrap()
        .job
        .expect("the job waits for the driver");
    assert!(job.timed_out);
    assert_eq!(state(&f.mgr, "late").0, DomainState::Shutoff);
    let destroys = f.fake.lock().destroys;
    f.fake.release("start");
    let give_up = Instant::now() + PATIENCE;
    while f.mgr.job_info("late").unwrap().job.is_some() {
        assert!(
            Instant::now() < give_up,
            "the late start never ended its job"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(state(&f.mgr, "late").0, DomainState::Shutoff);
    assert_eq!(
        f.fake.lock().destroys,
        destroys + 1,
        "the late VM was destroyed"
    );
    // Everything works afterwards.
    assert_eq!(
        f.mgr.action("late", DomainOp::Start, None).unwrap().state,
        DomainState::Running
    );
}

#[test]
fn domjobabort_cancels_a_start_and_destroy_gets_past_a_stuck_operation() {
    let f = fixture(Limits::default());
    define(&f, "vm");
    f.fake.hold("start", true);
    let start = in_background(&f.mgr, "vm", DomainOp::Start, None);
    f.fake.wait_inside("start");
    let aborted = f.mgr.abort_job("vm").unwrap().job.unwrap();
    assert!(aborted.cancel_requested);
    let e = start.join().unwrap().unwrap_err();
    assert!(
        e.message.contains("domain 'vm': start was cancelled"),
        "{e}"
    );
    assert_eq!(state(&f.mgr, "vm").0, DomainState::Shutoff);
    f.fake.release("start");

    // A shutdown stuck on a VM that does not answer: destroy kills the process first.
    f.mgr.action("vm", DomainOp::Start, None).unwrap();
    f.fake.hold("shutdown", false);
    let shutdown = in_background(&f.mgr, "vm", DomainOp::Shutdown, None);
    f.fake.wait_inside("shutdown");
    let info = f.mgr.action("vm", DomainOp::Destroy, None).unwrap();
    assert_eq!(
        (info.state, info.reason),
        (DomainState::Shutoff, StateReason::Destroyed)
    );
    let e = shutdown.join().unwrap().unwrap_err();
    assert_eq!(e.code, ErrorCode::DriverError, "{e}");
    f.fake.release("shutdown");
    assert!(f.mgr.job_info("vm").unwrap().job.is_none());
}

#[test]
fn commits_store_first_and_a_store_failure_leaves_memory_unchanged() {
    let f = fixture(Limits::default());
    define(&f, "db");
    f.mgr.action("db", DomainOp::Start, None).unwrap();
    let db = rusqlite::Connection::open(f.mgr.paths.db()).unwrap();
    let stored_state = || -> String {
        db.query_row("SELECT state FROM domains WHERE name = 'db'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(stored_state(), "running");

    // Make every write of the domain row fail, as a full disk would.
    db.execute_batch(
        "CREATE TRIGGER fail_put BEFORE UPDATE ON domains BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .unwrap();
    let e = f.mgr.action("db", DomainOp::Suspend, None).unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal);
    assert!(e.message.contains("disk full"), "{e}");
    assert_eq!(
        state(&f.mgr, "db"),
        (DomainState::Running, StateReason::Booted)
    );
    assert!(f.mgr.set_autostart("db", true).is_err());
    assert!(!f.mgr.domain("db").unwrap().autostart);
    assert!(f.mgr.job_info("db").unwrap().job.is_none());

    // With the store back, the same operation goes through: stored, then shown.
    db.execute_batch("DROP TRIGGER fail_put;").unwrap();
    f.mgr.action("db", DomainOp::Suspend, None).unwrap();
    assert_eq!(stored_state(), "paused");
    assert_eq!(state(&f.mgr, "db").0, DomainState::Paused);
}

/// The generation the running VM of `name` reports its exit with.
fn generation(mgr: &Manager, name: &str) -> u64 {
    mgr.lock().doms.get(name).map(|d| d.generation).unwrap()
}

#[test]
fn a_vm_exit_during_a_job_is_handled_when_the_job_ends() {
    let f = fixture(Limits::default());
    define(&f, "x");
    f.mgr.action("x", DomainOp::Start, None).unwrap();
    f.fake.hold("suspend", false);
    let suspend = in_background(&f.mgr, "x", DomainOp::Suspend, None);
    f.fake.wait_inside("suspend");
    // The guest powers off while the suspend is inside the driver: the monitor does not wait.
    f.mgr
        .vm_exited("x", generation(&f.mgr, "x"), ExitKind::Poweroff);
    assert_eq!(state(&f.mgr, "x").0, DomainState::Running);
    f.fake.release("suspend");
    suspend.join().unwrap().unwrap();
    assert_eq!(
        state(&f.mgr, "x"),
        (DomainState::Shutoff, StateReason::Shutdown)
    );
    assert!(f.mgr.job_info("x").unwrap().job.is_none());
    // A late report from that VM changes nothing.
    f.mgr.action("x", DomainOp::Start, None).unwrap();
    f.mgr
        .vm_exited("x", generation(&f.mgr, "x") - 1, ExitKind::Crash);
    assert_eq!(state(&f.mgr, "x").0, DomainState::Running);
}

#[test]
fn a_restart_after_an_exit_runs_as_a_job_off_the_monitor_thread() {
    let f = fixture(Limits::default());
    define(&f, "phoenix");
    f.mgr
        .update_config("phoenix", true, |d| {
            d.on_crash = ferrovirt_api::Action::Restart
        })
        .unwrap();
    f.mgr.action("phoenix", DomainOp::Start, None).unwrap();
    f.fake.hold("start", false);
    let gen = generation(&f.mgr, "phoenix");
    let mgr = f.mgr.clone();
    let monitor = thread::spawn(move || mgr.vm_exited("phoenix", gen, ExitKind::Crash));
    f.fake.wait_inside("start");
    // The restart is inside the driver: queries answer and show it.
    let job = f
        .mgr
        .job_info("phoenix")
        .unwrap()
        .job
        .expect("the restart job");
    assert_eq!(
        (job.name.as_str(), job.kind),
        ("restart", ferrovirt_api::JobKind::Internal)
    );
    assert_eq!(state(&f.mgr, "phoenix").0, DomainState::Crashed);
    assert_eq!(f.mgr.list(true).len(), 1);
    f.fake.release("start");
    monitor.join().unwrap();
    assert_eq!(
        state(&f.mgr, "phoenix"),
        (DomainState::Running, StateReason::Restarted)
    );
}

#[test]
fn a_wait_longer_than_the_cap_ends_with_the_busy_error() {
    let f = fixture(Limits {
        max_wait: Duration::from_millis(300),
        ..Limits::default()
    });
    define(&f, "capped");
    f.mgr.action("capped", DomainOp::Start, None).unwrap();
    f.fake.hold("reset", false);
    let reset = in_background(&f.mgr, "capped", DomainOp::Reset, None);
    f.fake.wait_inside("reset");
    let e = f
        .mgr
        .action("capped", DomainOp::Suspend, Some(Duration::from_secs(3600)))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::DomainBusy, "{e}");
    f.fake.release("reset");
    reset.join().unwrap().unwrap();
}

#[test]
fn store_writes_never_hold_the_domain_table_lock() {
    let f = fixture(Limits::default());
    // At every write: could a `list` take the table's lock right now?
    let seen = Arc::new(Mutex::new(Vec::<bool>::new()));
    {
        let mgr = Arc::downgrade(&f.mgr);
        let seen = seen.clone();
        f.mgr.store.lock().unwrap().on_write = Some(Box::new(move || {
            let free = mgr.upgrade().is_some_and(|m| m.inner.try_lock().is_ok());
            seen.lock().unwrap().push(free);
        }));
    }
    define(&f, "w");
    f.mgr.set_autostart("w", true).unwrap();
    f.mgr
        .update_config("w", true, |d| d.memory_kib = 219_100)
        .unwrap();
    for op in [
        DomainOp::Start,
        DomainOp::Suspend,
        DomainOp::Resume,
        DomainOp::Destroy,
        DomainOp::Start,
    ] {
        f.mgr.action("w", op, None).unwrap();
    }
    // The VM ends by itself (poweroff): recorded by the exit job.
    f.mgr
        .vm_exited("w", generation(&f.mgr, "w"), ExitKind::Poweroff);
    assert_eq!(state(&f.mgr, "w").0, DomainState::Shutoff);
    f.mgr.undefine("w").unwrap();
    // A transient domain: stored when it starts, deleted when it is destroyed.
    let kernel = f.dir.join("kernel");
    let mut def = DomainDef::new("t");
    def.virt_type = Some(VirtType::Test);
    def.os.kernel = Some(kernel);
    f.mgr.define(def, Vec::new(), true, false).unwrap();
    f.mgr.action("t", DomainOp::Destroy, None).unwrap();
    assert!(f.mgr.domain("t").is_err());

    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 11, "{} writes", seen.len());
    assert!(
        seen.iter().all(|&free| free),
        "writes under the table's lock: {seen:?}"
    );
}
