//! ferrovmm's snapshot reader and restore (`ferrovmm --restore DIR`, crates/vmm snapshot.rs and
//! restore.rs): a snapshot's `state` file as a tampered or corrupted snapshot could hold it.
//!
//! The input's first byte chooses the framing: mostly the rest is the JSON payload wrapped in a
//! correct header (magic, version, CRC-32, length), so mutations reach the payload's parser and
//! the restore of device and vCPU state into a real KVM VM; otherwise the rest is the whole file
//! (header checks). The `memory` file is a real one, from a snapshot of a tiny halting guest
//! taken when the target starts. Every run must end with one clear error (exit status 1 or 2 and
//! an exit record) or restore paused, answer its API, and stop cleanly when asked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::http::{binary, exchange, VmmTarget};
use crate::engine::{Outcome, Target};

pub const SNAPSHOT_STATE: Target = Target {
    name: "snapshot_state",
    dict: &[
        b"\"ferrovmm_version\":",
        b"\"launch\":",
        b"\"memory_bytes\":",
        b"\"machine\":",
        b"\"vcpus\":",
        b"\"devices\":",
        b"\"regs\":",
        b"\"sregs\":",
        b"\"msrs\":",
        b"\"lapic\":",
        b"\"irqchip\":",
        b"\"pit\":",
        b"\"clock\":",
        b"\"serial\":",
        b"\"virtio\":",
        b"\"queues\":",
        b"\"disks\":",
        b"\"nets\":",
        b"18446744073709551615",
        b"4294967295",
        b"-1",
        b"null",
        b"[]",
        b"{}",
    ],
    max_len: 256 << 10,
};

const MAGIC: &[u8; 8] = b"FERROSNP";
const FORMAT_VERSION: u32 = 1;

pub struct SnapshotTarget {
    dir: tempfile::TempDir,
}

/// The state file for `input` (see the module comment).
fn framed(input: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = input.split_first() else {
        return Vec::new();
    };
    if mode >= 0xe0 {
        return rest.to_vec();
    }
    let mut out = Vec::with_capacity(24 + rest.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
    out.extend_from_slice(&(rest.len() as u64).to_le_bytes());
    out.extend_from_slice(rest);
    out
}

/// Pauses a running tiny VM and snapshots it into `dir` (state and memory).
fn take_snapshot(into: &Path) {
    let vm = VmmTarget::start();
    let api = vm.socket();
    let put = |path: &str, body: &str| {
        let req = format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let resp = exchange(&api, req.as_bytes(), Duration::from_secs(30)).unwrap_or_default();
        let text = String::from_utf8_lossy(&resp).into_owned();
        assert!(text.starts_with("HTTP/1.1 2"), "PUT {path}: {text}");
    };
    put("/vm/pause", "");
    put(
        "/vm/snapshot",
        &serde_json::json!({ "path": into }).to_string(),
    );
}

impl SnapshotTarget {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrovirt-fuzz-snap-")
            .tempdir()
            .expect("a scratch folder");
        take_snapshot(&dir.path().join("snap"));
        SnapshotTarget { dir }
    }

    /// The JSON payload of the snapshot taken at start (to refresh the corpus).
    pub fn payload(&self) -> Vec<u8> {
        let state = std::fs::read(self.dir.path().join("snap/state")).expect("state");
        state[24..].to_vec()
    }

    fn snap(&self) -> PathBuf {
        self.dir.path().join("snap")
    }

    pub fn one(&mut self, input: &[u8]) -> Outcome {
        let original = std::fs::read(self.snap().join("state")).expect("state");
        let state = self.snap().join("state");
        std::fs::write(&state, framed(input)).expect("write the state");
        let (sock, exit) = (
            self.dir.path().join("api.sock"),
            self.dir.path().join("exit.json"),
        );
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&exit);
        let log = std::fs::File::create(self.dir.path().join("vmm.log")).unwrap();
        let mut child = Command::new(binary("ferrovmm"))
            .arg("--restore")
            .arg(self.snap())
            .args(["--serial", "none"])
            .arg("--api-socket")
            .arg(&sock)
            .arg("--exit-file")
            .arg(&exit)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferrovmm --restore");
        // Restore refused (exits) or restored (serves its API, paused).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut restored = false;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if !restored && std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                restored = true;
                let req = b"PUT /vm/stop HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
                let _ = exchange(&sock, req, Duration::from_secs(10));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ferrovmm --restore neither failed nor stopped within 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        std::fs::write(&state, original).expect("restore the state file");
        let record = std::fs::read_to_string(&exit).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.path().join("vmm.log")).unwrap_or_default();
        let clean_error = matches!(status.code(), Some(1 | 2)) && record.contains("\"error\"");
        let clean_stop = status.success() && record.contains("\"stopped\"");
        assert!(
            (clean_error || clean_stop) && !log.contains("panicked"),
            "ferrovmm --restore ended with {status}, exit record {record:?}, log:\n{}",
            &log[log.len().saturating_sub(3000)..]
        );
        if clean_stop {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        }
    }
}
