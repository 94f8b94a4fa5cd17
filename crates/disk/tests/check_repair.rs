//! `check -r all` on corrupted images: ours repairs what qemu-img repairs (and the
//! references qemu-img 7.2 leaves corrupt or fails on), `qemu-img check` accepts the
//! result, and the data is what QEMU keeps. Vice versa, our check accepts images
//! qemu-img repaired.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

const COPIED: u64 = 1 << 63;
const CS: u64 = 65536;

fn be64(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn put64(f: &std::fs::File, at: u64, v: u64) {
    f.write_all_at(&v.to_be_bytes(), at).unwrap();
}

/// A 2 GiB image (4 L1 entries) with data in L1 entries 0 and 1.
fn subject(p: &Path) {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &s(p), "2G"]);
    qemu_io(
        p,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -P 2 200M 64k".into(),
            "write -P 3 1000M 64k".into(),
        ],
    );
}

/// Damages the image the way `kind` says.
fn corrupt(p: &Path, kind: &str) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let l1 = be64(&f, 40);
    let rt = be64(&f, 48);
    let rb0 = be64(&f, rt);
    let l2 = be64(&f, l1) & 0x00ff_ffff_ffff_fe00;
    let len = f.metadata().unwrap().len();
    match kind {
        // A data cluster's refcount dropped to 0.
        "refcount-zero" => {
            let d = be64(&f, l2) & 0x00ff_ffff_ffff_fe00;
            f.write_all_at(&0u16.to_be_bytes(), rb0 + 2 * (d / CS))
                .unwrap();
        }
        // Guest cluster 1 shares guest cluster 0's host cluster (refcount 1).
        "shared-cluster" => {
            let d = be64(&f, l2) & 0x00ff_ffff_ffff_fe00;
            put64(&f, l2 + 8, d | COPIED);
        }
        "copied-flag-missing" => put64(&f, l2, be64(&f, l2) & !COPIED),
        // L1 entry 1 names the L1 table itself as its L2 table.
        "l2-is-l1" => put64(&f, l1 + 8, l1 | COPIED),
        "l1-copied-without-table" => put64(&f, l1 + 8, COPIED),
        "l1-reserved-bits" => put64(&f, l1, be64(&f, l1) | 0x0100_0000_0000_0000),
        "l2-table-past-eof" => put64(&f, l1 + 8, ((len / CS + 10) * CS) | COPIED),
        // The second refcount table entry names a block past the end of the file.
        "refcount-block-past-eof" => put64(&f, rt + 8, (len / CS + 20) * CS),
        "data-past-eof" => put64(&f, l2 + 16, ((len / CS + 10) * CS) | COPIED),
        other => panic!("unknown corruption {other}"),
    }
}

fn check_code(tool_is_qemu: bool, args: &[&str]) -> (i32, String) {
    if tool_is_qemu {
        let o = qemu_img(args);
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    } else {
        let (c, o, e) = img(args);
        (c, o + &e)
    }
}

#[test]
fn repairs_leave_images_qemu_img_accepts_with_the_data_qemu_keeps() {
    let d = Scratch::new("check-repair");
    // (corruption, whether qemu-img 7.2 repairs it)
    let cases = [
        ("refcount-zero", true),
        ("shared-cluster", true),
        ("copied-flag-missing", true),
        ("refcount-block-past-eof", true),
        ("l2-is-l1", false),
        ("l1-copied-without-table", false),
        ("l1-reserved-bits", false),
        ("l2-table-past-eof", false),
        ("data-past-eof", false),
    ];
    for (kind, qemu_repairs) in cases {
        let q = d.path(&format!("{kind}-q.qcow2"));
        let o = d.path(&format!("{kind}-o.qcow2"));
        subject(&q);
        subject(&o);
        corrupt(&q, kind);
        corrupt(&o, kind);
        // Both call it corrupt (exit 2).
        assert_eq!(
            check_code(true, &["check", &s(&q)]).0,
            2,
            "{kind}: qemu-img check"
        );
        let (code, text) = check_code(false, &["check", &s(&o)]);
        assert_eq!(code, 2, "{kind}: our check: {text}");
        let (qcode, qtext) = check_code(true, &["check", "-r", "all", &s(&q)]);
        let (ocode, otext) = check_code(false, &["check", "-r", "all", &s(&o)]);
        assert_eq!(ocode, 0, "{kind}: our repair: {otext}");
        assert_clean(&o);
        assert_eq!(check_code(false, &["check", &s(&o)]).0, 0, "{kind}");
        if qemu_repairs {
            assert_eq!(qcode, 0, "{kind}: qemu-img repair: {qtext}");
            assert_identical(&q, "qcow2", &o, "qcow2");
            // Vice versa: what qemu-img repaired, our check accepts.
            let (c, t) = check_code(false, &["check", &s(&q)]);
            assert_eq!(c, 0, "{kind}: our check after qemu-img's repair: {t}");
        } else {
            assert_ne!(qcode, 0, "{kind}: qemu-img 7.2 now repairs this: {qtext}");
        }
        // The data no corruption touched is intact.
        let mut reads = vec!["read -P 2 200M 64k".to_string()];
        if kind != "data-past-eof" {
            reads.push("read -P 1 0 1M".into());
        }
        if !matches!(
            kind,
            "l2-is-l1" | "l1-copied-without-table" | "l2-table-past-eof"
        ) {
            reads.push("read -P 3 1000M 64k".into());
        }
        qemu_io(&o, "qcow2", &reads);
        // And the repaired image takes writes and stays clean (not over a shared
        // cluster: QEMU leaves the flag of the remaining sharer stale itself).
        qemu_io(&o, "qcow2", &["write -P 9 600M 128k".into()]);
        assert_clean(&o);
    }
}

#[test]
fn check_output_is_qemu_img_checks_byte_for_byte() {
    let d = Scratch::new("check-output");
    let p = d.path("f.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &s(&p), "2G"]);
    qemu_io(
        &p,
        "qcow2",
        &[
            "write -P 1 0 1M".into(),
            "write -P 2 600M 64k".into(),
            "write -P 3 100M 64k".into(),
            "write -c -P 4 1200M 64k".into(),
            "write -c -P 5 1300M 128k".into(),
            "write -z 0 128k".into(),
            "write -P 6 50M 64k".into(),
        ],
    );
    let c = d.path("c.qcow2");
    subject(&c);
    corrupt(&c, "shared-cluster");
    for img_path in [&p, &c] {
        for args in [vec!["check"], vec!["check", "--output=json"]] {
            let mut a = args.clone();
            let ps = s(img_path);
            a.push(&ps);
            let q = qemu_img(&a);
            let (code, out, _) = img(&a);
            assert_eq!(code, q.status.code().unwrap_or(-1), "{a:?}");
            assert_eq!(out, String::from_utf8_lossy(&q.stdout), "{a:?}");
        }
    }
}
