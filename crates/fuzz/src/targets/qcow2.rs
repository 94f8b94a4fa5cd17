//! qcow2 images as a guest or a downloaded file can shape them: mutations of real images made by
//! qemu-img (`make-qcow2-corpus.sh`: data, zero and compressed clusters, snapshots, a bitmap, a
//! backing name, v2 and v3). Open, read, `check`, `info`, `map` and the snapshot and bitmap
//! tables never panic or hang; and when `check` calls an image clean, writes to it leave it
//! clean and read back what was written.

use std::path::{Path, PathBuf};

use ferrovirt_disk::{ops, OpenOptions};

use crate::engine::{Outcome, Target};

pub const QCOW2: Target = Target {
    name: "qcow2",
    dict: &[
        b"QFI\xfb",
        b"\x00\x00\x00\x02",
        b"\x00\x00\x00\x03",
        b"\x00\x00\x00\x09",
        b"\x00\x00\x00\x10",
        b"\x00\x00\x00\x15",
        // Header extension magics: backing format, feature names, bitmaps, end.
        b"\xe2\x79\x2a\xca",
        b"\x68\x03\xf8\x57",
        b"\x23\x85\x28\x75",
        b"\x00\x00\x00\x00",
        // L1/L2 flags: copied, compressed, zero.
        b"\x80\x00\x00\x00\x00\x00\x02\x00",
        b"\x40\x00\x00\x00\x00\x00\x02\x00",
        b"\x00\x00\x00\x00\x00\x00\x00\x01",
        b"/etc/shadow",
        b"base.qcow2",
        b"../../../../etc/passwd",
        b"qcow2",
        b"raw",
    ],
    max_len: 64 << 10,
};

/// Holds the scratch folder: the image under test and the backing file the corpus names.
pub struct Qcow2Target {
    dir: tempfile::TempDir,
}

impl Default for Qcow2Target {
    fn default() -> Self {
        Self::new()
    }
}

/// A clean base image for `overlay-backing-name.qcow2`'s `base.qcow2`.
fn base_image() -> Vec<u8> {
    let p = crate::engine::crate_dir().join("corpus/qcow2/data-v3.qcow2");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: None,
        read_only,
        direct: false,
    }
}

/// Reads the start, the end and a few places between (a hostile size can be exabytes).
fn read_some(path: &Path) -> Option<u64> {
    let img = ferrovirt_disk::open(path, &opts(true)).ok()?;
    let size = img.size();
    let mut buf = vec![0u8; 64 << 10];
    let mut offsets = vec![0, size.saturating_sub(buf.len() as u64)];
    for i in 1..8u64 {
        offsets.push(size / 8 * i);
    }
    for off in offsets {
        let n = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.read_at(&mut buf[..n], off);
    }
    // Past the end: an error, never a panic.
    let _ = img.read_at(&mut buf[..512], size);
    let _ = img.read_at(&mut buf[..512], u64::MAX - 100);
    Some(size)
}

fn clean(r: &ops::CheckReport) -> bool {
    r.corruptions == 0 && r.check_errors == 0
}

impl Qcow2Target {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrovirt-fuzz-qcow2-")
            .tempdir()
            .expect("a scratch folder");
        std::fs::write(dir.path().join("base.qcow2"), base_image()).expect("base image");
        Qcow2Target { dir }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image.qcow2")
    }

    pub fn one(&mut self, input: &[u8]) -> Outcome {
        let path = self.image();
        std::fs::write(&path, input).expect("write the image");
        let _ = ferrovirt_disk::info(&path, true);
        let _ = ops::snapshot_list(&path);
        let _ = ops::bitmap_list(&path);
        let _ = ops::map(&path);
        let before = ops::check(&path, None);
        let Some(size) = read_some(&path) else {
            return Outcome::Rejected;
        };
        // Writes through a clean-looking image keep it clean and read back.
        let Ok(before) = before else {
            return Outcome::Accepted;
        };
        if !clean(&before) || size < 16384 {
            return Outcome::Accepted;
        }
        let Ok(img) = ferrovirt_disk::open(&path, &opts(false)) else {
            return Outcome::Accepted;
        };
        let pattern: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        let at = [0, (size / 2) & !511, size - 3000];
        let mut written = Vec::new();
        for off in at {
            if img.write_at(&pattern, off).is_ok() {
                written.push(off);
            }
        }
        let flushed = img.flush().is_ok();
        for &off in &written {
            let mut back = vec![0u8; pattern.len()];
            if flushed && img.read_at(&mut back, off).is_ok() {
                assert!(
                    back == pattern,
                    "data written at {off} reads back differently"
                );
            }
        }
        drop(img);
        if flushed {
            if let Ok(after) = ops::check(&path, None) {
                assert!(
                    clean(&after),
                    "writes corrupted an image check called clean: {:?}",
                    after.messages
                );
            }
        }
        Outcome::Accepted
    }
}
