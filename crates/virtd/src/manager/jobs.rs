//! Per-domain jobs (libvirt's job model): at most one job runs on a domain at a time. An
//! operation takes the domain's job under the manager lock, copies out what it needs, releases
//! the lock for the slow part (driver calls), then re-locks to commit and ends the job. Queries
//! (`list`, `dominfo`) never wait for a job; a second operation on a busy domain gets a clear
//! "busy" error, or waits a bounded time when its client asks.
//!
//! A job has a name, a start time, an optional progress the operation updates, and a cancel token
//! the operation polls: long jobs (snapshots, backups, migration) build on this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferrovirt_api::{ApiError, DomainOp, ErrorCode, JobInfo, JobKind, JobProgress, JobStatus};

use super::{Inner, Manager};
use crate::deadline::{human, CancelToken, Deadline};
use crate::runtime::now_ms;

static NEXT_JOB_ID: AtomicU64 = AtomicU64::new(1);

/// The job that records a VM's end and runs its on_* action (renamed "restart" when it restarts).
pub const EXIT: JobSpec = JobSpec::internal("exit", false);

/// Which job to take: its name, kind, and whether domjobabort may cancel it.
#[derive(Debug, Clone, Copy)]
pub struct JobSpec {
    pub name: &'static str,
    pub kind: JobKind,
    pub cancellable: bool,
}

impl JobSpec {
    /// A client's operation; a start can be cancelled (it is undone).
    pub fn operation(op: DomainOp) -> JobSpec {
        JobSpec {
            name: op.as_str(),
            kind: JobKind::Operation,
            cancellable: op == DomainOp::Start,
        }
    }

    /// Work of the daemon's own ("exit", "reattach", "autostart").
    pub const fn internal(name: &'static str, cancellable: bool) -> JobSpec {
        JobSpec {
            name,
            kind: JobKind::Internal,
            cancellable,
        }
    }
}

/// The job a domain is busy with (kept in the domain's entry, under the manager lock).
pub struct Job {
    id: u64,
    name: String,
    kind: JobKind,
    started: Instant,
    started_ms: u64,
    cancellable: bool,
    cancel: CancelToken,
    progress: Arc<Mutex<Option<JobProgress>>>,
    /// The client stopped waiting at the deadline: the job's result must not be committed as a
    /// success nobody heard of (a late start is taken down again).
    timed_out: bool,
    /// The operation's outcome is decided (committed, or about to be answered): a client whose
    /// deadline passes from now on waits for that answer instead.
    settled: bool,
}

/// What the operation running a job holds: its identity, the cancel token, the progress slot.
#[derive(Clone)]
pub struct JobHandle {
    id: u64,
    cancel: CancelToken,
    progress: Arc<Mutex<Option<JobProgress>>>,
}

impl Job {
    pub fn new(spec: JobSpec) -> (Job, JobHandle) {
        let id = NEXT_JOB_ID.fetch_add(1, Ordering::Relaxed);
        let cancel = CancelToken::default();
        let progress = Arc::new(Mutex::new(None));
        let handle = JobHandle {
            id,
            cancel: cancel.clone(),
            progress: progress.clone(),
        };
        let job = Job {
            id,
            name: spec.name.to_string(),
            kind: spec.kind,
            started: Instant::now(),
            started_ms: now_ms(),
            cancellable: spec.cancellable,
            cancel,
            progress,
            timed_out: false,
            settled: false,
        };
        (job, handle)
    }

