//! Save, restore and managed save (virsh `save`, `restore`, `managedsave`, `managedsave-remove`),
//! each as the domain's job, with no driver call under the lock.
//!
//! A save checks everything and writes the file's header before it touches the VM; the driver
//! then pauses the VM and writes its payload; only a complete, synced file stops the VM (state
//! "shut off (saved)"). Any failure removes the file and leaves the VM as it was. A restore
//! reads and checks the whole file header first and starts the domain it names, from the
//! engine that wrote it. A managed save is a save to the daemon's own file
//! (state-dir/save/NAME.save, written under a temporary name and renamed when complete); the
//! next start resumes from it and removes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovirt_api::engine::Engine;
use ferrovirt_api::save::StartState;
use ferrovirt_api::{
    xml, ApiError, DomainDef, DomainInfo, DomainState, ErrorCode, JobKind, JobProgress, StateReason,
};

use super::commit::{self, Transient};
use super::jobs::{JobHandle, JobSpec};
use super::lifecycle::Launch;
use super::{Dom, Manager};
use crate::deadline::Deadline;
use crate::driver::{Driver, VmRef};
use crate::files;
use crate::runtime::{now_ms, Runtime};
use crate::save::format::{self, SaveHeader};
use crate::store::StoredDomain;

/// Saving and restoring move all of guest RAM: more time than a lifecycle call, yet answered
/// before the client's own 120 s limit.
const SAVE_LIMIT: Duration = Duration::from_secs(100);

/// How long the stopped VM's console may take to deliver its last output.
const CONSOLE_DRAIN: Duration = Duration::from_secs(5);

const SAVE: JobSpec = JobSpec {
    name: "save",
    kind: JobKind::Operation,
    cancellable: true,
};
const RESTORE: JobSpec = JobSpec {
    name: "restore",
    kind: JobKind::Operation,
    cancellable: true,
};

/// A job's progress slot as a driver's byte counter.
pub(super) fn progress<'a>(
    job: &'a JobHandle,
    phase: &'static str,
) -> impl Fn(u64, Option<u64>) + Sync + 'a {
    move |done, total| {
        job.set_progress(Some(JobProgress {
            phase: Some(phase.to_string()),
            done,
            total,
            unit: "bytes".into(),
        }))
    }
}

/// What a save copies out of the domain before the lock is released.
struct Running {
    def: DomainDef,
    runtime: Runtime,
    driver: std::sync::Arc<dyn Driver>,
    engine: Engine,
    state: DomainState,
    reason: StateReason,
    /// The answer if the domain is gone afterwards (a transient domain that was saved).
    gone: DomainInfo,
}

impl Manager {
    /// `POST /v1/domains/{name}/save`.
    pub fn save(
        &self,
        name: &str,
        file: &str,
        start: Option<StartState>,
    ) -> Result<DomainInfo, ApiError> {
        let target = format::check_path(file)?.to_path_buf();
        self.save_job(name, Target::File(target), start)
    }

    /// `POST /v1/domains/{name}/managed-save`.
    pub fn managed_save(
        &self,
        name: &str,
        start: Option<StartState>,
    ) -> Result<DomainInfo, ApiError> {
        self.save_job(name, Target::Managed, start)
    }

