//! The exit record: how a ferrovmm process's VM ended, written once to `--exit-file` as JSON
//! just before the process exits (atomically: a reader sees the whole record or none).
//!
//! A launcher that finds no record after the process is gone knows it died without one (a
//! signal, an abort): treat that as a crash.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A record is a few hundred bytes; reading more than this means it is not one.
pub const MAX_RECORD_BYTES: u64 = 64 << 10;

/// What ferrovmm writes to its exit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    #[serde(flatten)]
    pub reason: ExitReason,
    /// ferrovmm's exit status (0 for poweroff, reset, stopped, migrated).
    pub status: i32,
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off (ACPI S5, or a KVM shutdown event).
    Poweroff,
    /// The guest reset the machine (i8042 reset line, triple fault, KVM reset event) or the
    /// API's reset button was pressed; whoever manages the VM decides whether it starts again.
    Reset,
    /// Stopped through the control API (`PUT /vm/stop`).
    Stopped,
    /// The VM moved to another process (live migration completed).
    Migrated,
    /// The VM could not go on.
    Crash {
        cause: CrashCause,
        /// One line for people (the register dump stays in the log).
        detail: String,
        /// With cause `seccomp`: the syscall the filter stopped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seccomp: Option<SeccompViolation>,
    },
    /// ferrovmm did not get the VM running: a usage, host or startup error.
    Error { message: String },
}

/// A syscall one of ferrovmm's seccomp filters did not allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompViolation {
    /// The x86_64 syscall number.
    pub syscall: u32,
    /// Its name ("unknown" for a number newer than ferrovmm's table).
    pub name: String,
    /// The thread that made it (its name, e.g. "vcpu0", "virtio-dev", "api").
    pub thread: String,
}

/// Why a VM crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashCause {
    /// KVM_EXIT_INTERNAL_ERROR, e.g. an instruction KVM's emulator cannot do.
    KvmInternalError,
    /// KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY).
    EntryFailed,
    /// A vCPU exit ferrovmm does not handle.
    UnhandledExit,
    /// The guest reported a panic (KVM_SYSTEM_EVENT_CRASH).
    GuestPanic,
    /// KVM_RUN itself failed.
    VcpuError,
    /// The VMM's own machinery failed while the VM ran (event loop, threads).
    Vmm,
    /// A thread made a syscall its seccomp filter forbids (see `seccomp` in the record).
    Seccomp,
}

impl CrashCause {
    /// The name used in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            CrashCause::KvmInternalError => "kvm_internal_error",
            CrashCause::EntryFailed => "entry_failed",
            CrashCause::UnhandledExit => "unhandled_exit",
            CrashCause::GuestPanic => "guest_panic",
            CrashCause::VcpuError => "vcpu_error",
            CrashCause::Vmm => "vmm",
            CrashCause::Seccomp => "seccomp",
        }
    }
}

impl ExitReason {
    /// The one line ferrovmm prints on stderr as it ends.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::Poweroff => "guest powered off".into(),
            ExitReason::Reset => "guest reset".into(),
            ExitReason::Stopped => "vm stopped".into(),
            ExitReason::Migrated => "guest migrated".into(),
            ExitReason::Crash { detail, .. } => detail.clone(),
            ExitReason::Error { message } => message.clone(),
        }
    }

    /// The status ferrovmm exits with for a VM that ended this way, after it ran.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::Crash { .. } | ExitReason::Error { .. } => 1,
            _ => 0,
        }
    }
}

impl ExitRecord {
    /// Writes the record to `path` atomically: a temporary file beside it, fsync, rename, and
    /// an fsync of the folder so the rename survives a host crash. Mode 0600.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let mut text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
            return written;
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads a record; an error says why there is none (missing, too big, not a record).
    pub fn read(path: &Path) -> Result<ExitRecord, String> {
        let f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut text = Vec::new();
        f.take(MAX_RECORD_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_RECORD_BYTES {
            return Err(format!(
                "{}: larger than {MAX_RECORD_BYTES} bytes, not an exit record",
                path.display()
            ));
        }
        serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not an exit record: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_a_flat_json_shape_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let cases = [
            (ExitReason::Poweroff, r#"{"reason":"poweroff","status":0}"#),
            (ExitReason::Stopped, r#"{"reason":"stopped","status":0}"#),
            (
                ExitReason::Crash {
                    cause: CrashCause::KvmInternalError,
                    detail: "vcpu0: KVM internal error (suberror 1)".into(),
                    seccomp: None,
                },
                r#"{"reason":"crash","cause":"kvm_internal_error","detail":"vcpu0: KVM internal error (suberror 1)","status":1}"#,
            ),
            (
                ExitReason::Error {
                    message: "--memory must be at least 1 MiB (got 0)".into(),
                },
                r#"{"reason":"error","message":"--memory must be at least 1 MiB (got 0)","status":2}"#,
            ),
        ];
        for (reason, json) in cases {
            let status = if json.contains("\"status\":2") {
                2
            } else {
                reason.status()
            };
            let rec = ExitRecord { reason, status };
            assert_eq!(serde_json::to_string(&rec).unwrap(), json);
            rec.write_atomic(&path).unwrap();
            assert_eq!(ExitRecord::read(&path).unwrap(), rec);
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn crash_cause_names_are_their_json_names() {
        for cause in [
            CrashCause::KvmInternalError,
            CrashCause::EntryFailed,
            CrashCause::UnhandledExit,
            CrashCause::GuestPanic,
            CrashCause::VcpuError,
            CrashCause::Vmm,
            CrashCause::Seccomp,
        ] {
            assert_eq!(
                serde_json::to_string(&cause).unwrap(),
                format!("\"{}\"", cause.as_str())
            );
        }
    }

    #[test]
    fn a_missing_or_foreign_file_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        assert!(ExitRecord::read(&path).is_err());
        fs::write(&path, "guest powered off\n").unwrap();
        assert!(ExitRecord::read(&path)
            .unwrap_err()
            .contains("not an exit record"));
        fs::write(&path, r#"{"reason":"teleported","status":0}"#).unwrap();
        assert!(ExitRecord::read(&path).is_err());
        fs::write(&path, vec![b' '; (MAX_RECORD_BYTES + 10) as usize]).unwrap();
        assert!(ExitRecord::read(&path).unwrap_err().contains("larger than"));
    }
}