    pub fn is(&self, handle: &JobHandle) -> bool {
        self.id == handle.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn status(&self) -> JobStatus {
        JobStatus {
            name: self.name.clone(),
            kind: self.kind,
            started_ms: self.started_ms,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            cancellable: self.cancellable,
            cancel_requested: self.cancel.is_cancelled(),
            timed_out: self.timed_out,
            progress: self.progress.lock().ok().and_then(|p| p.clone()),
        }
    }

    /// "domain 'web' is busy with shutdown (started 3 s ago)".
    pub fn busy(&self, domain: &str) -> ApiError {
        ApiError::new(
            ErrorCode::DomainBusy,
            format!(
                "domain '{domain}' is busy with {} (started {} ago); retry when it ends, wait for it with --wait SECONDS, see it with `ferrovirt domjobinfo {domain}`",
                self.name,
                human(self.started.elapsed())
            ),
        )
    }
}

impl JobHandle {
    /// Report how far the job got (shown by domjobinfo).
    pub fn set_progress(&self, progress: Option<JobProgress>) {
        if let Ok(mut p) = self.progress.lock() {
            *p = progress;
        }
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A deadline for one call of this job, cancelled with it.
    pub fn deadline(&self, limit: Duration, what: impl Into<String>) -> Deadline {
        Deadline::new(limit, what, self.cancel.clone())
    }
}

impl Manager {
    /// Take the domain's job, waiting up to `wait` for a running one to end; else a busy error.
    /// Returns the lock (still held) and the domain's resolved name.
    pub(super) fn take_job<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        name: &str,
        spec: JobSpec,
        wait: Duration,
    ) -> Result<(MutexGuard<'a, Inner>, String, JobHandle), ApiError> {
        let give_up = Instant::now() + wait;
        loop {
            let name = Self::resolve(&inner, name)?;
            let dom = inner
                .doms
                .get_mut(&name)
                .ok_or_else(|| ApiError::no_domain(&name))?;
            match &dom.job {
                None => {
                    let (job, handle) = Job::new(spec);
                    dom.job = Some(job);
                    return Ok((inner, name, handle));
                }
                Some(job) => {
                    let left = give_up.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(job.busy(&name));
                    }
                    inner = self
                        .job_ended
                        .wait_timeout(inner, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// End the job; then handle a VM exit that arrived while it ran (as a job of its own, taken
    /// before anyone else can), and wake operations waiting for the domain.
    pub(super) fn end_job(&self, name: &str, handle: &JobHandle) {
        let mut handle = handle.clone();
        loop {
            let mut next = None;
            {
                // Forgetting a transient domain deletes its row: writer lock first.
                let mut writer = self.writer();
                let mut inner = self.lock();
                let mut forget = false;
                if let Some(dom) = inner.doms.get_mut(name) {
                    if dom.job.as_ref().is_some_and(|j| j.is(&handle)) {
                        dom.job = None;
                        if let Some((generation, kind)) = dom.pending_exit.take() {
                            if generation == dom.generation && dom.stored.state.is_active() {
                                let (job, h) = Job::new(EXIT);
                                dom.job = Some(job);
                                next = Some((h, kind));
                            }
                        }
                        // A transient domain exists only while it runs (e.g. its start failed).
                        forget = dom.job.is_none()
                            && !dom.stored.persistent
                            && !dom.stored.state.is_active();
                    }
                }
                if forget {
                    inner.doms.remove(name);
                }
                self.job_ended.notify_all();
                drop(inner);
                if forget {
                    if let Err(e) = writer.delete_row(name) {
                        eprintln!("ferrovirtd: cannot forget transient domain '{name}': {e}");
                    }
                }
            }
            match next {
                Some((h, kind)) => {
                    self.finish_exit(name, kind, &h);
                    handle = h;
                }
                None => return,
            }
        }
    }

    /// Run a job's slow part on a worker thread and wait for it until its deadline (plus a grace
    /// period, so the driver's own, more precise timeout error wins). The worker commits, ends
    /// the job, then computes the answer with `answer`. A client that stops waiting gets a
    /// timeout error; the job stays taken until the driver returns, and a late start is undone.
    pub(super) fn run_job<T: Send + 'static>(
        &self,
        name: &str,
        handle: JobHandle,
        deadline: Deadline,
        work: impl FnOnce(&Manager, &JobHandle, &Deadline) -> Result<(), ApiError> + Send + 'static,
        answer: impl FnOnce(&Manager) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let Some(me) = self.me.upgrade() else {
            self.end_job(name, &handle);
            return Err(ApiError::internal("the daemon is shutting down"));
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let worker_name = name.to_string();
        let worker_handle = handle.clone();
        let worker_deadline = deadline.clone();
        let spawned = std::thread::Builder::new()
            .name("job".into())
            .spawn(move || {
                let result = work(&me, &worker_handle, &worker_deadline);
                me.end_job(&worker_name, &worker_handle);
                let _ = tx.send(result.map(|()| answer(&me)));
            });
        if let Err(e) = spawned {
            self.end_job(name, &handle);
            return Err(ApiError::internal(format!(
                "cannot start a job thread: {e}"
            )));
        }
        match rx.recv_timeout(deadline.remaining() + self.limits.grace) {
            Ok(result) => result,
            Err(_) => {
                let still_running = {
                    let mut inner = self.lock();
                    match inner.doms.get_mut(name).and_then(|d| d.job.as_mut()) {
                        Some(job) if job.is(&handle) && !job.settled => {
                            job.timed_out = true;
                            true
                        }
                        _ => false,
                    }
                };
                if still_running {
                    Err(deadline
                        .timeout("the driver did not return; the domain stays busy until it does"))
                } else {
                    // It settled or ended while we looked: its answer is on the way.
                    rx.recv().unwrap_or_else(|_| {
                        Err(ApiError::internal("the job thread ended without an answer"))
                    })
                }
            }
        }
    }

    /// Decide the job's outcome, under the lock right before its commit: from now on its client
    /// waits for the answer. False when the client already gave up (a start is then undone).
    pub(super) fn settle(inner: &mut Inner, name: &str, handle: &JobHandle) -> bool {
        match inner.doms.get_mut(name).and_then(|d| d.job.as_mut()) {
            Some(job) if job.is(handle) => {
                job.settled = true;
                !job.timed_out
            }
            _ => true,
        }
    }

    /// Give the running job a more telling name (an exit that becomes a restart).
    pub(super) fn rename_job(&self, name: &str, handle: &JobHandle, job_name: &str) {
        let mut inner = self.lock();
        if let Some(job) = inner.doms.get_mut(name).and_then(|d| d.job.as_mut()) {
            if job.is(handle) {
                job.name = job_name.to_string();
            }
        }
    }

    /// `GET /v1/domains/{name}/job`.
    pub fn job_info(&self, name: &str) -> Result<JobInfo, ApiError> {
        let inner = self.lock();
        let dom = Self::get(&inner, name)?;
        Ok(JobInfo {
            domain: dom.stored.def.name.clone(),
            job: dom.job.as_ref().map(Job::status),
        })
    }

    /// `DELETE /v1/domains/{name}/job`: ask the running job to stop (it stops at its next check).
    pub fn abort_job(&self, name: &str) -> Result<JobInfo, ApiError> {
        let inner = self.lock();
        let dom = Self::get(&inner, name)?;
        let domain = dom.stored.def.name.clone();
        let job = dom.job.as_ref().ok_or_else(|| {
            ApiError::wrong_state(format!("domain '{domain}' has no job running"))
        })?;
        if !job.cancellable {
            return Err(ApiError::new(
                ErrorCode::OperationInvalid,
                format!(
                    "the {} job of domain '{domain}' cannot be cancelled (only long jobs such as start can)",
                    job.name
                ),
            ));
        }
        job.cancel.cancel();
        Ok(JobInfo {
            domain,
            job: Some(job.status()),
        })
    }
}
