//! The NBD server (`ferrovirt img nbd`, crates/disk/src/nbd) as a network client can hit it: the
//! input is the client's whole byte stream (handshake flags, options, transmission requests and
//! write payloads) to a real server process exporting a qcow2 image with a dirty bitmap. After
//! each input the server must still greet a new client, and no connection thread may have
//! panicked (its log is watched).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::http::{binary, exchange, wait_for_socket};
use crate::engine::{Outcome, Target};

pub const NBD: Target = Target {
    name: "nbd",
    dict: &[
        // IHAVEOPT, the request magic, option and command numbers (big-endian).
        b"IHAVEOPT",
        b"\x25\x60\x95\x13",
        b"\x00\x00\x00\x03",
        b"\x00\x00\x00\x07",
        b"\x00\x00\x00\x08",
        b"\x00\x00\x00\x09",
        b"\x00\x00\x00\x0a",
        b"\x00\x07",
        b"\x00\x01",
        b"\x00\x06",
        b"base:allocation",
        b"qemu:dirty-bitmap:dirty0",
        b"qemu:",
        b"\xff\xff\xff\xff",
        b"\x01\xff\xff\xff",
    ],
    max_len: 64 << 10,
};

pub struct NbdTarget {
    dir: tempfile::TempDir,
    child: Child,
}

impl NbdTarget {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrovirt-fuzz-nbd-")
            .tempdir()
            .expect("a scratch folder");
        let src = crate::engine::crate_dir().join("corpus/qcow2/bitmap.qcow2");
        std::fs::copy(&src, dir.path().join("disk.qcow2")).expect("copy the image");
        let child = Self::spawn(dir.path());
        NbdTarget { dir, child }
    }

    fn spawn(dir: &std::path::Path) -> Child {
        let sock = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(dir.join("nbd.log")).unwrap();
        let mut child = Command::new(binary("ferrovirt"))
            .args(["img", "nbd", "--bitmap", "dirty0", "--socket"])
            .arg(&sock)
            .arg(dir.join("disk.qcow2"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferrovirt img nbd");
        wait_for_socket(&sock, &mut child, "ferrovirt img nbd");
        child
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    pub fn one(&mut self, input: &[u8]) -> Outcome {
        let resp = exchange(&self.sock(), input, Duration::from_secs(2)).unwrap_or_default();
        // A new client still gets the fixed newstyle greeting: NBDMAGIC, IHAVEOPT, flags.
        let greeting = exchange(&self.sock(), b"", Duration::from_secs(20)).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.path().join("nbd.log")).unwrap_or_default();
        let status = self.child.try_wait().ok().flatten();
        assert!(
            greeting.starts_with(b"NBDMAGICIHAVEOPT")
                && status.is_none()
                && !log.contains("panicked"),
            "the NBD server broke: exit status {status:?}, greeting {greeting:02x?}, log:\n{}",
            &log[log.len().saturating_sub(2000)..]
        );
        // Past the greeting (18 bytes) something came back: an option was at least answered.
        if resp.len() > 18 {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        }
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
