//! Daemon start: reattach to the VMs recorded as running (or record that they are gone), then
//! autostart. Each runs as the domain's job, without a driver call under the lock; the API is
//! not served yet.

use std::sync::MutexGuard;
use std::time::Duration;

use ferrovirt_api::state::EventKind;
use ferrovirt_api::{DomainState, StateReason};

use super::commit::Transient;
use super::jobs::{JobHandle, JobSpec};
use super::{Inner, Manager};

const REATTACH: JobSpec = JobSpec::internal("reattach", false);
const AUTOSTART: JobSpec = JobSpec::internal("autostart", true);

impl Manager {
    /// Daemon start: reattach to running VMs, mark vanished ones, then autostart. Each is a job
    /// (no driver call under the lock); the API is not served yet.
    pub(super) fn recover(&self) {
        let active: Vec<String> = {
            let inner = self.lock();
            inner
                .doms
                .values()
                .filter(|d| d.stored.state.is_active())
                .map(|d| d.stored.def.name.clone())
                .collect()
        };
        for name in active {
            let Ok((inner, name, job)) =
                self.take_job(self.lock(), &name, REATTACH, Duration::ZERO)
            else {
                continue;
            };
            self.reattach(inner, &name, &job);
            self.end_job(&name, &job);
        }
        let autostart: Vec<String> = {
            let inner = self.lock();
            inner
                .doms
                .values()
                .filter(|d| {
                    d.stored.persistent && d.stored.autostart && !d.stored.state.is_active()
                })
                .map(|d| d.stored.def.name.clone())
                .collect()
        };
        for name in autostart {
            let Ok((inner, name, job)) =
                self.take_job(self.lock(), &name, AUTOSTART, Duration::ZERO)
            else {
                continue;
            };
            drop(inner);
            let deadline = job.deadline(self.limits.start, format!("domain '{name}': autostart"));
            if let Err(e) = self.start_body(&name, &job, StateReason::Booted, &deadline) {
                eprintln!("ferrovirtd: autostart of '{name}' failed: {e}");
            }
            self.end_job(&name, &job);
        }
    }

    /// Within the job `job`: reconnect to a VM recorded as running, or record that it is gone.
    fn reattach(&self, mut inner: MutexGuard<'_, Inner>, name: &str, job: &JobHandle) {
        let Some(dom) = inner.doms.get_mut(name) else {
            return;
        };
        let def = dom.stored.def.clone();
        let runtime = dom.stored.runtime.clone().unwrap_or_default();
        // The new monitor reports with the next generation; exits before we set it wait for
        // this job to end.
        let generation = dom.generation + 1;
        dom.generation = generation;
        drop(inner);
        let deadline = job.deadline(self.limits.op, format!("domain '{name}': reattach"));
        let started = self.running_driver(&def, &runtime).ok().and_then(|driver| {
            let ctx = self.ctx(&def, runtime.id, generation, deadline).ok()?;
            driver.reattach(ctx, &runtime)
        });
        match started {
            Some(s) => {
                let mut inner = self.lock();
                if let Some(dom) = inner.doms.get_mut(name) {
                    dom.console = s.console;
                }
                eprintln!(
                    "ferrovirtd: reattached to domain '{name}' (pid {:?})",
                    s.runtime.pid
                );
            }
            None => {
                eprintln!("ferrovirtd: domain '{name}' was running but its VM is gone; marking it shut off");
                self.networks.unplug(&def);
                self.record_stop(
                    name,
                    Transient::Forget,
                    DomainState::Shutoff,
                    StateReason::Vanished,
                );
                self.events.emit(name, EventKind::Stopped, "vanished");
            }
        }
    }
}
