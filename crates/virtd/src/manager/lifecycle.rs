//! Lifecycle operations (start, shutdown, destroy ...): each runs as the domain's job, with no
//! driver call under the lock. VM exits are in [`super::exits`], daemon start in
//! [`super::recover`].

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use ferrovirt_api::engine::EngineChoice;
use ferrovirt_api::state::EventKind;
use ferrovirt_api::{
    ApiError, DomainDef, DomainInfo, DomainOp, DomainState, JobProgress, StateReason,
};

use super::commit::{self, Transient};
use super::jobs::{JobHandle, JobSpec};
use super::{Inner, Manager};
use crate::console::rotate_for_boot;
use crate::deadline::Deadline;
use crate::driver::{Driver, Started, VmRef};
use crate::runtime::Runtime;
use crate::save::format::SaveFile;

/// The steps of a start, for its job's progress.
const START_STEPS: u64 = 4;

/// How [`Manager::launch`] brings a VM up.
pub(super) enum Launch<'a> {
    /// Boot the stored definition; the state reason it runs with.
    Boot(StateReason),
    /// Restore a checked save file (its definition, its engine), then resume unless `paused`.
    Restore {
        saved: &'a mut SaveFile,
        paused: bool,
    },
    /// Boot the stored definition through a feature's own driver call (a snapshot revert
    /// starts the VM loading its memory); recorded running, from snapshot.
    Feature(super::feature_jobs::Launch<'a>),
}

impl Launch<'_> {
    /// The state and reason the VM is recorded with once up.
    fn outcome(&self) -> (DomainState, StateReason) {
        match self {
            Launch::Boot(reason) => (DomainState::Running, *reason),
            Launch::Restore { paused: false, .. } => (DomainState::Running, StateReason::Restored),
            Launch::Restore { paused: true, .. } => (DomainState::Paused, StateReason::User),
            Launch::Feature(_) => (DomainState::Running, StateReason::FromSnapshot),
        }
    }
}

/// What an operation copies out of the domain before the lock is released.
struct Snapshot {
    def: DomainDef,
    runtime: Runtime,
    driver: Arc<dyn Driver>,
}

/// Whether `op` may run on a domain in `state`.
fn allowed(op: DomainOp, name: &str, state: DomainState) -> Result<(), ApiError> {
    let (ok, what) = match op {
        DomainOp::Start => (
            !state.is_active(),
            "it is already active (destroy or shutdown it first)",
        ),
        DomainOp::Shutdown | DomainOp::Reboot => {
            (state == DomainState::Running, "it must be running")
        }
        DomainOp::Destroy | DomainOp::Reset => (state.is_active(), "it is not running"),
        DomainOp::Suspend => (
            state == DomainState::Running,
            "only a running domain can be suspended",
        ),
        DomainOp::Resume => (
            state == DomainState::Paused,
            "only a paused domain can be resumed",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::wrong_state(format!(
            "domain '{name}' is {}: {what}",
            state.display()
        )))
    }
}

impl Manager {
    fn limit(&self, op: DomainOp) -> Duration {
        match op {
            DomainOp::Start => self.limits.start,
            DomainOp::Destroy => self.limits.destroy,
            _ => self.limits.op,
        }
    }

