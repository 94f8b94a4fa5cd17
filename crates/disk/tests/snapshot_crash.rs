//! Crash consistency of snapshot operations and of copy-on-write writes into clusters
//! shared with snapshots: a child process runs a fixed sequence of steps and aborts
//! right before its Nth write to the image file, for many N. Afterwards `qemu-img
//! check` must find no corruption, every snapshot listed must hold exactly the data it
//! was taken with, the list must be the one before or after the interrupted step, and
//! the active image must show the state before or after that step (a snapshot step is
//! all or nothing; a write step may be partly done inside its own range only).

mod common;

use common::*;
use ferrovirt_disk::{open, ops, OpenOptions, FAULT_ENV};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const SIZE: u64 = 2 << 20;
const CHILD_ENV: &str = "FERROVIRT_SNAP_CRASH_CHILD_DIR";

#[derive(Clone, Debug)]
enum Step {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Create(&'static str),
    Apply(&'static str),
    Delete(&'static str),
}

fn steps() -> Vec<Step> {
    use Step::*;
    vec![
        Write {
            off: 100_000,
            len: 200_000,
            pat: 1,
        },
        Create("a"),
        Write {
            off: 0,
            len: 70_000,
            pat: 2,
        },
        Zero {
            off: 65536,
            len: 131072,
        },
        Create("b"),
        Write {
            off: 1_000_000,
            len: 300_000,
            pat: 3,
        },
        Apply("a"),
        Write {
            off: 150_000,
            len: 10_000,
            pat: 4,
        },
        Delete("q0"),
        Create("c"),
        Delete("b"),
        Write {
            off: 500_000,
            len: 600_000,
            pat: 5,
        },
        Apply("c"),
        Delete("a"),
        Write {
            off: 0,
            len: SIZE,
            pat: 6,
        },
    ]
}

fn apply_io(model: &mut [u8], st: &Step) {
    match *st {
        Step::Write { off, len, pat } => model[off as usize..(off + len) as usize].fill(pat),
        Step::Zero { off, len } => model[off as usize..(off + len) as usize].fill(0),
        _ => {}
    }
}

#[test]
#[ignore = "run by snapshot_operations_survive_crashes in a child process"]
fn snapshot_crash_child() {
    let dir = std::env::var(CHILD_ENV).expect("child mode needs its directory");
    let dir = Path::new(&dir);
    let path = dir.join("img.qcow2");
    for (i, st) in steps().iter().enumerate() {
        match st {
            Step::Write { .. } | Step::Zero { .. } => {
                let img = open(
                    &path,
                    &OpenOptions {
                        format: None,
                        read_only: false,
                        direct: false,
                    },
                )
                .unwrap();
                match *st {
                    Step::Write { off, len, pat } => {
                        img.write_at(&vec![pat; len as usize], off).unwrap()
                    }
                    Step::Zero { off, len } => img.write_zeroes(off, len, false).unwrap(),
                    _ => unreachable!(),
                }
                img.flush().unwrap();
            }
            Step::Create(n) => {
                ops::snapshot_create(&path, n).unwrap();
            }
            Step::Apply(n) => {
                ops::snapshot_apply(&path, n).unwrap();
            }
            Step::Delete(n) => {
                ops::snapshot_delete(&path, n).unwrap();
            }
        }
        std::fs::write(dir.join("done"), (i + 1).to_string()).unwrap();
    }
    std::fs::write(
        dir.join("writes"),
        ferrovirt_disk::fault_write_count().to_string(),
    )
    .unwrap();
}

fn run_child(dir: &Path, fault_after: u64) -> bool {
    crash_child_completed(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "snapshot_crash_child",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, dir)
            .env(FAULT_ENV, fault_after.to_string()),
        &format!("fault after {fault_after} writes"),
    )
}

fn read_raw(d: &Path, img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = d.join("out.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let l = snapshot.map(|n| format!("snapshot.name={n}"));
    if let Some(l) = &l {
        args.extend(["-l", l]);
    }
    let (a, b) = (s(img), s(&out));
    args.extend([a.as_str(), b.as_str()]);
    qemu_img_ok(&args);
    std::fs::read(&out).unwrap()
}

#[test]
fn snapshot_operations_survive_crashes() {
    let d = Scratch::new("snap-crash");
    let template = d.path("template.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&template), &SIZE.to_string()]);
    qemu_io(
        &template,
        "qcow2",
        &["write -P 9 0 1M".into(), "write -c -P 8 1M 64k".into()],
    );
    // A snapshot made by QEMU: its L2 tables are shared with the active layer.
    qemu_img_ok(&["snapshot", "-c", "q0", &s(&template)]);
    let initial = read_raw(&d.dir, &template, None);
    // Models: active contents and snapshot list after each number of completed steps.
    let all = steps();
    let mut actives = vec![initial.clone()];
    let mut contents: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    contents.insert("q0", initial.clone());
    let mut lists: Vec<Vec<&str>> = vec![vec!["q0"]];
    for st in &all {
        let mut a = actives.last().unwrap().clone();
        let mut l = lists.last().unwrap().clone();
        match st {
            Step::Create(n) => {
                contents.insert(n, a.clone());
                l.push(n);
            }
            Step::Apply(n) => a = contents[n].clone(),
            Step::Delete(n) => l.retain(|x| x != n),
            io => apply_io(&mut a, io),
        }
        actives.push(a);
        lists.push(l);
    }
    let full = d.path("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::copy(&template, full.join("img.qcow2")).unwrap();
    assert!(run_child(&full, u64::MAX), "the steps fail without faults");
    let total: u64 = std::fs::read_to_string(full.join("writes"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        read_raw(&d.dir, &full.join("img.qcow2"), None),
        *actives.last().unwrap()
    );
    let stride = (total / 45).max(1);
    let mut n = 1;
    let mut runs = 0;
    while n <= total + 1 {
        let run = d.path(&format!("n{n}"));
        std::fs::create_dir(&run).unwrap();
        let img = run.join("img.qcow2");
        std::fs::copy(&template, &img).unwrap();
        let completed = run_child(&run, n);
        assert_eq!(completed, n > total, "fault after {n} of {total} writes");
        let qemu_code = assert_no_corruption(&img);
        let ours = ops::check(&img, None).unwrap();
        assert_eq!(
            ours.exit_code(),
            qemu_code,
            "fault after {n}: {:?}",
            ours.messages
        );
        let done: usize = std::fs::read_to_string(run.join("done"))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let listed: Vec<String> = ops::snapshot_list(&img)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let after = (done + 1).min(all.len());
        assert!(
            listed == lists[done] || listed == lists[after],
            "fault after {n} (step {done}): snapshots {listed:?}"
        );
        for name in &listed {
            assert!(
                read_raw(&run, &img, Some(name)) == contents[name.as_str()],
                "fault after {n}: snapshot {name} changed"
            );
        }
        let got = read_raw(&run, &img, None);
        let (before, next) = (&actives[done], &actives[after]);
        let ok = match all.get(done) {
            Some(Step::Write { off, len, .. }) | Some(Step::Zero { off, len }) => {
                (0..SIZE as usize).all(|i| {
                    let inside = i as u64 >= *off && (i as u64) < off + len;
                    got[i] == before[i] || (inside && got[i] == next[i])
                })
            }
            _ => got == *before || got == *next,
        };
        assert!(
            ok,
            "fault after {n} of {total} (during step {done}: {:?})",
            all.get(done)
        );
        std::fs::remove_dir_all(&run).unwrap();
        runs += 1;
        n += stride;
    }
    assert!(runs >= 30, "only {runs} crash points tried");
    eprintln!("{runs} crash points over {total} writes");
}