    /// `DELETE /v1/domains/{name}/managed-save`.
    pub fn managed_save_remove(&self, name: &str) -> Result<DomainInfo, ApiError> {
        let inner = self.lock();
        let (inner, name, job) = self.take_job(
            inner,
            name,
            JobSpec::internal("managedsave-remove", false),
            Duration::ZERO,
        )?;
        drop(inner);
        let path = self.paths.managed_save(&name);
        let removed = match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
                ErrorCode::OperationInvalid,
                format!("domain '{name}' has no managed save"),
            )),
            Err(e) => Err(ApiError::new(
                ErrorCode::StorageError,
                format!("cannot remove {}: {e}", path.display()),
            )),
        };
        self.end_job(&name, &job);
        removed.and_then(|()| self.domain(&name))
    }

    /// undefine keeps no orphan save file (virsh refuses the same way without --managed-save).
    pub(super) fn refuse_if_managed_save(&self, name: &str) -> Result<(), ApiError> {
        if self.paths.managed_save(name).exists() {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' has a managed save; remove it first with `ferrovirt managedsave-remove {name}`"
            )));
        }
        Ok(())
    }

    /// The managed save a start should resume from: only a user's start or an autostart
    /// (a restart after a guest reboot boots afresh).
    pub(super) fn managed_save_to_resume(
        &self,
        name: &str,
        reason: StateReason,
    ) -> Option<PathBuf> {
        let path = self.paths.managed_save(name);
        (reason == StateReason::Booted && path.exists()).then_some(path)
    }

    /// Within a start's job: resume from the managed save, then remove it.
    pub(super) fn start_from_managed_save(
        &self,
        name: &str,
        path: &Path,
        job: &JobHandle,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        let hint = |e: ApiError| {
            ApiError::new(
                e.code,
                format!(
                    "{}; the managed save is kept (`ferrovirt managedsave-remove {name}` discards it and the next start boots afresh)",
                    e.message
                ),
            )
        };
        let mut saved = format::open(path).map_err(hint)?;
        let uuid = self.definition(name)?.uuid;
        if saved.header.definition.name != name || saved.header.definition.uuid != uuid {
            return Err(hint(ApiError::invalid(format!(
                "{} belongs to another domain ('{}')",
                path.display(),
                saved.header.definition.name
            ))));
        }
        let paused = saved.header.start == StartState::Paused;
        self.launch(
            name,
            job,
            deadline,
            Launch::Restore {
                saved: &mut saved,
                paused,
            },
        )
        .map_err(hint)?;
        if let Err(e) = std::fs::remove_file(path) {
            eprintln!(
                "ferrovirtd: cannot remove the managed save {}: {e}",
                path.display()
            );
        }
        Ok(())
    }

    /// `POST /v1/restore`: the file names its domain; one that does not exist comes back as a
    /// transient domain (as with virsh).
    pub fn restore(&self, file: &str, start: Option<StartState>) -> Result<DomainInfo, ApiError> {
        let path = format::check_path(file)?;
        let mut saved = format::open(path)?;
        let def = saved.header.definition.clone();
        let name = def.name.clone();
        let driver = self.drivers.get(saved.header.engine.driver())?;
        driver.check(&def)?;
        self.check_policy(&def)?;
        self.networks.check_interfaces(&def, false)?;
        // The writer lock (then the table's) from the checks to the new domain's insertion, so
        // no define of the same name comes in between (as define does it).
        let writer = self.writer();
        let mut inner = self.lock();
        let existing = Self::get(&inner, &name)
            .ok()
            .map(|d| d.stored.def.uuid.clone());
        match existing {
            Some(uuid) if uuid != def.uuid => {
                return Err(ApiError::new(
                    ErrorCode::DomainExists,
                    format!(
                        "domain '{name}' exists with uuid {}, the save file is of uuid {}",
                        uuid.unwrap_or_default(),
                        def.uuid.unwrap_or_default()
                    ),
                ))
            }
            Some(_) => {}
            None => {
                if let Some(other) = inner
                    .doms
                    .values()
                    .find(|d| d.stored.def.uuid.is_some() && d.stored.def.uuid == def.uuid)
                {
                    return Err(ApiError::new(
                        ErrorCode::DomainExists,
                        format!(
                            "domain '{}' already has the save file's uuid {}",
                            other.stored.def.name,
                            def.uuid.unwrap_or_default()
                        ),
                    ));
                }
                // Nothing is stored unless the VM starts; a failed restore forgets it.
                inner.doms.insert(
                    name.clone(),
                    Dom::new(StoredDomain {
                        def,
                        persistent: false,
                        autostart: false,
                        state: DomainState::Shutoff,
                        reason: StateReason::Unknown,
                        runtime: None,
                    }),
                );
            }
        }
        let taken = self.take_job(inner, &name, RESTORE, Duration::ZERO);
        drop(writer);
        let (inner, name, job) = taken?;
        let state = Self::get(&inner, &name)?.stored.state;
        drop(inner);
        if state.is_active() {
            self.end_job(&name, &job);
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is {}: a save file restores a domain that is not running",
                state.display()
            )));
        }
        let paused = start.unwrap_or(saved.header.start) == StartState::Paused;
        let deadline = job.deadline(SAVE_LIMIT, format!("domain '{name}': restore"));
        let (worker_name, answer_name) = (name.clone(), name.clone());
        self.run_job(
            &name,
            job,
            deadline,
            move |mgr, job, deadline| {
                mgr.launch(
                    &worker_name,
                    job,
                    deadline,
                    Launch::Restore {
                        saved: &mut saved,
                        paused,
                    },
                )
            },
            move |mgr| mgr.domain(&answer_name),
        )?
    }

    fn save_job(
        &self,
        name: &str,
        target: Target,
        start: Option<StartState>,
    ) -> Result<DomainInfo, ApiError> {
        let inner = self.lock();
        let (inner, name, job) = self.take_job(inner, name, SAVE, Duration::ZERO)?;
        let prepared = (|| {
            let dom = Self::get(&inner, &name)?;
            let s = &dom.stored;
            if !s.state.is_active() {
                return Err(ApiError::wrong_state(format!(
                    "domain '{name}' is {}: only a running or paused domain can be saved",
                    s.state.display()
                )));
            }
            if matches!(target, Target::Managed) && !s.persistent {
                return Err(ApiError::wrong_state(format!(
                    "domain '{name}' is transient: a managed save needs a defined domain (use save FILE)"
                )));
            }
            let runtime = s.runtime.clone().unwrap_or_default();
            let driver = self.running_driver(&s.def, &runtime)?;
            let mut gone = self.info(dom);
            (gone.state, gone.reason, gone.id, gone.pid) =
                (DomainState::Shutoff, StateReason::Saved, None, None);
            Ok(Running {
                def: s.def.clone(),
                engine: runtime.engine.unwrap_or(self.engine(&s.def).engine),
                runtime,
                driver,
                state: s.state,
                reason: s.reason,
                gone,
            })
        })();
        drop(inner);
        let running = match prepared {
            Ok(r) => r,
            Err(e) => {
                self.end_job(&name, &job);
                return Err(e);
            }
        };
        let deadline = job.deadline(SAVE_LIMIT, format!("domain '{name}': save"));
        let (worker_name, answer_name) = (name.clone(), name.clone());
        let gone = running.gone.clone();
        self.run_job(
            &name,
            job,
            deadline,
            move |mgr, job, deadline| {
                mgr.save_body(&worker_name, running, &target, start, job, deadline)
            },
            move |mgr| mgr.domain(&answer_name).unwrap_or(gone),
        )
    }

    /// The slow part of a save, on the job's thread.
    fn save_body(
        &self,
        name: &str,
        r: Running,
        target: &Target,
        start: Option<StartState>,
        job: &JobHandle,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        let (path, finally) = target.paths(self, name)?;
        let mut file = format::create(&path)?;
        let result = self.write_save(name, &r, &path, &mut file, start, job, deadline);
        drop(file);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        if let Some(final_path) = &finally {
            if let Err(e) = std::fs::rename(&path, final_path) {
                let _ = std::fs::remove_file(&path);
                self.resume_after_failed_save(name, &r);
                return Err(ApiError::new(
                    ErrorCode::StorageError,
                    format!("cannot put the managed save in place: {e}"),
                ));
            }
        }
        // The file is complete and durable: the VM goes.
        let vm_dir = self.paths.vm_dir(name);
        let cleanup = Deadline::after(
            self.limits.destroy,
            format!("domain '{name}': stop after save"),
        );
        let vm = VmRef {
            def: &r.def,
            vm_dir: &vm_dir,
            runtime: &r.runtime,
            deadline: &cleanup,
        };
        let console = self.lock().doms.get(name).and_then(|d| d.console.clone());
        if let Err(e) = r.driver.destroy(&vm) {
            // Saved, but the VM still exists: keep both rather than a file that is not the end.
            let _ = std::fs::remove_file(finally.as_ref().unwrap_or(&path));
            self.resume_after_failed_save(name, &r);
            return Err(e);
        }
        // What the guest printed before the pause is logged before a restore can append to
        // the same console log: the old console's pump ends at the VM's end of output.
        if let Some(hub) = console {
            let drained = Deadline::after(CONSOLE_DRAIN, format!("domain '{name}': console"));
            while hub.is_connected() && !drained.expired() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.record_gone(name, job, &r.def, StateReason::Saved)
    }

    /// Header, paused state, payload, completion: everything of a save that can still fail
    /// without consequence. On an error the VM is as it was before.
    #[allow(clippy::too_many_arguments)]
    fn write_save(
        &self,
        name: &str,
        r: &Running,
        path: &Path,
        file: &mut std::fs::File,
        start: Option<StartState>,
        job: &JobHandle,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        let mut def = r.def.clone();
        if r.engine == Engine::Qemu && def.accel.is_none() {
            def.accel = self.engine(&def).accel;
        }
        let was = if r.state == DomainState::Paused {
            StartState::Paused
        } else {
            StartState::Running
        };
        let header = SaveHeader {
            engine: r.engine,
            xml: xml::emit(&def, self.default_type),
            definition: def,
            start: start.unwrap_or(was),
            saved_ms: now_ms(),
            daemon_version: ferrovirt_api::VERSION.into(),
        };
        let writer = format::write_header(path, file, &header)?;
        deadline.check()?;
        self.set_state(name, DomainState::Paused, StateReason::Saving)?;
        let vm_dir = self.paths.vm_dir(name);
        let vm = VmRef {
            def: &r.def,
            vm_dir: &vm_dir,
            runtime: &r.runtime,
            deadline,
        };
        let progress = progress(job, "saving memory and device state");
        if let Err(e) = r.driver.save(&vm, file, &progress) {
            // The driver left the VM as it was; the record follows.
            self.restore_state(name, r);
            return Err(e);
        }
        if let Err(e) = writer.finish(path, file) {
            self.resume_after_failed_save(name, r);
            return Err(e);
        }
        Ok(())
    }

    /// The driver saved, but the save cannot be completed: the VM runs on as before.
    fn resume_after_failed_save(&self, name: &str, r: &Running) {
        if r.state == DomainState::Running {
            let vm_dir = self.paths.vm_dir(name);
            let deadline = Deadline::after(
                self.limits.op,
                format!("domain '{name}': resume after a failed save"),
            );
            let vm = VmRef {
                def: &r.def,
                vm_dir: &vm_dir,
                runtime: &r.runtime,
                deadline: &deadline,
            };
            if let Err(e) = r.driver.resume(&vm) {
                eprintln!("ferrovirtd: {e}");
                return;
            }
        }
        self.restore_state(name, r);
    }

    fn set_state(
        &self,
        name: &str,
        state: DomainState,
        reason: StateReason,
    ) -> Result<(), ApiError> {
        self.writer()
            .commit(name, Transient::Keep, commit::state(state, reason))
    }

    /// The record as it was before the save began.
    fn restore_state(&self, name: &str, r: &Running) {
        if let Err(e) = self.set_state(name, r.state, r.reason) {
            eprintln!("ferrovirtd: cannot record domain '{name}''s state after a failed save: {e}");
        }
    }
}

/// Where a save goes.
enum Target {
    /// A user's file (must not exist).
    File(PathBuf),
    /// The daemon's managed save of the domain.
    Managed,
}

impl Target {
    /// (the file written, the name it gets once complete).
    fn paths(&self, mgr: &Manager, name: &str) -> Result<(PathBuf, Option<PathBuf>), ApiError> {
        match self {
            Target::File(p) => Ok((p.clone(), None)),
            Target::Managed => {
                files::private_dir(&mgr.paths.saves()).map_err(ApiError::internal)?;
                let done = mgr.paths.managed_save(name);
                let partial = done.with_extension("save.partial");
                // What a crash during an earlier managed save left behind.
                let _ = std::fs::remove_file(&partial);
                Ok((partial, Some(done)))
            }
        }
    }
}
