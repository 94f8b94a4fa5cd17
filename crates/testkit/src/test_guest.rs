//! The tiny guest of the qemu-driver tests: Debian's cloud kernel and a busybox initramfs that
//! prints FERROVIRT-GUEST-UP (guest/make-test-guest.sh), built once into the guest cache.

use std::path::PathBuf;

use crate::process::{RunWithin, TOOL_TIMEOUT};
use crate::{cache_dir, repo_root};

/// (kernel, initrd) of the test guest; builds it on first use (safe in parallel).
pub fn qemu_test_guest() -> (PathBuf, PathBuf) {
    let dir = cache_dir().join("qemu-test-guest");
    let out = std::process::Command::new("sh")
        .arg(repo_root().join("guest/make-test-guest.sh"))
        .arg(&dir)
        .output_within(TOOL_TIMEOUT * 5)
        .expect("run guest/make-test-guest.sh");
    assert!(
        out.status.success(),
        "building the test guest failed (needs apt-get, busybox-static, cpio, lz4): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.join("vmlinuz"), dir.join("initrd.img"))
}
