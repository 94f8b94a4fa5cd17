//! Save and restore with QEMU: its migration stream is the save file's payload. The daemon
//! opens the file and hands QEMU the descriptor over QMP (`getfd`), so no shell command and no
//! path quoting is involved: `migrate fd:` writes from the descriptor's position, and a restore
//! starts QEMU with `-incoming defer -S` and loads with `migrate-incoming fd:`.

use std::fs::File;
use std::io::Seek;
use std::os::fd::AsFd;
use std::time::Duration;

use ferrovirt_api::{ApiError, ErrorCode};
use serde_json::{json, Value};

use super::{log_tail, QemuDriver, SOCKET_APPEARS};
use crate::deadline::Deadline;
use crate::driver::qmp::Qmp;
use crate::driver::{Progress, Started, VmCtx, VmRef};
use crate::runtime::{kill, wait_gone};

/// The name the save file's descriptor has inside QEMU.
const FD_NAME: &str = "ferrovirt-save";
/// How often a running migration is looked at.
const POLL: Duration = Duration::from_millis(20);
/// "No limit" for QEMU's migration bandwidth (bytes per second), as libvirt gives a save.
const UNLIMITED: u64 = 1 << 40;
/// Time for QEMU to take back a cancelled migration or a failed save.
const RECOVER: Duration = Duration::from_secs(10);

fn status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("")
}

fn error_desc(v: &Value) -> String {
    v.get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("no reason given")
        .to_string()
}

impl QemuDriver {
    /// Pause (if running), stream to `out`, and on any failure leave the VM as it was.
    pub(super) fn save_to(
        &self,
        vm: &VmRef,
        out: &mut File,
        progress: Progress,
    ) -> Result<(), ApiError> {
        let deadline = vm.deadline;
        let mut qmp = Qmp::connect(&vm.vm_dir.join("qmp.sock"), SOCKET_APPEARS, deadline)?;
        let was_running = status(&qmp.execute("query-status", None, deadline)?) == "running";
        if was_running {
            qmp.execute("stop", None, deadline)?;
        }
        let result = Self::migrate_out(&mut qmp, out, deadline, progress);
        if result.is_err() && was_running {
            let recover = Deadline::after(RECOVER, format!("{}: resume", deadline.what()));
            // On this connection: QEMU serves one QMP client at a time.
            if let Err(e) = qmp.execute("cont", None, &recover) {
                eprintln!("ferrovirtd: the VM could not be resumed after a failed save: {e}");
            }
        }
        result
    }

    fn migrate_out(
        qmp: &mut Qmp,
        out: &File,
        deadline: &Deadline,
        progress: Progress,
    ) -> Result<(), ApiError> {
        // QEMU throttles migrations to 32 MiB/s by default; a file takes what the disk gives.
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": UNLIMITED })),
            deadline,
        )?;
        qmp.send_fd(out.as_fd(), FD_NAME, deadline)?;
        if let Err(e) = qmp.execute(
            "migrate",
            Some(json!({ "uri": format!("fd:{FD_NAME}") })),
            deadline,
        ) {
            let _ = qmp.execute("closefd", Some(json!({ "fdname": FD_NAME })), deadline);
            return Err(e);
        }
        loop {
            let v = qmp.execute("query-migrate", None, deadline)?;
            match status(&v) {
                "completed" => return Ok(()),
                "failed" => {
                    return Err(ApiError::driver(format!(
                        "QEMU could not write the VM's state: {}",
                        error_desc(&v)
                    )))
                }
                "cancelled" => return Err(ApiError::driver("QEMU cancelled the save")),
                _ => {}
            }
            if let Some(ram) = v.get("ram") {
                let field = |k: &str| ram.get(k).and_then(Value::as_u64);
                progress(field("transferred").unwrap_or(0), field("total"));
            }
            if let Err(e) = deadline.check() {
                Self::cancel_migration(qmp, deadline);
                return Err(e);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stop a running migration and wait (briefly) until QEMU has let go of it.
    fn cancel_migration(qmp: &mut Qmp, deadline: &Deadline) {
        let recover = Deadline::after(RECOVER, format!("{}: cancel", deadline.what()));
        let _ = qmp.execute("migrate_cancel", None, &recover);
        while !recover.expired() {
            match qmp.execute("query-migrate", None, &recover) {
                Ok(v) if matches!(status(&v), "active" | "cancelling" | "setup") => {}
                _ => return,
            }
            std::thread::sleep(POLL);
        }
    }

    /// Start QEMU waiting for a migration, feed it the payload, leave it paused.
    pub(super) fn restore_from(
        &self,
        ctx: VmCtx,
        input: &mut File,
        len: u64,
        progress: Progress,
    ) -> Result<Started, ApiError> {
        let deadline = ctx.deadline.clone();
        let dir = ctx.vm_dir.clone();
        let started = self.launch(ctx, &["-incoming", "defer", "-S"])?;
        let start = input
            .stream_position()
            .map_err(|e| ApiError::driver(format!("save file: {e}")))?;
        let loaded = (|| {
            let mut qmp = Qmp::connect(&dir.join("qmp.sock"), SOCKET_APPEARS, &deadline)?;
            qmp.send_fd(input.as_fd(), FD_NAME, &deadline)?;
            qmp.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{FD_NAME}") })),
                &deadline,
            )?;
            loop {
                let v = qmp.execute("query-migrate", None, &deadline)?;
                match status(&v) {
                    "completed" => return Ok(()),
                    "failed" => {
                        return Err(ApiError::driver(format!(
                            "QEMU could not load the saved state: {}",
                            error_desc(&v)
                        )))
                    }
                    _ => {}
                }
                // QEMU reads through our descriptor's shared file position.
                if let Ok(at) = input.stream_position() {
                    progress(at.saturating_sub(start).min(len), Some(len));
                }
                deadline.check()?;
                std::thread::sleep(POLL);
            }
        })();
        if let Err(e) = loaded {
            // A QEMU that fails to load exits by itself; its log says why.
            if let Some(pid) = started.runtime.pid {
                if !wait_gone(pid, Duration::from_millis(500)) {
                    kill(pid, libc::SIGKILL);
                    wait_gone(pid, Duration::from_secs(5));
                }
            }
            if matches!(e.code, ErrorCode::Timeout) || deadline.cancelled() {
                return Err(e);
            }
            // A daemonized QEMU's stderr is gone; its log has what it said before.
            let why = log_tail(&dir.join("qemu.log"));
            let detail = if e.message.contains("could not load") {
                e.message
            } else {
                format!(
                    "QEMU could not load the saved state (it ended: the stream is damaged or not of this machine): {}",
                    e.message
                )
            };
            return Err(ApiError::driver(if why.is_empty() {
                detail
            } else {
                format!("{detail}; {why}")
            }));
        }
        Ok(started)
    }
}
