//! What feature modules outside the manager (crate::snapshot) build on: run work as a domain's
//! job with a copy of the domain (no lock held while it runs), commit a changed definition, stop
//! and start the domain's VM within that job. The same rules as the lifecycle operations: one
//! job per domain, no driver call under the lock, a commit only after the job is settled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrovirt_api::state::EventKind;
use ferrovirt_api::{ApiError, DomainDef, DomainInfo, DomainState, JobKind, StateReason};

use super::commit::{self, Transient};
use super::jobs::{JobHandle, JobSpec};
use super::Manager;
use crate::deadline::Deadline;
use crate::driver::{Driver, Started, VmCtx, VmRef};
use crate::runtime::Runtime;

/// A domain as a feature job sees it: copied out when the job was taken.
#[derive(Clone)]
pub struct DomainCopy {
    pub name: String,
    pub def: DomainDef,
    pub state: DomainState,
    pub runtime: Runtime,
    /// The driver running the VM (or that would start it).
    pub driver: Arc<dyn Driver>,
}

impl DomainCopy {
    /// The VM handle for driver calls.
    pub fn vm<'a>(&'a self, vm_dir: &'a std::path::Path, deadline: &'a Deadline) -> VmRef<'a> {
        VmRef {
            def: &self.def,
            vm_dir,
            runtime: &self.runtime,
            deadline,
        }
    }
}

/// How a feature job starts the VM.
pub type Launch<'a> = &'a (dyn Fn(&dyn Driver, VmCtx) -> Result<Started, ApiError> + Sync);

impl Manager {
    /// Run `work` as the domain's job `job_name` (busy domain: `domain_busy`, or wait up to
    /// `wait`), with `limit` for the whole of it; `cancellable` lets domjobabort stop it.
    pub(crate) fn feature_job<T: Send + 'static>(
        &self,
        name: &str,
        job_name: &'static str,
        cancellable: bool,
        wait: Option<Duration>,
        limit: Duration,
        work: impl FnOnce(&Manager, &JobHandle, &Deadline, DomainCopy) -> Result<T, ApiError>
            + Send
            + 'static,
    ) -> Result<T, ApiError> {
        let wait = wait.unwrap_or_default().min(self.limits.max_wait);
        let inner = self.lock();
        let spec = JobSpec {
            name: job_name,
            kind: JobKind::Operation,
            cancellable,
        };
        let (inner, name, job) = self.take_job(inner, name, spec, wait)?;
        let copy = (|| {
            let dom = Self::get(&inner, &name)?;
            let state = dom.stored.state;
            let runtime = dom.stored.runtime.clone().unwrap_or_default();
            let driver = match &dom.stored.runtime {
                Some(r) if state.is_active() => self.running_driver(&dom.stored.def, r)?,
                _ => self.driver(&dom.stored.def)?,
            };
            Ok(DomainCopy {
                name: name.clone(),
                def: dom.stored.def.clone(),
                state,
                runtime,
                driver,
            })
        })();
        drop(inner);
        let copy = match copy {
            Ok(c) => c,
            Err(e) => {
                self.end_job(&name, &job);
                return Err(e);
            }
        };
        let deadline = job.deadline(limit, format!("domain '{name}': {job_name}"));
        let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let out = slot.clone();
        self.run_job(
            &name,
            job,
            deadline,
            move |mgr, job, deadline| {
                let value = work(mgr, job, deadline, copy)?;
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
                Ok(())
            },
            move |_| slot.lock().unwrap_or_else(|p| p.into_inner()).take(),
        )?
        .ok_or_else(|| ApiError::internal("the job ended without a result"))
    }

    /// Store a new definition for the domain (its disks moved to new images), within its job.
    pub(crate) fn commit_definition(
        &self,
        name: &str,
        job: &JobHandle,
        def: DomainDef,
    ) -> Result<(), ApiError> {
        let mut writer = self.writer();
        Self::settle(&mut self.lock(), name, job);
        writer.commit(name, Transient::Keep, |s| s.def = def)
    }

    /// Record the VM's state (paused, running) after a feature job changed it.
    pub(crate) fn commit_state(
        &self,
        name: &str,
        job: &JobHandle,
        state: DomainState,
        reason: StateReason,
    ) -> Result<(), ApiError> {
        let mut writer = self.writer();
        Self::settle(&mut self.lock(), name, job);
        writer.commit(name, Transient::Keep, commit::state(state, reason))?;
        drop(writer);
        let kind = match state {
            DomainState::Paused => EventKind::Suspended,
            _ => EventKind::Resumed,
        };
        self.events.emit(name, kind, reason.as_str());
        Ok(())
    }

    /// Take the VM down within the job (a revert replaces it): destroy, unplug, record shut off.
    pub(crate) fn stop_for_job(
        &self,
        dom: &DomainCopy,
        job: &JobHandle,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        let vm_dir = self.paths.vm_dir(&dom.name);
        dom.driver.destroy(&dom.vm(&vm_dir, deadline))?;
        self.networks.unplug(&dom.def);
        let mut writer = self.writer();
        Self::settle(&mut self.lock(), &dom.name, job);
        writer.commit_and(
            &dom.name,
            Transient::Keep,
            commit::stopped(DomainState::Shutoff, StateReason::FromSnapshot),
            |inner| Self::stopped_in_memory(inner, &dom.name),
        )?;
        drop(writer);
        self.events.emit(
            &dom.name,
            EventKind::Stopped,
            StateReason::FromSnapshot.as_str(),
        );
        Ok(())
    }

    /// Start the VM within the job, the driver starting it through `launch`.
    pub(crate) fn start_for_job(
        &self,
        name: &str,
        job: &JobHandle,
        deadline: &Deadline,
        launch: Launch,
    ) -> Result<(), ApiError> {
        self.launch(
            name,
            job,
            deadline,
            super::lifecycle::Launch::Feature(launch),
        )
    }

    /// The domain as `GET /v1/domains/{name}` shows it.
    pub(crate) fn domain_info(&self, name: &str) -> Result<DomainInfo, ApiError> {
        self.domain(name)
    }

    /// Whether the domain is persistent and exists (for undefine checks of features).
    pub(crate) fn resolve_name(&self, name: &str) -> Result<String, ApiError> {
        Self::resolve(&self.lock(), name)
    }

    /// The runtime record of the domain's VM (default when it has none).
    pub(crate) fn runtime_of(&self, name: &str) -> Result<Runtime, ApiError> {
        let inner = self.lock();
        Ok(Self::get(&inner, name)?
            .stored
            .runtime
            .clone()
            .unwrap_or_default())
    }

    /// Limits for feature jobs: as long as a start.
    pub(crate) fn feature_limit(&self) -> Duration {
        self.limits.start
    }
}