    /// Run an operation on a domain. A domain busy with another job is an error at once, unless
    /// `wait` allows waiting (capped by the limits) for that job to end.
    pub fn action(
        &self,
        name: &str,
        op: DomainOp,
        wait: Option<Duration>,
    ) -> Result<DomainInfo, ApiError> {
        let mut wait = wait.unwrap_or_default().min(self.limits.max_wait);
        let mut inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        let mut killed = false;
        if op == DomainOp::Destroy {
            let guard;
            (guard, killed) = self.kill_if_busy(inner, &name)?;
            inner = guard;
            if killed {
                // The stuck job's calls fail now that the process is gone: wait for it to end.
                wait = wait.max(self.limits.destroy);
            }
        }
        let (inner, name, job) = self.take_job(inner, &name, JobSpec::operation(op), wait)?;
        match self.prepare(&inner, &name, op, killed) {
            Ok(Some(snapshot)) => {
                drop(inner);
                let deadline = job.deadline(self.limit(op), format!("domain '{name}': {op}"));
                let uuid = snapshot.def.uuid.clone().unwrap_or_default();
                let (memory_kib, vcpus) = (snapshot.def.memory_kib, snapshot.def.vcpus);
                let virt_type = self.vtype(&snapshot.def);
                let engine = self.engine(&snapshot.def);
                let (worker_name, answer_name) = (name.clone(), name.clone());
                self.run_job(
                    &name,
                    job,
                    deadline,
                    move |mgr, job, deadline| mgr.run_op(&worker_name, op, snapshot, job, deadline),
                    move |mgr| {
                        let name = answer_name;
                        // A transient domain that stopped is gone.
                        mgr.domain(&name).unwrap_or_else(|_| DomainInfo {
                            id: None,
                            name: name.clone(),
                            uuid,
                            virt_type,
                            engine,
                            state: DomainState::Shutoff,
                            reason: if op == DomainOp::Destroy {
                                StateReason::Destroyed
                            } else {
                                StateReason::Shutdown
                            },
                            persistent: false,
                            autostart: false,
                            memory_kib,
                            vcpus,
                            pid: None,
                            console_log: None,
                            managed_save: false,
                        })
                    },
                )
            }
            // Destroy found the VM already gone (it killed it to get past a stuck job).
            Ok(None) => {
                let info = self.info(Self::get(&inner, &name)?);
                drop(inner);
                self.end_job(&name, &job);
                Ok(info)
            }
            Err(e) => {
                drop(inner);
                self.end_job(&name, &job);
                Err(e)
            }
        }
    }

    /// Check the operation against the domain's state and copy out what the driver needs.
    /// None: nothing to do (a destroy that killed the VM, whose end was handled meanwhile).
    fn prepare(
        &self,
        inner: &Inner,
        name: &str,
        op: DomainOp,
        killed: bool,
    ) -> Result<Option<Snapshot>, ApiError> {
        let dom = Self::get(inner, name)?;
        let state = dom.stored.state;
        if killed && !state.is_active() {
            return Ok(None);
        }
        allowed(op, name, state)?;
        Ok(Some(Snapshot {
            def: dom.stored.def.clone(),
            runtime: dom.stored.runtime.clone().unwrap_or_default(),
            driver: match &dom.stored.runtime {
                Some(runtime) if state.is_active() => {
                    self.running_driver(&dom.stored.def, runtime)?
                }
                _ => self.driver(&dom.stored.def)?,
            },
        }))
    }

