//! Internal snapshots against qemu-img/qemu-io as the oracle: the same seeded sequence
//! of writes and snapshot create/apply/delete runs on an image through this library and
//! on another through QEMU's tools; the images and every snapshot must compare equal,
//! and `qemu-img check` must stay clean after every step.

mod common;

use common::*;
use ferrovirt_disk::ops::{self, SnapshotParams};
use ferrovirt_disk::{create, open, CreateOptions, Format, OpenOptions, Preallocation};
use std::path::Path;

const SIZE: u64 = 8 << 20;

/// One test at a time: a child process spawned by another test thread holds copies of
/// our descriptors between its fork and exec, and with them our image locks, so an
/// image closed and reopened right then would look in use.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Create(String),
    Apply(String),
    Delete(String),
}

fn gen_ops(seed: u64, n: usize, cluster: u64) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut live: Vec<String> = Vec::new();
    let mut next = 1;
    let mut out = Vec::new();
    for _ in 0..n {
        let k = rng.below(20);
        let op = match k {
            0..=2 => {
                let name = format!("snap{next}");
                next += 1;
                live.push(name.clone());
                Op::Create(name)
            }
            3 | 4 if !live.is_empty() => {
                Op::Apply(live[rng.below(live.len() as u64) as usize].clone())
            }
            5 if !live.is_empty() => Op::Delete(live.remove(rng.below(live.len() as u64) as usize)),
            6 => {
                // Discards are whole clusters: QEMU ignores partial ones, we zero them.
                let c = rng.below(SIZE / cluster - 4);
                Op::Discard {
                    off: c * cluster,
                    len: cluster * (1 + rng.below(3)),
                }
            }
            7 => {
                let len = 1 + rng.below(3 * cluster);
                Op::Zero {
                    off: rng.below(SIZE - len),
                    len,
                }
            }
            _ => {
                let len = [512, 4096, cluster, 1 + rng.below(2 * cluster)][rng.below(4) as usize];
                Op::Write {
                    off: rng.below(SIZE - len),
                    len,
                    pat: 1 + rng.below(250) as u8,
                }
            }
        };
        out.push(op);
    }
    out
}

fn rw_open(p: &Path) -> std::sync::Arc<dyn ferrovirt_disk::BlockBackend> {
    open(
        p,
        &OpenOptions {
            format: None,
            read_only: false,
            direct: false,
        },
    )
    .expect("open read-write")
}

/// Runs `ops` on `ours` through the library (snapshot ops through qemu-img too when
/// `mixed` picks it) and on `theirs` through qemu-io / qemu-img snapshot.
fn run_case(name: &str, seed: u64, cluster: u64, mixed: bool) {
    eprintln!("snapshot workload {name}: seed {seed} (cluster {cluster}, mixed {mixed})");
    let d = Scratch::new(name);
    let ours = d.path("ours.qcow2");
    let theirs = d.path("theirs.qcow2");
    create(
        &ours,
        &CreateOptions {
            format: Format::Qcow2,
            size: SIZE,
            cluster_size: Some(cluster as u32),
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        &s(&theirs),
        &SIZE.to_string(),
    ]);
    let ops = gen_ops(seed, 60, cluster);
    let mut pick = Rng(seed ^ 0x5eed);
    let mut pending_io: Vec<String> = Vec::new();
    let mut img = Some(rw_open(&ours));
    for (i, op) in ops.iter().enumerate() {
        let io_cmd = match op {
            Op::Write { off, len, pat } => {
                let data = vec![*pat; *len as usize];
                img.as_ref().unwrap().write_at(&data, *off).unwrap();
                Some(format!("write -P {pat} {off} {len}"))
            }
            Op::Zero { off, len } => {
                img.as_ref()
                    .unwrap()
                    .write_zeroes(*off, *len, false)
                    .unwrap();
                Some(format!("write -z {off} {len}"))
            }
            Op::Discard { off, len } => {
                img.as_ref().unwrap().discard(*off, *len).unwrap();
                Some(format!("discard {off} {len}"))
            }
            _ => None,
        };
        if let Some(c) = io_cmd {
            pending_io.push(c);
            continue;
        }
        // A snapshot operation: bring both images up to date first.
        if !pending_io.is_empty() {
            qemu_io(&theirs, "qcow2", &std::mem::take(&mut pending_io));
        }
        img.take().unwrap().flush().unwrap();
        let (flag, arg) = match op {
            Op::Create(n) => ("-c", n),
            Op::Apply(n) => ("-a", n),
            Op::Delete(n) => ("-d", n),
            _ => unreachable!(),
        };
        qemu_img_ok(&["snapshot", flag, arg, &s(&theirs)]);
        if mixed && pick.below(2) == 0 {
            qemu_img_ok(&["snapshot", flag, arg, &s(&ours)]);
        } else {
            match op {
                Op::Create(n) => {
                    ops::snapshot_create(&ours, n).unwrap();
                }
                Op::Apply(n) => {
                    ops::snapshot_apply(&ours, n).unwrap();
                }
                Op::Delete(n) => {
                    ops::snapshot_delete(&ours, n).unwrap();
                }
                _ => unreachable!(),
            }
        }
        assert_clean(&ours);
        assert_identical(&ours, "qcow2", &theirs, "qcow2");
        let our_check = ops::check(&ours, None).unwrap();
        assert_eq!(
            our_check.exit_code(),
            0,
            "step {i} ({op:?}): our check: {:?}",
            our_check.messages
        );
        img = Some(rw_open(&ours));
    }
    drop(img);
    if !pending_io.is_empty() {
        qemu_io(&theirs, "qcow2", &pending_io);
    }
    assert_clean(&ours);
    assert_identical(&ours, "qcow2", &theirs, "qcow2");
    // The same snapshots, with the same contents.
    let names = |p: &Path| -> Vec<String> {
        let j: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(p)])).unwrap();
        j["snapshots"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let list = names(&theirs);
    assert_eq!(names(&ours), list, "snapshot lists differ");
    assert_eq!(
        ops::snapshot_list(&ours)
            .unwrap()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>(),
        list
    );
    for n in &list {
        let a = d.path(&format!("{n}-ours.raw"));
        let b = d.path(&format!("{n}-theirs.raw"));
        for (src, dst) in [(&ours, &a), (&theirs, &b)] {
            qemu_img_ok(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                "-l",
                &format!("snapshot.name={n}"),
                &s(src),
                &s(dst),
            ]);
        }
        assert_identical(&a, "raw", &b, "raw");
    }
}

