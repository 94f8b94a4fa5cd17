//! Hostile images: every malformed input gives a clear error, never a panic, an
//! unbounded allocation, or a file opened outside the named chain.

mod common;

use common::*;
use ferrovirt_disk::{open, ops, DiskError, OpenOptions};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};
use std::path::{Path, PathBuf};

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: None,
        read_only,
        direct: false,
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// A 1 MiB qcow2 image with data at guest offset 0: header at 0, refcount table at
/// 0x10000, refcount block at 0x20000, L1 at 0x30000, L2 at 0x40000, data at 0x50000.
fn sample(d: &Scratch, name: &str) -> PathBuf {
    let p = d.path(name);
    qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "1M"]);
    qemu_io(&p, "qcow2", &["write -P 0xaa 0 64k".into()]);
    p
}

fn open_err(p: &Path) -> String {
    match open(p, &opts(true)) {
        Ok(_) => panic!("{} opened although it is malformed", p.display()),
        Err(e) => e.to_string(),
    }
}

fn read_err(p: &Path) -> String {
    let img = open(p, &opts(true)).expect("header is valid");
    let mut buf = vec![0u8; 65536];
    match img.read_at(&mut buf, 0) {
        Ok(()) => panic!("read of {} succeeded", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn oversized_and_out_of_file_tables() {
    let d = Scratch::new("hostile-tables");
    let p = sample(&d, "l1huge.qcow2");
    patch(&p, 36, &0x1000_0000u32.to_be_bytes());
    let e = open_err(&p);
    assert!(e.contains("L1 table") && e.contains("32 MiB"), "{e}");

    let p = sample(&d, "l1eof.qcow2");
    patch(&p, 36, &(1u32 << 20).to_be_bytes());
    let e = open_err(&p);
    assert!(e.contains("past the end of the file"), "{e}");

    let p = sample(&d, "rteof.qcow2");
    patch(&p, 48, &0x7000_0000u64.to_be_bytes());
    let e = open_err(&p);
    assert!(
        e.contains("refcount table") && e.contains("past the end"),
        "{e}"
    );

    let p = sample(&d, "l2eof.qcow2");
    patch(
        &p,
        0x30000,
        &(0x8000_0000_0000_0000u64 | 0x7000_0000).to_be_bytes(),
    );
    let e = read_err(&p);
    assert!(e.contains("L2 table") && e.contains("past the end"), "{e}");

    let p = sample(&d, "dataeof.qcow2");
    patch(
        &p,
        0x40000,
        &(0x8000_0000_0000_0000u64 | 0x7000_0000).to_be_bytes(),
    );
    let e = read_err(&p);
    assert!(
        e.contains("data cluster") && e.contains("past the end"),
        "{e}"
    );
    assert!(
        e.contains("check -r all"),
        "the message says what to do: {e}"
    );
}

#[test]
fn overlapping_metadata() {
    let d = Scratch::new("hostile-overlap");
    let p = sample(&d, "rt-on-l1.qcow2");
    patch(&p, 48, &0x30000u64.to_be_bytes());
    let e = open_err(&p);
    assert!(e.contains("overlap"), "{e}");

    let p = sample(&d, "l1-in-header.qcow2");
    patch(&p, 40, &0u64.to_be_bytes());
    let e = open_err(&p);
    assert!(e.contains("header"), "{e}");

    // A data cluster mapped onto the L1 table: writes through it are refused, so the
    // metadata is not overwritten.
    let p = sample(&d, "data-on-l1.qcow2");
    patch(
        &p,
        0x40000,
        &(0x8000_0000_0000_0000u64 | 0x30000).to_be_bytes(),
    );
    let img = open(&p, &opts(false)).unwrap();
    let e = img.write_at(&[1u8; 512], 0).unwrap_err().to_string();
    assert!(e.contains("overlaps the image's metadata"), "{e}");
    drop(img);
    // Like QEMU, the image is now marked corrupt: no more read-write opens.
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&p)])).unwrap();
    assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{info}");
    let e = open(&p, &opts(false))
        .err()
        .expect("read-write open of a corrupt image")
        .to_string();
    assert!(e.contains("corrupt bit"), "{e}");
    let r = ops::check(&p, None).unwrap();
    assert!(r.corruptions > 0, "check must flag the shared cluster");
}

#[test]
fn refcount_overflow_is_reported() {
    let d = Scratch::new("hostile-refcount");
    let p = d.path("rc1.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=1",
        &s(&p),
        "1M",
    ]);
    qemu_io(&p, "qcow2", &["write -P 0xaa 0 64k".into()]);
    // Map guest cluster 1 to the same host cluster as guest cluster 0: 2 references
    // do not fit a 1-bit refcount.
    patch(
        &p,
        0x40008,
        &(0x8000_0000_0000_0000u64 | 0x50000).to_be_bytes(),
    );
    let r = ops::check(&p, None).unwrap();
    assert!(
        r.messages.iter().any(|m| m.contains("refcount overflow")),
        "{:?}",
        r.messages
    );
    assert_eq!(r.exit_code(), 2);
    let e = ops::check(&p, Some(ops::Repair::All)).map(|r| r.exit_code());
    assert!(matches!(e, Ok(2) | Err(DiskError::Corrupt { .. })), "{e:?}");
}