    /// Destroy of a domain busy with another job: SIGKILL its VM first (like libvirt), so the
    /// stuck job's calls fail at once instead of at their deadline. Returns whether it killed.
    fn kill_if_busy<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        name: &str,
    ) -> Result<(MutexGuard<'a, Inner>, bool), ApiError> {
        let Some(dom) = inner.doms.get_mut(name) else {
            return Ok((inner, false));
        };
        if dom.job.is_none() || !dom.stored.state.is_active() {
            return Ok((inner, false));
        }
        let runtime = dom.stored.runtime.clone().unwrap_or_default();
        let driver = self.running_driver(&dom.stored.def, &runtime)?;
        let Some(dom) = inner.doms.get_mut(name) else {
            return Ok((inner, false));
        };
        dom.killed = true;
        let def = dom.stored.def.clone();
        drop(inner);
        let vm_dir = self.paths.vm_dir(name);
        let deadline = Deadline::after(self.limits.destroy, format!("domain '{name}': destroy"));
        driver.kill(&VmRef {
            def: &def,
            vm_dir: &vm_dir,
            runtime: &runtime,
            deadline: &deadline,
        })?;
        Ok((self.lock(), true))
    }

    /// The slow part of an operation, on the job's worker thread, without the lock.
    fn run_op(
        &self,
        name: &str,
        op: DomainOp,
        snap: Snapshot,
        job: &JobHandle,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        if op == DomainOp::Start {
            return self.start_body(name, job, StateReason::Booted, deadline);
        }
        let vm_dir = self.paths.vm_dir(name);
        let vm = VmRef {
            def: &snap.def,
            vm_dir: &vm_dir,
            runtime: &snap.runtime,
            deadline,
        };
        match op {
            DomainOp::Start => unreachable!("handled above"),
            DomainOp::Shutdown | DomainOp::Reboot => {
                let ended = snap.driver.shutdown(&vm)?;
                let mut inner = self.lock();
                Self::settle(&mut inner, name, job);
                if let Some(d) = inner.doms.get_mut(name) {
                    d.pending_reboot = op == DomainOp::Reboot;
                    // Ended at once (test driver): handled when this job ends.
                    if let Some(kind) = ended {
                        d.pending_exit = Some((d.generation, kind));
                    }
                }
            }
            DomainOp::Destroy => {
                snap.driver.destroy(&vm)?;
                self.record_gone(name, job, &snap.def, StateReason::Destroyed)?;
            }
            DomainOp::Reset => {
                snap.driver.reset(&vm)?;
                Self::settle(&mut self.lock(), name, job);
            }
            DomainOp::Suspend => {
                snap.driver.suspend(&vm)?;
                let mut writer = self.writer();
                Self::settle(&mut self.lock(), name, job);
                writer.commit(
                    name,
                    Transient::Keep,
                    commit::state(DomainState::Paused, StateReason::User),
                )?;
                drop(writer);
                self.events.emit(name, EventKind::Suspended, "paused");
            }
            DomainOp::Resume => {
                snap.driver.resume(&vm)?;
                let mut writer = self.writer();
                Self::settle(&mut self.lock(), name, job);
                writer.commit(
                    name,
                    Transient::Keep,
                    commit::state(DomainState::Running, StateReason::Unpaused),
                )?;
                drop(writer);
                self.events.emit(name, EventKind::Resumed, "unpaused");
            }
        }
        Ok(())
    }

    /// The job `job` took the VM down (destroy, save): record it shut off for `reason`, whoever
    /// still waits for the answer.
    pub(super) fn record_gone(
        &self,
        name: &str,
        job: &JobHandle,
        def: &DomainDef,
        reason: StateReason,
    ) -> Result<(), ApiError> {
        self.networks.unplug(def);
        let mut writer = self.writer();
        Self::settle(&mut self.lock(), name, job);
        writer.commit_and(
            name,
            Transient::Forget,
            commit::stopped(DomainState::Shutoff, reason),
            |inner| Self::stopped_in_memory(inner, name),
        )?;
        drop(writer);
        self.events.emit(name, EventKind::Stopped, reason.as_str());
        Ok(())
    }

    /// Start the domain's VM within the job `job`: networks, driver, then commit. A start that
    /// cannot be recorded, was cancelled, or whose client stopped waiting is taken down again.
    /// A domain with a managed save resumes from it (see super::save).
    pub(super) fn start_body(
        &self,
        name: &str,
        job: &JobHandle,
        reason: StateReason,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        if let Some(path) = self.managed_save_to_resume(name, reason) {
            return self.start_from_managed_save(name, &path, job, deadline);
        }
        self.launch(name, job, deadline, Launch::Boot(reason))
    }

    /// Bring the domain's VM up as `how` says (see [`start_body`](Self::start_body)).
    pub(super) fn launch(
        &self,
        name: &str,
        job: &JobHandle,
        deadline: &Deadline,
        mut how: Launch,
    ) -> Result<(), ApiError> {
        let (def, generation, id, driver, engine) = {
            let mut inner = self.lock();
            let dom = Self::get(&inner, name)?;
            let (mut def, engine) = match &how {
                Launch::Boot(_) | Launch::Feature(_) => {
                    let def = dom.stored.def.clone();
                    let engine = self.engine(&def);
                    (def, engine)
                }
                Launch::Restore { saved, .. } => (
                    saved.header.definition.clone(),
                    EngineChoice {
                        engine: saved.header.engine,
                        accel: None,
                        reason: "the engine that wrote the save file".into(),
                        cannot_start: None,
                    },
                ),
            };
            engine.check_startable()?;
            self.check_policy(&def)?;
            // QEMU runs a kvm domain with accel=kvm: the driver reads the accelerator from the
            // definition it is handed (a copy; the stored one is unchanged).
            if engine.accel.is_some() {
                def.accel = engine.accel;
            }
            let driver = self.drivers.get(engine.engine.driver())?;
            // Every attempt gets its own generation: the late exit report of a VM whose start
            // (or restore) failed must not pass for the next attempt's.
            let Some(dom) = inner.doms.get_mut(name) else {
                return Err(ApiError::no_domain(name));
            };
            dom.generation += 1;
            let generation = dom.generation;
            let id = inner.next_id;
            inner.next_id += 1;
            (def, generation, id, driver, engine)
        };
        let step = |done: u64, phase: &str| {
            job.set_progress(Some(JobProgress {
                phase: Some(phase.to_string()),
                done,
                total: Some(START_STEPS),
                unit: "steps".into(),
            }))
        };
        step(0, "checking files");
        def.check_paths()?;
        deadline.check()?;
        // A restore continues the saved VM's console; a boot starts a new log.
        if matches!(how, Launch::Boot(_)) {
            rotate_for_boot(&self.paths.console_log(name));
        }
        let ctx = self.ctx(&def, id, generation, deadline.clone())?;
        step(1, "plugging network interfaces");
        self.networks.plug(&def)?;
        step(2, "starting the VM");
        eprintln!(
            "ferrovirtd: starting domain '{name}' on {}: {}",
            engine.describe(),
            engine.reason
        );
        let started = match &mut how {
            Launch::Boot(_) => driver.start(ctx),
            Launch::Feature(start) => start(&*driver, ctx),
            Launch::Restore { saved, .. } => {
                let progress = super::save::progress(job, "restoring memory and device state");
                driver.restore(ctx, &mut saved.file, saved.payload_len, &progress)
            }
        };
        let Started {
            mut runtime,
            console,
        } = match started {
            Ok(s) => s,
            Err(e) => {
                self.networks.unplug(&def);
                return Err(e);
            }
        };
        runtime.engine = Some(engine.engine);
        let undo = |e: ApiError| -> ApiError {
            let vm_dir = self.paths.vm_dir(name);
            let cleanup = Deadline::after(
                self.limits.destroy,
                format!("domain '{name}': destroy after a failed start"),
            );
            let vm = VmRef {
                def: &def,
                vm_dir: &vm_dir,
                runtime: &runtime,
                deadline: &cleanup,
            };
            if let Err(d) = driver.destroy(&vm) {
                eprintln!("ferrovirtd: {d}");
            }
            self.networks.unplug(&def);
            e
        };
        let (state, reason) = how.outcome();
        if state == DomainState::Running && matches!(how, Launch::Restore { .. }) {
            let vm_dir = self.paths.vm_dir(name);
            let vm = VmRef {
                def: &def,
                vm_dir: &vm_dir,
                runtime: &runtime,
                deadline,
            };
            if let Err(e) = driver.resume(&vm) {
                return Err(undo(e));
            }
        }
        if let Err(e) = deadline.check() {
            return Err(undo(e));
        }
        step(3, "recording");
        let mut writer = self.writer();
        if !Self::settle(&mut self.lock(), name, job) {
            drop(writer);
            return Err(undo(deadline.timeout("the VM started too late")));
        }
        let record = runtime.clone();
        let committed = writer.commit_started(
            name,
            id,
            |s| {
                s.state = state;
                s.reason = reason;
                s.runtime = Some(record);
            },
            // With the record: an exit report of the new generation must find it running.
            |inner| {
                if let Some(d) = inner.doms.get_mut(name) {
                    d.generation = generation;
                    d.pending_reboot = false;
                    d.killed = false;
                    d.console = console;
                }
            },
        );
        drop(writer);
        if let Err(e) = committed {
            // Not recorded means not started: take the VM down again rather than lose track of it.
            return Err(undo(e));
        }
        self.events.emit(name, EventKind::Started, reason.as_str());
        if state == DomainState::Paused {
            self.events
                .emit(name, EventKind::Suspended, "restored paused");
        }
        Ok(())
    }

    /// `create`: start the transient domain just inserted (the caller holds the lock).
    pub(super) fn create(
        &self,
        inner: MutexGuard<'_, Inner>,
        name: &str,
    ) -> Result<DomainInfo, ApiError> {
        let (inner, name, job) = self.take_job(
            inner,
            name,
            JobSpec::operation(DomainOp::Start),
            Duration::ZERO,
        )?;
        drop(inner);
        let deadline = job.deadline(self.limits.start, format!("domain '{name}': start"));
        let (worker_name, answer_name) = (name.clone(), name.clone());
        // A failed start forgets the domain (end_job drops inactive transient domains).
        self.run_job(
            &name,
            job,
            deadline,
            move |mgr, job, deadline| {
                mgr.start_body(&worker_name, job, StateReason::Booted, deadline)
            },
            move |mgr| mgr.domain(&answer_name),
        )?
    }
}