fn seed(default: u64) -> u64 {
    std::env::var("FERROVIRT_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn snapshot_workload_matches_qemu() {
    let _serial = serial();
    run_case("snap-64k", seed(11), 65536, false);
}

#[test]
fn snapshot_workload_small_clusters_matches_qemu() {
    let _serial = serial();
    run_case("snap-4k", seed(23), 4096, false);
}

#[test]
fn snapshot_workload_mixed_with_qemu_img_matches_qemu() {
    let _serial = serial();
    // Our image gets some of its snapshot operations from qemu-img: we write into
    // QEMU's shared L2 tables and QEMU works on ours.
    run_case("snap-mixed", seed(37), 65536, true);
}

#[test]
fn snapshot_list_prints_like_qemu_img() {
    let _serial = serial();
    let d = Scratch::new("snap-list");
    let p = d.path("a.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "16M"]);
    qemu_img_ok(&["snapshot", "-c", "from-qemu", &s(&p)]);
    img_ok(&["snapshot", "-c", "from-us", &s(&p)]);
    img_ok(&["snapshot", "-c", "from-us", &s(&p)]);
    let ours = img_ok(&["snapshot", "-l", &s(&p)]);
    let theirs = qemu_img_ok(&["snapshot", "-l", &s(&p)]);
    assert_eq!(ours, theirs);
    assert!(ours.contains("from-us"), "{ours}");
    // info lists them too, in qemu-img's words and JSON fields.
    let info = img_ok(&["info", &s(&p)]);
    let qinfo = qemu_img_ok(&["info", &s(&p)]);
    let section = |t: &str| {
        t.lines()
            .skip_while(|l| !l.starts_with("Snapshot list:"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(section(&info), section(&qinfo));
    let ours_j: serde_json::Value =
        serde_json::from_str(&img_ok(&["info", "--output=json", &s(&p)])).unwrap();
    let theirs_j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&p)])).unwrap();
    assert_eq!(ours_j["snapshots"], theirs_j["snapshots"]);
    // Deleting by id; errors for names that do not exist.
    img_ok(&["snapshot", "-d", "2", &s(&p)]);
    let (code, _, err) = img(&["snapshot", "-a", "nosuch", &s(&p)]);
    assert_eq!(code, 1);
    assert!(err.contains("Could not apply snapshot 'nosuch'"), "{err}");
    let (code, _, err) = img(&["snapshot", "-d", "nosuch", &s(&p)]);
    assert_eq!(code, 1);
    assert!(err.contains("Could not delete snapshot 'nosuch'"), "{err}");
    assert_eq!(
        qemu_img_ok(&["snapshot", "-l", &s(&p)]),
        img_ok(&["snapshot", "-l", &s(&p)])
    );
    assert_clean(&p);
    // An image without snapshots lists nothing, like qemu-img.
    let e = d.path("empty.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&e), "1M"]);
    assert_eq!(img_ok(&["snapshot", "-l", &s(&e)]), "");
}

#[test]
fn vm_state_round_trips_and_stays_out_of_the_disk() {
    let _serial = serial();
    let d = Scratch::new("snap-vmstate");
    let p = d.path("vm.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &s(&p),
        "3M",
    ]);
    qemu_io(&p, "qcow2", &["write -P 7 0 1M".into()]);
    // Large enough to need several L2 tables past the disk's part of the L1 table.
    let mut state = vec![0u8; 5 << 20];
    Rng(99).fill(&mut state);
    let sn = ops::snapshot_create_with(
        &p,
        &SnapshotParams {
            name: "with-state",
            vm_state: Some(&state),
            vm_clock_nsec: 3_723_456_000_000,
            icount: None,
        },
    )
    .unwrap();
    assert_eq!(sn.vm_state_size, state.len() as u64);
    assert_clean(&p);
    assert_eq!(ops::snapshot_vm_state(&p, "with-state").unwrap(), state);
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&p)])).unwrap();
    assert_eq!(j["snapshots"][0]["vm-state-size"], state.len() as u64);
    assert_eq!(j["snapshots"][0]["vm-clock-sec"], 3723);
    let list = qemu_img_ok(&["snapshot", "-l", &s(&p)]);
    assert!(
        list.contains("5 MiB") && list.contains("01:02:03.456"),
        "{list}"
    );
    assert_eq!(list, img_ok(&["snapshot", "-l", &s(&p)]));
    // The disk itself is unchanged and the state is not part of it.
    qemu_io(
        &p,
        "qcow2",
        &["read -P 7 0 1M".into(), "read -P 0 1M 2M".into()],
    );
    ops::snapshot_apply(&p, "with-state").unwrap();
    qemu_io(
        &p,
        "qcow2",
        &["read -P 7 0 1M".into(), "read -P 0 1M 2M".into()],
    );
    assert_eq!(ops::snapshot_vm_state(&p, "1").unwrap(), state);
    ops::snapshot_delete(&p, "with-state").unwrap();
    assert_clean(&p);
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&p)])).unwrap();
    // The 5 MiB of state were given back to the file system.
    assert!(j["actual-size"].as_u64().unwrap() < 3 << 20, "{j}");
}

