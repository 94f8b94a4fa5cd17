//! Block jobs on a disk in use: a writer thread keeps writing (seeded; the seed is
//! printed) while mirror, active commit or stream runs; afterwards the disk reads
//! exactly what the writer's model says, the image the disk ended on holds it by
//! `qemu-img compare`, and `qemu-img check` is clean. Also: cancel, progress, and a
//! clear error when the target runs out of space.

mod common;

use common::*;
use ferrovirt_disk::jobs::{start_commit, start_mirror, start_stream};
use ferrovirt_disk::{
    open_disk, BlockBackend, CreateOptions, Disk, Format, JobOutcome, OpenOptions, Preallocation,
};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 16 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn seed() -> u64 {
    std::env::var("FERROVIRT_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(77)
}

/// base.qcow2 with data over part of it, top.qcow2 on it with data of its own.
fn chain(d: &Scratch, cluster: u64) -> (PathBuf, PathBuf) {
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    let o = format!("cluster_size={cluster}");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &o,
        &s(&base),
        &SIZE.to_string(),
    ]);
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x11 0 6M".into(),
            "write -c -P 0x12 8M 256k".into(),
            "write -P 0x13 12M 1M".into(),
        ],
    );
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &o,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&top),
    ]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x21 1M 1M".into(),
            "write -z 5M 512k".into(),
            "write -P 0x22 15M 64k".into(),
        ],
    );
    (base, top)
}

fn rw_disk(p: &Path) -> Arc<Disk> {
    open_disk(
        p,
        &OpenOptions {
            format: None,
            read_only: false,
            direct: false,
        },
    )
    .unwrap()
}

fn read_all(d: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// A writer that keeps changing the disk and its model until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<u8>>,
}

fn start_writer(disk: Arc<Disk>, mut model: Vec<u8>, seed: u64) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let (st, n) = (stop.clone(), ops.clone());
    let thread = std::thread::spawn(move || {
        let mut rng = Rng(seed);
        while !st.load(Ordering::Acquire) {
            let len = [512, 4096, 65536, 1 + rng.below(300_000)][rng.below(4) as usize];
            let off = rng.below(SIZE - len);
            match rng.below(10) {
                0 => {
                    disk.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                1 => {
                    disk.discard(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                2 => disk.flush().unwrap(),
                _ => {
                    let mut b = vec![0u8; len as usize];
                    rng.fill(&mut b);
                    disk.write_at(&b, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&b);
                }
            }
            n.fetch_add(1, Ordering::AcqRel);
        }
        model
    });
    Writer { stop, ops, thread }
}

impl Writer {
    /// Waits until the writer has made `k` more operations (a handshake, no sleep).
    fn wait_ops(&self, k: u64) {
        let target = self.ops.load(Ordering::Acquire) + k;
        while self.ops.load(Ordering::Acquire) < target {
            assert!(!self.thread.is_finished(), "the writer died");
            std::thread::yield_now();
        }
    }

    fn finish(self) -> Vec<u8> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("writer panicked")
    }
}

enum Kind {
    Mirror,
    Commit,
    Stream,
}

fn race(kind: Kind, name: &str, cluster: u64) {
    let _serial = serial();
    let seed = seed();
    eprintln!("block job {name}: writer seed {seed}, cluster {cluster}");
    let d = Scratch::new(name);
    let (base, top) = chain(&d, cluster);
    let disk = rw_disk(&top);
    let model = read_all(&*disk);
    let w = start_writer(disk.clone(), model, seed);
    w.wait_ops(20);
    let before = w.ops.load(Ordering::Acquire);
    let target = d.path("mirror.qcow2");
    let job = match kind {
        Kind::Mirror => start_mirror(
            &disk,
            &target,
            &CreateOptions {
                format: Format::Qcow2,
                size: 0,
                cluster_size: Some(cluster as u32),
                preallocation: Preallocation::Off,
                backing: None,
            },
        )
        .unwrap(),
        Kind::Commit => start_commit(&disk).unwrap(),
        Kind::Stream => start_stream(&disk).unwrap(),
    };
    let outcome = job.wait().unwrap();
    let during = w.ops.load(Ordering::Acquire) - before;
    // Writes after the switch go to the new image.
    w.wait_ops(20);
    let model = w.finish();
    eprintln!("{name}: {during} writer operations raced with the job");
    assert_eq!(outcome, JobOutcome::Completed);
    let expect_path = match kind {
        Kind::Mirror => target.clone(),
        Kind::Commit => base.clone(),
        Kind::Stream => top.clone(),
    };
    assert_eq!(disk.path(), expect_path);
    let got = read_all(&*disk);
    let bad = (0..SIZE as usize).find(|&i| got[i] != model[i]);
    assert!(
        bad.is_none(),
        "seed {seed}: the disk differs from the model at byte {bad:?}"
    );
    disk.flush().unwrap();
    drop(disk);
    let raw = d.path("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_clean(&expect_path);
    assert_identical(&expect_path, "qcow2", &raw, "raw");
    if matches!(kind, Kind::Stream | Kind::Mirror) {
        let j: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&expect_path)]))
                .unwrap();
        assert!(j.get("backing-filename").is_none(), "{j}");
    }
}

