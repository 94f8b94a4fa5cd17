//! A domain's job as the API shows it (`GET /v1/domains/{name}/job`, `ferrovirt domjobinfo`).
//! Modelled on libvirt's job model: one job at a time per domain; long jobs report progress and
//! may be cancelled (`DELETE /v1/domains/{name}/job`, `ferrovirt domjobabort`).

use serde::{Deserialize, Serialize};

/// `GET /v1/domains/{name}/job`: the running job, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub domain: String,
    /// None when the domain is idle.
    pub job: Option<JobStatus>,
}

/// What a job is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// A lifecycle operation a client asked for (start, shutdown, destroy ...).
    Operation,
    /// Work the daemon does by itself: a VM's exit and its on_* action, reattach, autostart.
    Internal,
}

/// One running job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// What runs: an operation's verb ("start", "shutdown" ...) or an internal job
    /// ("autostart", "restart"); later "snapshot", "backup", "migration".
    pub name: String,
    pub kind: JobKind,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub started_ms: u64,
    pub elapsed_ms: u64,
    /// Whether `DELETE /v1/domains/{name}/job` can cancel it.
    pub cancellable: bool,
    /// A cancel was asked for; the operation stops at its next check.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The client that started it stopped waiting (the driver call passed its deadline); the
    /// job ends when the driver returns.
    #[serde(default)]
    pub timed_out: bool,
    /// Known for long jobs only.
    #[serde(default)]
    pub progress: Option<JobProgress>,
}

/// How far a job got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    /// e.g. "copying disk vda".
    #[serde(default)]
    pub phase: Option<String>,
    pub done: u64,
    /// None while the total is unknown (libvirt's "Unbounded" job).
    #[serde(default)]
    pub total: Option<u64>,
    /// "bytes", "steps" ...
    pub unit: String,
}
