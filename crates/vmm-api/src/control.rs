//! Messages of ferrovmm's control API (HTTP/1.1 + JSON on `--api-socket`; docs/ferrovmm-api.yaml).

use serde::{Deserialize, Serialize};

use crate::launch::LaunchConfig;

/// No resource takes a request body; a longer one is refused with 413 before it is read.
pub const MAX_REQUEST_BODY: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
}

/// `GET /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub uptime_ms: u64,
    /// The configuration the VM was launched with.
    pub config: LaunchConfig,
    /// Clients attached to the `--serial socket=` console. A launcher that must not miss any
    /// output (a restore waiting to resume) waits for its own to be counted here.
    #[serde(default)]
    pub console_clients: u32,
}

/// The body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: not_found, method_not_allowed, body_too_large, ...
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: message.into(),
            },
        }
    }
}
