//! Save and restore (virsh `save`, `restore`, `managedsave`): a running domain's memory and
//! device state go to a file and come back from it (see docs/api/openapi.yaml).

use serde::{Deserialize, Serialize};

/// The state a restored domain is left in (`--running` / `--paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartState {
    Running,
    Paused,
}

impl StartState {
    pub fn as_str(self) -> &'static str {
        match self {
            StartState::Running => "running",
            StartState::Paused => "paused",
        }
    }

    /// From virsh's flags: `--running`, `--paused`, or neither (None: as saved).
    pub fn from_flags(running: bool, paused: bool) -> Result<Option<StartState>, String> {
        match (running, paused) {
            (true, true) => Err("--running and --paused exclude each other".into()),
            (true, false) => Ok(Some(StartState::Running)),
            (false, true) => Ok(Some(StartState::Paused)),
            (false, false) => Ok(None),
        }
    }
}

/// `POST /v1/domains/{name}/save`: stop the VM, its state to `file` (absolute, must not exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    pub file: String,
    /// The state `restore` leaves the domain in by default (None: the state it had).
    #[serde(default)]
    pub start: Option<StartState>,
}

/// `POST /v1/restore`: start the domain a save file names from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub file: String,
    /// Overrides the state recorded in the file.
    #[serde(default)]
    pub start: Option<StartState>,
}

/// `POST /v1/domains/{name}/managed-save`: like save, to a file the daemon keeps; the next
/// start resumes from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedSaveRequest {
    #[serde(default)]
    pub start: Option<StartState>,
}
