//! Crash injection during block jobs: a child process runs mirror, active commit or
//! stream on a chain and aborts right before its Nth write to an image file, for many
//! N. Afterwards every image passes `qemu-img check` (leaks at most) and the chain the
//! disk was using still reads exactly as before the job (the job never changes what
//! the disk shows; the switch happens only after the copy is complete and durable).

mod common;

use common::*;
use ferrovirt_disk::jobs::{start_commit, start_mirror, start_stream};
use ferrovirt_disk::{
    open_disk, CreateOptions, Format, JobOutcome, OpenOptions, Preallocation, FAULT_ENV,
};
use std::path::Path;
use std::process::Command;

const CHILD_ENV: &str = "FERROVIRT_JOB_CRASH_CHILD";
const KIND_ENV: &str = "FERROVIRT_JOB_CRASH_KIND";

#[test]
#[ignore = "run by block_jobs_survive_crashes in a child process"]
fn job_crash_child() {
    let dir = std::env::var(CHILD_ENV).expect("child mode");
    let dir = Path::new(&dir);
    let disk = open_disk(
        &dir.join("top.qcow2"),
        &OpenOptions {
            format: None,
            read_only: false,
            direct: false,
        },
    )
    .unwrap();
    let job = match std::env::var(KIND_ENV).unwrap().as_str() {
        "mirror" => start_mirror(
            &disk,
            &dir.join("mirror.qcow2"),
            &CreateOptions {
                format: Format::Qcow2,
                size: 0,
                cluster_size: None,
                preallocation: Preallocation::Off,
                backing: None,
            },
        )
        .inspect(|_| {
            // The target exists in full from here on (creating it is not a job step).
            std::fs::write(dir.join("created"), "").unwrap();
        })
        .unwrap(),
        "commit" => start_commit(&disk).unwrap(),
        _ => start_stream(&disk).unwrap(),
    };
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    drop(disk);
    std::fs::write(
        dir.join("writes"),
        ferrovirt_disk::fault_write_count().to_string(),
    )
    .unwrap();
}

fn run_child(dir: &Path, kind: &str, n: u64) -> bool {
    crash_child_completed(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "job_crash_child",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, dir)
            .env(KIND_ENV, kind)
            .env(FAULT_ENV, n.to_string()),
        &format!("{kind}: fault after {n} writes"),
    )
}

fn case(kind: &str) {
    let d = Scratch::new(&format!("jobcrash-{kind}"));
    let tpl = d.path("tpl");
    std::fs::create_dir(&tpl).unwrap();
    let base = tpl.join("base.qcow2");
    let top = tpl.join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &s(&base),
        "2M",
    ]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -c -P 2 1536k 64k".into()],
    );
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&top),
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 3 512k 600k".into(), "write -z 100k 8k".into()],
    );
    let before = d.path("before.raw");
    qemu_img_ok(&["convert", "-O", "raw", &s(&top), &s(&before)]);
    let copy = |to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(&base, to.join("base.qcow2")).unwrap();
        std::fs::copy(&top, to.join("top.qcow2")).unwrap();
    };
    let full = d.path("full");
    copy(&full);
    assert!(
        run_child(&full, kind, u64::MAX),
        "{kind} fails without faults"
    );
    let total: u64 = std::fs::read_to_string(full.join("writes"))
        .unwrap()
        .parse()
        .unwrap();
    let stride = (total / 30).max(1);
    let mut n = 1;
    let mut runs = 0;
    while n <= total {
        let run = d.path(&format!("n{n}"));
        copy(&run);
        let done = run_child(&run, kind, n);
        assert!(
            !done,
            "{kind}: fault after {n} of {total} writes did not stop the job"
        );
        for f in ["base.qcow2", "top.qcow2", "mirror.qcow2"] {
            let p = run.join(f);
            if p.exists() && std::fs::metadata(&p).unwrap().len() > 0 {
                // A mirror target cut off while it was being created is not an image
                // anyone uses; the disk never switched to it.
                if f == "mirror.qcow2" && !run.join("created").exists() {
                    continue;
                }
                let o = qemu_img(&["check", &s(&p)]);
                let code = o.status.code().unwrap_or(-1);
                assert!(
                    code == 0 || code == 3,
                    "{kind}: fault after {n}: {f}: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
        }
        // What the disk showed is intact: the overlay with its backing file.
        assert_identical(&run.join("top.qcow2"), "qcow2", &before, "raw");
        std::fs::remove_dir_all(&run).unwrap();
        runs += 1;
        n += stride;
    }
    assert!(runs >= 20, "{kind}: only {runs} crash points");
    eprintln!("{kind}: {runs} crash points over {total} writes");
}

#[test]
fn mirror_survives_crashes() {
    case("mirror");
}

#[test]
fn commit_survives_crashes() {
    case("commit");
}

#[test]
fn stream_survives_crashes() {
    case("stream");
}