#[test]
fn backing_loops_depth_and_protocols() {
    let d = Scratch::new("hostile-backing");
    let a = d.path("a.qcow2");
    let b = d.path("b.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&a), "1M"]);
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        &s(&b),
    ]);
    qemu_img_ok(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", &s(&a)]);
    let e = open_err(&b);
    assert!(e.contains("loop"), "{e}");
    let (code, _, err) = img(&["info", "--backing-chain", &s(&b)]);
    assert_eq!(code, 1);
    assert!(err.contains("loop") && err.lines().count() == 1, "{err}");

    let selfref = d.path("self.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&selfref), "1M"]);
    qemu_img_ok(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        &s(&selfref),
    ]);
    assert!(open_err(&selfref).contains("loop"));

    // A chain deeper than the limit.
    let mut prev = "c0.qcow2".to_string();
    qemu_img_ok(&["create", "-f", "qcow2", &s(&d.path(&prev)), "1M"]);
    for i in 1..=ferrovirt_disk::MAX_BACKING_DEPTH + 1 {
        let name = format!("c{i}.qcow2");
        qemu_img_ok(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &prev,
            "-F",
            "qcow2",
            &s(&d.path(&name)),
            "1M",
        ]);
        prev = name;
    }
    let e = open_err(&d.path(&prev));
    assert!(e.contains("too deep"), "{e}");
    // One less is fine.
    let ok = format!("c{}.qcow2", ferrovirt_disk::MAX_BACKING_DEPTH);
    open(&d.path(&ok), &opts(true)).expect("a chain at the limit opens");

    for name in [
        "json:{\"file.filename\":\"/etc/passwd\"}",
        "nbd://127.0.0.1:10809/x",
        "http://example.com/x.qcow2",
    ] {
        let p = d.path("proto.qcow2");
        qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "1M"]);
        qemu_img_ok(&["rebase", "-u", "-b", name, "-F", "raw", &s(&p)]);
        let e = open_err(&p);
        assert!(e.contains("not supported"), "{name}: {e}");
    }
    // Backing names that are not disks: a FIFO would block an open, /dev/zero is no disk.
    let fifo = d.path("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status_within(TOOL_TIMEOUT)
        .expect("run mkfifo");
    assert!(st.success());
    for target in [s(&fifo), "/dev/zero".to_string(), s(&d.dir)] {
        let p = d.path("odd.qcow2");
        qemu_img_ok(&["create", "-f", "qcow2", &s(&p), "1M"]);
        qemu_img_ok(&["rebase", "-u", "-b", &target, "-F", "raw", &s(&p)]);
        let e = open_err(&p);
        assert!(e.contains("not a disk image"), "{target}: {e}");
    }
    let p = d.path("missing.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nowhere.qcow2",
        "-F",
        "qcow2",
        &s(&p),
        "1M",
    ]);
    let e = open_err(&p);
    assert!(
        e.contains("nowhere.qcow2") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn header_flags_and_garbage() {
    let d = Scratch::new("hostile-header");
    let p = sample(&d, "unknown-feature.qcow2");
    patch(&p, 72, &(1u64 << 40).to_be_bytes());
    let e = open_err(&p);
    assert!(e.contains("unsupported image feature"), "{e}");

    let p = sample(&d, "corrupt-bit.qcow2");
    patch(&p, 72, &2u64.to_be_bytes());
    let e = open(&p, &opts(false))
        .err()
        .expect("read-write open of a corrupt image")
        .to_string();
    assert!(e.contains("corrupt") && e.contains("read-only"), "{e}");
    let img = open(&p, &opts(true)).expect("a corrupt image opens read-only");
    let mut b = [0u8; 16];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0xaa; 16]);

    // The dirty bit: read-write open is refused until `check -r all` repairs the image.
    let p = sample(&d, "dirty.qcow2");
    patch(&p, 72, &1u64.to_be_bytes());
    let e = open(&p, &opts(false))
        .err()
        .expect("dirty image opened read-write")
        .to_string();
    assert!(e.contains("dirty") && e.contains("check -r all"), "{e}");
    img_ok(&["check", "-r", "all", &s(&p)]);
    assert!(
        open(&p, &opts(false)).is_ok(),
        "repaired image opens read-write"
    );
    assert_clean(&p);

    let p = d.path("short.qcow2");
    std::fs::write(&p, b"QFI\xfb\x00\x00\x00\x03").unwrap();
    assert!(open_err(&p).contains("too short"));

    let p = sample(&d, "bits.qcow2");
    patch(&p, 20, &30u32.to_be_bytes());
    assert!(open_err(&p).contains("cluster size"));
}

/// Random corruption of the header and tables of a valid image: opening, reading,
/// writing and checking never panic.
#[test]
fn random_corruption_never_panics() {
    let d = Scratch::new("hostile-random");
    let good = sample(&d, "good.qcow2");
    let bytes = std::fs::read(&good).unwrap();
    let mut rng = Rng(0xfeed);
    let hot: &[(usize, usize)] = &[
        (0, 112),
        (0x10000, 64),
        (0x20000, 64),
        (0x30000, 64),
        (0x40000, 64),
    ];
    let p = d.path("fuzz.qcow2");
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let (start, len) = hot[rng.below(hot.len() as u64) as usize];
            let i = start + rng.below(len as u64) as usize;
            b[i] = rng.next() as u8;
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(img) = open(&p, &opts(false)) {
            let mut buf = vec![0u8; 70000];
            let _ = img.read_at(&mut buf, 0);
            let _ = img.write_at(&buf[..5000], 60000);
            let _ = img.write_zeroes(0, 65536, true);
            let _ = img.flush();
        }
        let _ = ops::check(&p, None);
        let _ = ferrovirt_disk::info(&p, true);
    }
}