#[test]
fn mirror_races_a_writer_and_switches() {
    race(Kind::Mirror, "job-mirror", 65536);
}

#[test]
fn active_commit_races_a_writer_and_switches_to_the_base() {
    race(Kind::Commit, "job-commit", 65536);
}

#[test]
fn active_commit_with_small_clusters() {
    race(Kind::Commit, "job-commit-4k", 4096);
}

#[test]
fn stream_races_a_writer_and_drops_the_backing_file() {
    race(Kind::Stream, "job-stream", 65536);
}

#[test]
fn stream_with_small_clusters() {
    race(Kind::Stream, "job-stream-4k", 4096);
}

#[test]
fn cancel_leaves_the_disk_on_its_image_and_progress_is_reported() {
    let _serial = serial();
    let d = Scratch::new("job-cancel");
    let p = d.path("big.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "256M"]);
    qemu_io(&p, "qcow2", &["write -P 5 0 128M".into()]);
    let disk = rw_disk(&p);
    let job = start_mirror(
        &disk,
        &d.path("t.qcow2"),
        &CreateOptions {
            format: Format::Qcow2,
            size: 0,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    job.cancel();
    let pr = job.progress();
    assert!(pr.done <= pr.total || pr.total == 0, "{pr:?}");
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
    assert_eq!(disk.path(), p);
    disk.write_at(&[9u8; 4096], 0).unwrap();
    let mut b = [0u8; 8192];
    disk.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 9) && b[4096..].iter().all(|&x| x == 5));
    // A completed job reports all of its work as done.
    let job = start_stream(&disk);
    assert!(job.is_err(), "stream without a backing file is refused");
    let job = start_mirror(
        &disk,
        &d.path("t2.qcow2"),
        &CreateOptions {
            format: Format::Raw,
            size: 0,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    let shared = job.progress();
    assert!(shared.total >= shared.done);
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    drop(disk);
    assert_identical(&p, "qcow2", &d.path("t2.qcow2"), "raw");
}

struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_target_out_of_space_fails_the_job_clearly_and_the_disk_goes_on() {
    let _serial = serial();
    let d = Scratch::new("job-enospc");
    let p = d.path("src.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "16M"]);
    qemu_io(&p, "qcow2", &["write -P 7 0 8M".into()]);
    let mnt = d.path("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status_within(TOOL_TIMEOUT)
        .expect("run mount");
    assert!(st.success(), "mounting a 1 MiB tmpfs needs root");
    let _guard = Tmpfs(mnt.clone());
    let disk = rw_disk(&p);
    let job = start_mirror(
        &disk,
        &mnt.join("t.qcow2"),
        &CreateOptions {
            format: Format::Qcow2,
            size: 0,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    let err = job.wait().unwrap_err().to_string();
    assert!(err.contains("No space left"), "{err}");
    assert!(err.contains("t.qcow2"), "the error names the target: {err}");
    assert_eq!(disk.path(), p);
    disk.write_at(&[1u8; 512], 9 << 20).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert_clean(&p);
    qemu_io(
        &p,
        "qcow2",
        &["read -P 7 0 8M".into(), "read -P 1 9M 512".into()],
    );
}

#[test]
fn img_stream_flattens_offline() {
    let _serial = serial();
    let d = Scratch::new("job-img-stream");
    let (_base, top) = chain(&d, 65536);
    let before = d.path("before.raw");
    qemu_img_ok(&["convert", "-O", "raw", &s(&top), &s(&before)]);
    let out = img_ok(&["stream", &s(&top)]);
    assert!(out.contains("streamed"), "{out}");
    assert_clean(&top);
    assert_identical(&top, "qcow2", &before, "raw");
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&top)])).unwrap();
    assert!(j.get("backing-filename").is_none(), "{j}");
}
