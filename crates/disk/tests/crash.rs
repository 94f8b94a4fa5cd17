//! Crash consistency by fault injection: a child process runs a seeded workload and
//! aborts right before its Nth write to the image file, for many N. Afterwards
//! `qemu-img check` must find no corruption (leaks are allowed) and every byte that
//! was flushed and not touched again must read back.
//!
//! Two failure models for each crash point: the process crash itself (the page cache keeps
//! every write that reached the file), and a power loss, replayed from the child's write
//! journal onto a copy of the starting image: everything up to the last fdatasync survives,
//! and of the writes after it only some do, in any combination (a disk cache reorders). A
//! missing sync shows in the second model only.

mod common;

use common::*;
use ferrovirt_disk::journal::{self, Event};
use ferrovirt_disk::{open, OpenOptions, FAULT_ENV};
use std::path::Path;
use std::process::Command;

const SIZE: u64 = 4 << 20;
const OPS: usize = 40;
const CHILD_ENV: &str = "FERROVIRT_CRASH_CHILD_DIR";

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

fn ops(seed: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    (0..OPS)
        .map(|i| {
            if i % 4 == 3 {
                return Op::Flush;
            }
            let len = [4096, 65536, 1 + rng.below(200_000), 512][rng.below(4) as usize];
            let off = rng.below(SIZE - len);
            match rng.below(8) {
                0 => Op::Zero {
                    off,
                    len,
                    unmap: rng.below(2) == 0,
                },
                1 => Op::Discard { off, len },
                _ => Op::Write {
                    off,
                    len,
                    seed: rng.next(),
                },
            }
        })
        .collect()
}

fn data(len: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    Rng(seed | 1).fill(&mut v);
    v
}

fn apply(model: &mut [u8], op: Op) {
    match op {
        Op::Write { off, len, seed } => {
            model[off as usize..(off + len) as usize].copy_from_slice(&data(len, seed))
        }
        Op::Zero { off, len, .. } | Op::Discard { off, len } => {
            model[off as usize..(off + len) as usize].fill(0)
        }
        Op::Flush => {}
    }
}

/// The child: runs the workload on DIR/img.qcow2, recording each completed flush.
#[test]
#[ignore = "run by crash_consistency_under_fault_injection in a child process"]
fn crash_child() {
    let dir = std::env::var(CHILD_ENV).expect("child mode needs its directory");
    let dir = Path::new(&dir);
    let img = open(
        &dir.join("img.qcow2"),
        &OpenOptions {
            format: None,
            read_only: false,
            direct: false,
        },
    )
    .expect("child open");
    for (i, op) in ops(7).into_iter().enumerate() {
        match op {
            Op::Write { off, len, seed } => img.write_at(&data(len, seed), off).unwrap(),
            Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap).unwrap(),
            Op::Discard { off, len } => img.discard(off, len).unwrap(),
            Op::Flush => {
                img.flush().unwrap();
                std::fs::write(dir.join("flushed"), i.to_string()).unwrap();
            }
        }
    }
    img.flush().unwrap();
    std::fs::write(dir.join("flushed"), OPS.to_string()).unwrap();
    // Closing stores the dirty bitmap: those writes are counted too.
    drop(img);
    std::fs::write(
        dir.join("writes"),
        ferrovirt_disk::fault_write_count().to_string(),
    )
    .unwrap();
}

/// How the child ended: the workload completed, or the injected fault killed it (abort, so
/// SIGABRT). Anything else (a panic, another signal) is a failure of the test itself.
fn run_child(dir: &Path, fault_after: u64) -> bool {
    crash_child_completed(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, dir)
            .env(FAULT_ENV, fault_after.to_string())
            .env(journal::JOURNAL_ENV, dir.join("journal")),
        &format!("fault after {fault_after} writes"),
    )
}

/// The image after a power loss at the crash point: the starting image, every change up to the
/// last sync, then those of the later changes that `keep` picks.
fn power_loss_image(
    template: &Path,
    run: &Path,
    name: &str,
    mut keep: impl FnMut() -> bool,
) -> std::path::PathBuf {
    let img = run.join("img.qcow2");
    // No journal: the child died before its first change reached the file.
    let events: Vec<Event> = journal::read(&run.join("journal"))
        .unwrap_or_default()
        .into_iter()
        .filter(|(path, _)| path == &img)
        .map(|(_, e)| e)
        .collect();
    let last_sync = events.iter().rposition(|e| *e == Event::Sync);
    let out = run.join(name);
    std::fs::copy(template, &out).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    for (i, e) in events.iter().enumerate() {
        if last_sync.is_some_and(|s| i <= s) || keep() {
            journal::apply(&file, e).unwrap();
        }
    }
    out
}

/// qemu-img check finds no corruption in `img`, our check agrees, and every flushed byte
/// not touched since reads back as the model says.
fn check_image(img_path: &Path, model: &[u8], untouched: &[(usize, usize)], what: &str) {
    let qemu_code = assert_no_corruption(img_path);
    let ours = ferrovirt_disk::ops::check(img_path, None).unwrap();
    assert_eq!(
        ours.exit_code(),
        qemu_code,
        "{what}: our check disagrees with qemu-img: {:?}",
        ours.messages
    );
    let img = open(
        img_path,
        &OpenOptions {
            format: None,
            read_only: true,
            direct: false,
        },
    )
    .unwrap();
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    // Range by range (a memcmp each): a byte loop over 4 MiB is slow in a debug build.
    let bad = untouched
        .iter()
        .find(|&&(a, b)| got[a..b] != model[a..b])
        .and_then(|&(a, b)| (a..b).find(|&i| got[i] != model[i]));
    assert!(
        bad.is_none(),
        "{what}: flushed byte {bad:?} did not read back"
    );
}

