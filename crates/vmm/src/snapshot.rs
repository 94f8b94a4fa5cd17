//! Snapshots on disk: `DIR/state` (machine configuration and all device and KVM
//! state) and `DIR/memory` (guest RAM, sparse).
//!
//! `state` is a small container: magic, format version, payload length, CRC-32 of
//! the payload, then the payload as JSON. The length is checked against a limit
//! before anything is allocated, so a hostile or broken file costs nothing.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::vm::{Machine, MachineState};

pub const MAGIC: &[u8; 8] = b"FERROSNP";
/// Bumped whenever the payload changes in a way an older ferrovmm cannot read.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// The payload is device and vCPU state; a few MiB would already be absurd.
pub const MAX_PAYLOAD: u64 = 64 << 20;
pub use ferrovmm_api::restore::{MEMORY_FILE, STATE_FILE};

/// What `DIR/state` holds.
#[derive(Serialize, Deserialize)]
pub struct Payload {
    /// The ferrovmm version that wrote it (for messages; compatibility is FORMAT_VERSION).
    pub ferrovmm_version: String,
    /// The machine's configuration, as it was launched (or restored).
    pub launch: crate::config::LaunchConfig,
    /// Bytes of guest RAM, i.e. the size of `DIR/memory`.
    pub memory_bytes: u64,
    pub machine: MachineState,
}

/// Why a snapshot could not be taken or read.
#[derive(Debug)]
pub enum SnapshotError {
    /// The VM must be paused first (HTTP 409).
    Running,
    /// The request or the file is wrong: one clear message (HTTP 400).
    Invalid(String),
    /// The host failed us: I/O, KVM (HTTP 500).
    Host(String),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Running => write!(f, "the VM is running; pause it first"),
            SnapshotError::Invalid(m) | SnapshotError::Host(m) => f.write_str(m),
        }
    }
}

/// The reply of `PUT /vm/snapshot`.
#[derive(Serialize, Debug)]
pub struct SnapshotReport {
    pub path: PathBuf,
    /// Bytes written to `state` and `memory` (memory holes not counted).
    pub bytes_written: u64,
    pub memory_bytes: u64,
    pub ms: f64,
}

/// Encodes `payload` into the container format.
pub fn encode(payload: &Payload) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(payload).map_err(|e| format!("cannot encode the state: {e}"))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads and checks a state file: magic, version, length, checksum, then the payload.
pub fn read_state(path: &Path) -> Result<Payload, String> {
    use std::io::Read;
    let shown = path.display();
    let mut file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
    if len > HEADER_LEN as u64 + MAX_PAYLOAD {
        return Err(format!(
            "{shown}: {len} bytes; a state file is at most {MAX_PAYLOAD} bytes of state"
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("{shown}: {e}"))?;
    decode(&bytes).map_err(|e| format!("{shown}: {e}"))
}

/// Checks and decodes a state container (a file's bytes, or a migration's state message).
pub fn decode(bytes: &[u8]) -> Result<Payload, String> {
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or("truncated (no complete header)")?;
    if &header[..8] != MAGIC {
        return Err("not a ferrovmm snapshot".into());
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {version}; this ferrovmm reads version {FORMAT_VERSION}"
        ));
    }
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(format!(
            "the state claims {len} bytes; the limit is {MAX_PAYLOAD}"
        ));
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(format!(
            "truncated or padded ({} bytes of state, the header says {len})",
            body.len()
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch; the state is corrupted".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("unreadable state: {e}"))
}

/// Creates `path` (and its parent) with `contents`, mode 0600, atomically: written
/// beside it and renamed over, so a crash leaves the old file or the new one, and
/// a VM running from an older memory file of the same name keeps its mapping.
fn write_file_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&std::fs::File) -> std::io::Result<u64>,
) -> std::io::Result<u64> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let n = match write(&file) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(n)
}

/// Writes the snapshot of a paused machine to `dir` (created 0700 if missing).
pub fn take(machine: &Machine, dir: &Path) -> Result<SnapshotReport, SnapshotError> {
    let started = Instant::now();
    if !machine.vcpus.pause.is_paused() {
        return Err(SnapshotError::Running);
    }
    if dir.as_os_str().is_empty() {
        return Err(SnapshotError::Invalid("path must not be empty".into()));
    }
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(SnapshotError::Invalid(format!(
                "{}: exists and is not a directory",
                dir.display()
            )))
        }
        Ok(_) => {}
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SnapshotError::Invalid(format!("{}: {e}", dir.display())))?,
    }
    // Devices hold still from the state read to the last page of RAM written.
    machine.devices.pause_io();
    let saved = (|| {
        let state = machine.save_state().map_err(SnapshotError::Host)?;
        let memory_written = write_file_atomic(dir, MEMORY_FILE, |f| {
            crate::memory::write_to_file(&machine.mem, f)
        })
        .map_err(|e| SnapshotError::Host(format!("{}/{MEMORY_FILE}: {e}", dir.display())))?;
        Ok::<_, SnapshotError>((state, memory_written))
    })();
    machine.devices.resume_io();
    let (state, memory_written) = saved?;
    let memory_bytes = crate::memory::total_bytes(&machine.mem);
    let bytes = encode(&Payload {
        ferrovmm_version: env!("CARGO_PKG_VERSION").to_string(),
        launch: machine.config.clone(),
        memory_bytes,
        machine: state,
    })
    .map_err(SnapshotError::Host)?;
    let state_written = write_file_atomic(dir, STATE_FILE, |mut f| {
        f.write_all(&bytes).map(|_| bytes.len() as u64)
    })
    .map_err(|e| SnapshotError::Host(format!("{}/{STATE_FILE}: {e}", dir.display())))?;
    Ok(SnapshotReport {
        path: dir.to_path_buf(),
        bytes_written: state_written + memory_written,
        memory_bytes,
        ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_err(path: &Path) -> String {
        match read_state(path) {
            Ok(_) => panic!("a broken state file was accepted"),
            Err(e) => e,
        }
    }

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("state");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn header(version: u32, crc: u32, len: u64) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h
    }

    #[test]
    fn broken_containers_get_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = read_err(&write(d, b"FERRO"));
        assert!(e.contains("truncated"), "{e}");
        let e = read_err(&write(d, b"QFI\xfb0000000000000000000000"));
        assert!(e.contains("not a ferrovmm snapshot"), "{e}");
        let e = read_err(&write(d, &header(7, 0, 0)));
        assert!(e.contains("version 7"), "{e}");
        let e = read_err(&write(d, &header(FORMAT_VERSION, 0, u64::MAX)));
        assert!(e.contains("limit"), "{e}");
        let mut f = header(FORMAT_VERSION, 0, 10);
        f.extend_from_slice(b"12345");
        let e = read_err(&write(d, &f));
        assert!(e.contains("truncated"), "{e}");
        let mut f = header(FORMAT_VERSION, crc32fast::hash(b"{}"), 2);
        f.extend_from_slice(b"{]");
        let e = read_err(&write(d, &f));
        assert!(e.contains("checksum"), "{e}");
        let mut f = header(FORMAT_VERSION, crc32fast::hash(b"{}"), 2);
        f.extend_from_slice(b"{}");
        let e = read_err(&write(d, &f));
        assert!(e.contains("unreadable state"), "{e}");
    }
}
