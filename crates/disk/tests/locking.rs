//! Image locks, compatible with QEMU's: a disk in use by one writer cannot be opened
//! for writing (or consistent reading) by another process, ours or QEMU's.

mod common;

use common::*;
use ferrovirt_disk::{open, DiskError, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: None,
        read_only,
        direct: false,
    }
}

/// qemu-io holding the image open read-write until its stdin closes.
fn qemu_io_holding(p: &Path) -> Child {
    let child = Command::new("qemu-io")
        .arg(p)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qemu-io (install qemu-utils)");
    let ino = std::fs::metadata(p).unwrap().ino();
    for _ in 0..100 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks
            .lines()
            .any(|l| l.contains(&format!(":{ino} 100 101")))
        {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-io did not lock {} within 5 s", p.display());
}

/// Opens read-write, retrying for up to 2 s: a process that other tests spawn at the
/// same moment holds copies of our descriptors (and so our locks) until its exec.
fn open_rw_soon(p: &Path) -> Result<(), DiskError> {
    let mut last = None;
    for _ in 0..40 {
        match open(p, &opts(false)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(last.expect("tried at least once"))
}

fn release(mut child: Child) {
    drop(child.stdin.take());
    child.wait().unwrap();
}

#[test]
fn a_disk_qemu_writes_is_refused_to_us() {
    let d = Scratch::new("lock-qemu");
    let p = d.path("vm.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "1M"]);
    let q = qemu_io_holding(&p);
    let e = open(&p, &opts(false))
        .err()
        .expect("read-write open of a disk in use");
    assert!(matches!(e, DiskError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    assert!(
        open(&p, &opts(true)).is_err(),
        "consistent read while another process writes"
    );
    // Reports need no lock.
    assert_eq!(
        ferrovirt_disk::info(&p, false).unwrap()[0].virtual_size,
        1 << 20
    );
    // Creating an image over it is refused and leaves it intact.
    let len = std::fs::metadata(&p).unwrap().len();
    let (code, _, err) = img(&["create", "-f", "raw", &s(&p), "4M"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    let (code, _, err) = img(&["resize", &s(&p), "2M"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use") && err.lines().count() == 1, "{err}");
    release(q);
    open_rw_soon(&p).expect("free again after qemu-io exits");
}

#[test]
fn qemu_cannot_write_a_disk_we_use() {
    let d = Scratch::new("lock-ours");
    let p = d.path("vm.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "1M"]);
    let img = open(&p, &opts(false)).unwrap();
    let o = run("qemu-io", &["-c", "write 0 512", &s(&p)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || text.contains("lock"),
        "qemu-io wrote to a disk in use: {text}"
    );
    assert!(text.contains("lock"), "{text}");
    drop(img);
    qemu_io(&p, "qcow2", &["write 0 512".into()]);
}

#[test]
fn backing_files_in_use_are_not_written_underneath() {
    let d = Scratch::new("lock-chain");
    let base = d.path("base.qcow2");
    let ov = d.path("ov.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&base), "1M"]);
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&ov),
    ]);
    let vm = open(&ov, &opts(false)).unwrap();
    // Another reader of the base is fine; a writer is not.
    let reader = open(&base, &opts(true)).expect("shared read of a backing file");
    assert!(matches!(
        open(&base, &opts(false)),
        Err(DiskError::InUse { .. })
    ));
    // A second VM on the same overlay is refused.
    assert!(matches!(
        open(&ov, &opts(false)),
        Err(DiskError::InUse { .. })
    ));
    drop(reader);
    drop(vm);
    open_rw_soon(&base).expect("base is writable once nothing uses it");
}

#[test]
fn a_forked_child_does_not_keep_a_closed_image_locked() {
    let d = Scratch::new("lock-fork");
    let p = d.path("vm.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "1M"]);
    let img = open(&p, &opts(false)).unwrap();
    // A child forked while the image is open shares its descriptors (as a spawned
    // process does until it execs); it waits until we close the pipe.
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array we pass.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only calls async-signal-safe functions (close, read, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: plain syscalls on descriptors the child owns.
        unsafe {
            libc::close(fds[1]);
            libc::read(fds[0], b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(fds[0]) };
    drop(img);
    // The child still holds the descriptor: the image must be free all the same.
    let again = open(&p, &opts(false));
    let o = run("qemu-io", &["-c", "write 0 512", &s(&p)]);
    // SAFETY: closing the write end lets the child exit; waitpid reaps our own child.
    unsafe {
        libc::close(fds[1]);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        again.is_err() || !o.status.success(),
        "qemu-io must not write while we hold the image again"
    );
    assert!(
        again.is_ok(),
        "closed image still locked: {:?}",
        again.err()
    );
    assert!(text.contains("lock"), "{text}");
}

#[test]
fn after_an_active_commit_the_backing_file_is_locked_as_the_disk() {
    let d = Scratch::new("lock-commit");
    let base = d.path("base.qcow2");
    let ov = d.path("ov.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&base), "1M"]);
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&ov),
    ]);
    let disk = ferrovirt_disk::open_disk(&ov, &opts(false)).unwrap();
    use ferrovirt_disk::BlockBackend;
    disk.write_at(&[7u8; 512], 0).unwrap();
    let job = ferrovirt_disk::jobs::start_commit(&disk).unwrap();
    assert!(matches!(
        job.wait().unwrap(),
        ferrovirt_disk::JobOutcome::Completed
    ));
    assert_eq!(disk.path(), base);
    // The disk now writes the base: nobody else may open it for writing.
    assert!(matches!(
        open(&base, &opts(false)),
        Err(DiskError::InUse { .. })
    ));
    let o = run("qemu-io", &["-c", "write 0 512", &s(&base)]);
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        text.contains("lock"),
        "qemu-io wrote the committed base: {text}"
    );
    disk.write_at(&[8u8; 512], 512).unwrap();
    drop(disk);
    open_rw_soon(&base).expect("free once the disk is closed");
}