fn case(with_backing: bool) {
    let d = Scratch::new(if with_backing { "crash-b" } else { "crash" });
    let template = d.path("template.qcow2");
    let base = d.path("base.qcow2");
    let size = SIZE.to_string();
    if with_backing {
        qemu_img_ok(&["create", "-f", "qcow2", &s(&base), &size]);
        qemu_io(&base, "qcow2", &["write -P 0x5b 0 4M".into()]);
        qemu_img_ok(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &s(&template),
        ]);
    } else {
        qemu_img_ok(&["create", "-f", "qcow2", &s(&template), &size]);
    }
    // Pre-existing data, so that crashes also hit overwrites and frees.
    qemu_io(
        &template,
        "qcow2",
        &[
            "write -P 0x3c 1M 1M".into(),
            "write -c -P 0x4d 3M 64k".into(),
        ],
    );
    if !with_backing {
        // A persistent bitmap: marked in use by the first write, stored at close.
        qemu_img_ok(&["bitmap", "--add", &s(&template), "b0"]);
    }
    let initial = {
        let img = open(
            &template,
            &OpenOptions {
                format: None,
                read_only: true,
                direct: false,
            },
        )
        .unwrap();
        let mut v = vec![0u8; SIZE as usize];
        img.read_at(&mut v, 0).unwrap();
        v
    };
    let workload = ops(7);
    // A full run tells how many writes the workload makes.
    let full = d.path("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::copy(&template, full.join("img.qcow2")).unwrap();
    if with_backing {
        std::fs::copy(&base, full.join("base.qcow2")).unwrap();
    }
    assert!(
        run_child(&full, u64::MAX),
        "the workload fails without faults"
    );
    let total: u64 = std::fs::read_to_string(full.join("writes"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(total > 20, "workload made only {total} writes");
    let stride = (total / 40).max(1);
    let mut n = 1;
    let mut runs = 0;
    while n <= total + 1 {
        let run = d.path(&format!("n{n}"));
        std::fs::create_dir(&run).unwrap();
        let img_path = run.join("img.qcow2");
        std::fs::copy(&template, &img_path).unwrap();
        if with_backing {
            std::fs::copy(&base, run.join("base.qcow2")).unwrap();
        }
        let completed = run_child(&run, n);
        assert_eq!(completed, n > total, "fault after {n} of {total} writes");
        // Flushed state: the model up to the last completed flush.
        let flushed: usize = std::fs::read_to_string(run.join("flushed"))
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(0, |i: usize| i + 1);
        let mut model = initial.clone();
        for op in &workload[..flushed.min(OPS)] {
            apply(&mut model, *op);
        }
        // What the workload touched after its last flush may read either way.
        let mut touched: Vec<(usize, usize)> = workload[flushed.min(OPS)..]
            .iter()
            .filter_map(|op| match *op {
                Op::Write { off, len, .. }
                | Op::Zero { off, len, .. }
                | Op::Discard { off, len } => Some((off as usize, (off + len) as usize)),
                Op::Flush => None,
            })
            .collect();
        touched.sort();
        let mut untouched = Vec::new();
        let mut at = 0;
        for (a, b) in touched {
            if a > at {
                untouched.push((at, a));
            }
            at = at.max(b);
        }
        if at < SIZE as usize {
            untouched.push((at, SIZE as usize));
        }
        check_image(
            &img_path,
            &model,
            &untouched,
            &format!("process crash before write {n}"),
        );
        if !with_backing {
            // The bitmap is either left in use (inconsistent, refused) or trustworthy:
            // never touched (empty), or stored at close with every write in it (the
            // crash may hit the frees after the header switch).
            if let Ok(ext) = ferrovirt_disk::ops::bitmap_extents(&img_path, "b0") {
                assert!(
                    completed || ext.is_empty() || n > total / 2,
                    "fault after {n}: {ext:?}"
                );
                if !ext.is_empty() {
                    for op in &workload {
                        if let Op::Write { off, len, .. }
                        | Op::Zero { off, len, .. }
                        | Op::Discard { off, len } = *op
                        {
                            assert!(
                                ext.iter().any(|&(s, l)| s <= off && off + len <= s + l),
                                "fault after {n}: bitmap misses {off}+{len}: {ext:?}"
                            );
                        }
                    }
                }
            }
        }
        // Power loss: nothing after the last sync, then random survivors of it (seeded per point).
        let lost = power_loss_image(&template, &run, "lost.qcow2", || false);
        check_image(
            &lost,
            &model,
            &untouched,
            &format!("power loss before write {n}, unsynced writes lost"),
        );
        for k in 0..3u64 {
            let mut rng = Rng(n * 31 + k + 1);
            let name = format!("partial{k}.qcow2");
            let partial = power_loss_image(&template, &run, &name, || rng.below(2) == 0);
            check_image(
                &partial,
                &model,
                &untouched,
                &format!("power loss before write {n}, some unsynced writes kept (variant {k})"),
            );
        }
        std::fs::remove_dir_all(&run).unwrap();
        runs += 1;
        n += stride;
    }
    assert!(runs >= 30, "only {runs} crash points tried");
}

#[test]
fn crash_consistency_under_fault_injection() {
    case(false);
}

#[test]
fn crash_consistency_with_backing_file() {
    case(true);
}
