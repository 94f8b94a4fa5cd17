//! Domain states with reasons (libvirt's model), domain summaries and lifecycle events.

use serde::{Deserialize, Serialize};

use crate::def::VirtType;
use crate::engine::EngineChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    Running,
    Paused,
    Shutoff,
    Crashed,
}

impl DomainState {
    /// virsh's spelling ("shut off").
    pub fn display(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Shutoff => "shut off",
            DomainState::Crashed => "crashed",
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Shutoff => "shutoff",
            DomainState::Crashed => "crashed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(DomainState::Running),
            "paused" => Some(DomainState::Paused),
            "shutoff" => Some(DomainState::Shutoff),
            "crashed" => Some(DomainState::Crashed),
            _ => None,
        }
    }
    /// A VM process exists for the domain.
    pub fn is_active(self) -> bool {
        matches!(self, DomainState::Running | DomainState::Paused)
    }
}

/// Why the domain is in its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateReason {
    /// Never started since it was defined.
    Unknown,
    /// running: normal start.
    Booted,
    /// running: resumed after a pause.
    Unpaused,
    /// running: restarted by on_reboot/on_crash = restart.
    Restarted,
    /// running: found running when the daemon started.
    Reattached,
    /// paused: by the user.
    User,
    /// shutoff: the guest powered off.
    Shutdown,
    /// shutoff: forced off by destroy.
    Destroyed,
    /// shutoff/crashed: the VM process ended unexpectedly.
    Crashed,
    /// shutoff: the VM failed to start.
    Failed,
    /// shutoff: the VM process had vanished when the daemon (re)started.
    Vanished,
    /// running, paused or shutoff: as a snapshot-revert left it.
    FromSnapshot,
    /// paused: its state is being saved to a file (save, managedsave).
    Saving,
    /// shutoff: its state was saved to a file (restore or start continues it).
    Saved,
    /// running: restored from a save file.
    Restored,
}

impl StateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StateReason::Unknown => "unknown",
            StateReason::Booted => "booted",
            StateReason::Unpaused => "unpaused",
            StateReason::Restarted => "restarted",
            StateReason::Reattached => "reattached",
            StateReason::User => "user",
            StateReason::Shutdown => "shutdown",
            StateReason::Destroyed => "destroyed",
            StateReason::Crashed => "crashed",
            StateReason::Failed => "failed",
            StateReason::Vanished => "vanished",
            StateReason::FromSnapshot => "from-snapshot",
            StateReason::Saving => "saving",
            StateReason::Saved => "saved",
            StateReason::Restored => "restored",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            StateReason::Unknown,
            StateReason::Booted,
            StateReason::Unpaused,
            StateReason::Restarted,
            StateReason::Reattached,
            StateReason::User,
            StateReason::Shutdown,
            StateReason::Destroyed,
            StateReason::Crashed,
            StateReason::Failed,
            StateReason::Vanished,
            StateReason::FromSnapshot,
            StateReason::Saving,
            StateReason::Saved,
            StateReason::Restored,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// What `GET /v1/domains` and `GET /v1/domains/{name}` return for a domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Runtime id while active (like virsh's Id column), else None.
    pub id: Option<u32>,
    pub name: String,
    pub uuid: String,
    #[serde(rename = "type")]
    pub virt_type: VirtType,
    /// The program that runs (or would run) the domain on this host, and why.
    pub engine: EngineChoice,
    pub state: DomainState,
    pub reason: StateReason,
    pub persistent: bool,
    pub autostart: bool,
    /// Memory of the definition, in KiB exactly as defined.
    pub memory_kib: u64,
    pub vcpus: u32,
    /// PID of the VM process while active (qemu and kvm drivers).
    pub pid: Option<u32>,
    /// Serial console log file, when the domain has run.
    pub console_log: Option<String>,
    /// A managed save exists: the next start resumes from it (virsh's "Managed save: yes").
    #[serde(default)]
    pub managed_save: bool,
}

/// Lifecycle event kinds (libvirt's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    Crashed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Defined => "defined",
            EventKind::Undefined => "undefined",
            EventKind::Started => "started",
            EventKind::Suspended => "suspended",
            EventKind::Resumed => "resumed",
            EventKind::Stopped => "stopped",
            EventKind::Shutdown => "shutdown",
            EventKind::Crashed => "crashed",
        }
    }
}

/// One lifecycle event, as sent on `GET /v1/events` (server-sent events, `event: lifecycle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic sequence number within one daemon run.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub domain: String,
    pub kind: EventKind,
    /// Detail, e.g. "booted", "destroyed", "guest powered off".
    pub detail: String,
}
