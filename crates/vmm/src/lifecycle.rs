//! How the VM ends: the first stop request wins and wakes the main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ferrovmm_api::{CrashCause, ExitReason};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// ACPI S5 written by the guest.
    PowerOff,
    /// i8042 reset, triple fault, a KVM reset event or the API's reset button.
    Reset,
    /// `PUT /vm/stop` on the API.
    Stopped,
    /// The VM now runs in another process (live migration completed).
    Migrated,
    /// Something the VMM cannot continue from.
    Crash {
        cause: CrashCause,
        /// One line: what happened, on which vCPU.
        detail: String,
        /// For the log only: a register dump, when there is one.
        dump: String,
    },
}

impl StopReason {
    /// The stderr text and the exit status for this reason.
    pub fn report(&self) -> (String, i32) {
        let reason = self.exit_reason();
        let text = match self {
            StopReason::Crash { detail, dump, .. } if !dump.is_empty() => {
                format!("{detail}\n{dump}")
            }
            _ => reason.describe(),
        };
        (text, reason.status())
    }

    /// What the exit record says.
    pub fn exit_reason(&self) -> ExitReason {
        match self {
            StopReason::PowerOff => ExitReason::Poweroff,
            StopReason::Reset => ExitReason::Reset,
            StopReason::Stopped => ExitReason::Stopped,
            StopReason::Migrated => ExitReason::Migrated,
            StopReason::Crash { cause, detail, .. } => ExitReason::Crash {
                cause: *cause,
                detail: detail.clone(),
                seccomp: None,
            },
        }
    }
}

/// Shared by vCPUs, devices and the API: records the first stop request.
pub struct Lifecycle {
    reason: Mutex<Option<StopReason>>,
    /// Set with `reason`; read by every vCPU before each KVM_RUN, so kept lock-free.
    stopping: AtomicBool,
    pub stop_evt: EventFd,
}

impl Lifecycle {
    pub fn new() -> std::io::Result<Self> {
        Ok(Lifecycle {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn request_stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            self.stopping.store(true, Ordering::SeqCst);
            // A full eventfd counter still wakes the reader, so an error here changes nothing.
            let _ = self.stop_evt.write(1);
        }
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