#[test]
fn snapshot_verbs_refuse_raw_and_bad_input() {
    let _serial = serial();
    let d = Scratch::new("snap-bad");
    let raw = d.path("a.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let (code, _, err) = img(&["snapshot", "-c", "x", &s(&raw)]);
    assert_eq!(code, 1);
    assert!(err.contains("qcow2"), "{err}");
    let (code, _, _) = img(&["snapshot", &s(&raw)]);
    assert_eq!(code, 2, "an action is required");
    let (code, _, _) = img(&["snapshot", "-l", "-c", "x", &s(&raw)]);
    assert_eq!(code, 2, "actions exclude each other");
}

/// Runs monitor commands in a machine-less QEMU with the image attached; returns the
/// monitor output (None when qemu-system-x86_64 is not installed).
fn qemu_monitor(img: &Path, cmds: &[&str]) -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("timeout")
        .args([
            "60",
            "qemu-system-x86_64",
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
            "-drive",
            &format!("file={},if=none,id=d0,format=qcow2", s(img)),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return None,
    };
    let mut input = cmds.join("\n");
    input.push_str("\nquit\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    if o.status.code() == Some(127) {
        return None;
    }
    assert!(
        o.status.success(),
        "qemu-system-x86_64 exited with {:?}",
        o.status
    );
    Some(String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
}

#[test]
fn vm_state_interoperates_with_qemu_savevm_and_loadvm() {
    let _serial = serial();
    let d = Scratch::new("snap-savevm");
    let p = d.path("vm.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "16M"]);
    let Some(out) = qemu_monitor(&p, &["savevm by-qemu"]) else {
        panic!("qemu-system-x86_64 is needed (apt-get install qemu-system-x86)");
    };
    assert!(!out.contains("Error"), "{out}");
    // QEMU's migration stream starts with "QEVM".
    let state = ops::snapshot_vm_state(&p, "by-qemu").unwrap();
    assert_eq!(&state[..4], b"QEVM", "{} bytes", state.len());
    // The same state saved by us loads in QEMU.
    ops::snapshot_create_with(
        &p,
        &SnapshotParams {
            name: "by-us",
            vm_state: Some(&state),
            ..Default::default()
        },
    )
    .unwrap();
    assert_clean(&p);
    let out = qemu_monitor(&p, &["loadvm by-us", "info snapshots"]).unwrap();
    assert!(
        !out.contains("Error"),
        "loadvm of our snapshot failed: {out}"
    );
    assert!(out.contains("by-us"), "{out}");
    assert_clean(&p);
}
