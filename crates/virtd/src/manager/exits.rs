//! A VM that ended by itself: its driver's monitor reports, the end is recorded, and its
//! on_poweroff / on_reboot / on_crash action runs, all as the domain's job (an exit during
//! another job waits for that job to end), never with a driver call under the lock.

use ferrovirt_api::state::EventKind;
use ferrovirt_api::{Action, DomainDef, DomainState, StateReason};

use super::commit::{self, Transient};
use super::jobs::{Job, JobHandle, EXIT};
use super::{Inner, Manager};
use crate::runtime::ExitKind;

/// How a VM's end is handled: (on_* action, state, reason, event, event detail).
fn exit_outcome(
    def: &DomainDef,
    kind: ExitKind,
) -> (Action, DomainState, StateReason, EventKind, &'static str) {
    match kind {
        ExitKind::Poweroff => (
            def.on_poweroff,
            DomainState::Shutoff,
            StateReason::Shutdown,
            EventKind::Shutdown,
            "guest powered off",
        ),
        ExitKind::Reboot => (
            def.on_reboot,
            DomainState::Shutoff,
            StateReason::Shutdown,
            EventKind::Shutdown,
            "guest rebooted",
        ),
        ExitKind::Crash => (
            def.on_crash,
            DomainState::Crashed,
            StateReason::Crashed,
            EventKind::Crashed,
            "guest crashed",
        ),
        ExitKind::Destroyed => (
            Action::Destroy,
            DomainState::Shutoff,
            StateReason::Destroyed,
            EventKind::Stopped,
            "destroyed",
        ),
    }
}
impl Manager {
    /// Mark a domain's VM gone in memory (after its record was committed).
    pub(super) fn stopped_in_memory(inner: &mut Inner, name: &str) {
        if let Some(d) = inner.doms.get_mut(name) {
            d.generation += 1;
            d.pending_reboot = false;
            d.pending_exit = None;
            d.killed = false;
            d.console = None;
        }
    }

    /// A driver's monitor saw the VM end by itself. While a job runs on the domain the exit
    /// waits for it to end; otherwise it is handled now, as a job of its own, on this (the
    /// monitor's) thread.
    pub(super) fn vm_exited(&self, name: &str, generation: u64, kind: ExitKind) {
        let job = {
            let mut inner = self.lock();
            let Some(dom) = inner.doms.get_mut(name) else {
                return;
            };
            if dom.job.is_some() {
                dom.pending_exit = Some((generation, kind));
                return;
            }
            if dom.generation != generation || !dom.stored.state.is_active() {
                return;
            }
            let (job, handle) = Job::new(EXIT);
            dom.job = Some(job);
            handle
        };
        self.finish_exit(name, kind, &job);
        self.end_job(name, &job);
    }

    /// Within the job `job`: record that the VM ended, then apply on_poweroff / on_reboot /
    /// on_crash (a restart runs in the same job).
    pub(super) fn finish_exit(&self, name: &str, kind: ExitKind, job: &JobHandle) {
        let (def, kind) = {
            let inner = self.lock();
            let Some(dom) = inner.doms.get(name) else {
                return;
            };
            let kind = if dom.killed {
                ExitKind::Destroyed
            } else if dom.pending_reboot && kind == ExitKind::Poweroff {
                ExitKind::Reboot
            } else {
                kind
            };
            (dom.stored.def.clone(), kind)
        };
        let (action, state, reason, event, detail) = exit_outcome(&def, kind);
        // The VM is gone: its TAPs go with it.
        self.networks.unplug(&def);
        let restart = action == Action::Restart;
        let keep = if restart {
            Transient::Keep
        } else {
            Transient::Forget
        };
        self.record_stop(name, keep, state, reason);
        self.events.emit(name, event, detail);
        if restart {
            self.rename_job(name, job, "restart");
            let deadline = job.deadline(self.limits.start, format!("domain '{name}': restart"));
            if let Err(e) = self.start_body(name, job, StateReason::Restarted, &deadline) {
                eprintln!("ferrovirtd: restart of '{name}' failed: {e}");
                self.record_stop(
                    name,
                    Transient::Forget,
                    DomainState::Shutoff,
                    StateReason::Failed,
                );
                self.events.emit(name, EventKind::Stopped, "failed");
            }
        } else if event != EventKind::Stopped {
            self.events.emit(name, EventKind::Stopped, reason.as_str());
        }
    }

    /// Commit that a VM ended by itself. Nobody waits for an answer here, and memory must follow
    /// the VM: when the store fails, memory is updated anyway and the error is logged (the next
    /// commit of the domain writes the record again).
    pub(super) fn record_stop(
        &self,
        name: &str,
        keep: Transient,
        state: DomainState,
        reason: StateReason,
    ) {
        let mut writer = self.writer();
        let change = commit::stopped(state, reason);
        let committed = writer.commit_and(name, keep, change, |inner| {
            Self::stopped_in_memory(inner, name)
        });
        if let Err(e) = committed {
            eprintln!("ferrovirtd: cannot record that domain '{name}' stopped: {e}");
            let mut inner = self.lock();
            if let Some(d) = inner.doms.get_mut(name) {
                change(&mut d.stored);
            }
            Self::stopped_in_memory(&mut inner, name);
        }
    }
}
