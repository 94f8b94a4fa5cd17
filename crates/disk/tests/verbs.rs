//! `ferrovirt img measure | amend | bench` against qemu-img 7.2 as the oracle.

mod common;

use common::*;
use std::path::Path;

/// Runs qemu-img and ours with the same arguments (the file arguments already in
/// `args`); exit codes and stdout must be equal; returns ours.
fn same_as_qemu(args: &[&str]) -> (i32, String) {
    let q = qemu_img(args);
    let (code, out, err) = img(args);
    assert_eq!(
        code,
        q.status.code().unwrap_or(-1),
        "exit code of {args:?}: qemu-img said {}{} / we said {out}{err}",
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&q.stderr)
    );
    assert_eq!(
        out,
        String::from_utf8_lossy(&q.stdout),
        "stdout of {args:?}"
    );
    (code, out)
}

/// A 1 GiB qcow2 source with data, zero and compressed clusters and two bitmaps, an
/// overlay on it, and a sparse raw file.
fn sources(d: &Scratch) -> (String, String, String) {
    let a = d.path("a.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&a), "1G"]);
    qemu_io(
        &a,
        "qcow2",
        &[
            "write -P 1 0 3M".into(),
            "write -P 2 100M 70k".into(),
            "write -z 200M 1M".into(),
            "write -c -P 3 300M 64k".into(),
        ],
    );
    qemu_img_ok(&["bitmap", "--add", &s(&a), "b1"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", &s(&a), "bitmap-two"]);
    let o = d.path("o.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        &s(&o),
    ]);
    qemu_io(&o, "qcow2", &["write -P 5 500M 1k".into()]);
    let r = d.path("r.img");
    qemu_img_ok(&["create", "-f", "raw", &s(&r), "10M"]);
    qemu_io(
        &r,
        "raw",
        &["write -P 1 4k 4k".into(), "write -P 1 1M 100k".into()],
    );
    (s(&a), s(&o), s(&r))
}

#[test]
fn measure_prints_what_qemu_img_measure_prints() {
    let d = Scratch::new("verbs-measure");
    let (a, o, r) = sources(&d);
    let cases: Vec<Vec<&str>> = vec![
        vec![&a],
        vec!["--output=json", &a],
        vec!["-O", "qcow2", &a],
        vec!["-O", "qcow2", "--output=json", &a],
        vec!["-O", "qcow2", "-o", "cluster_size=4k,compat=0.10", &a],
        vec!["-O", "qcow2", "-o", "cluster_size=2M", &r],
        vec!["-O", "qcow2", "-o", "refcount_bits=1", &r],
        vec!["-O", "qcow2", "-o", "preallocation=full", &a],
        vec!["-O", "qcow2", "-o", "backing_file=x", &a],
        vec!["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", &a],
        vec!["-O", "qcow2", &o],
        vec!["-O", "qcow2", "--output=json", &o],
        vec!["--size", "1G", "-O", "qcow2"],
        vec!["--size", "1G", "-O", "qcow2", "--output=json"],
        vec!["--size", "1000", "-O", "raw"],
        vec!["--size", "3T", "-O", "qcow2", "-o", "cluster_size=512"],
        vec!["--size", "7T", "-O", "qcow2", "-o", "cluster_size=512"],
        vec!["-O", "qcow2", "-o", "refcount_bits=8,compat=0.10", &a],
        vec!["-O", "raw", "-o", "cluster_size=4k", &a],
        vec!["--size", "1G", &a],
        vec![],
    ];
    for c in cases {
        let mut args = vec!["measure"];
        args.extend(c);
        same_as_qemu(&args);
    }
}

/// An image with data, zero clusters (allocated and not) and a compressed cluster.
fn amend_subject(p: &Path, create_opts: &str, backing: bool) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", create_opts];
    if backing {
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    let ps = s(p);
    args.extend([ps.as_str(), "64M"]);
    qemu_img_ok(&args);
    qemu_io(
        p,
        "qcow2",
        &[
            "write -P 1 0 3M".into(),
            "write -z 2M 1M".into(),
            "write -z 10M 64k".into(),
            "write -c -P 7 20M 64k".into(),
        ],
    );
}

fn info_without_names(p: &Path) -> String {
    qemu_img_ok(&["info", &s(p)])
        .lines()
        .filter(|l| !l.starts_with("image:") && !l.starts_with("disk size"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn amend_changes_images_as_qemu_img_amend_does() {
    let d = Scratch::new("verbs-amend");
    let base = d.path("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &s(&base), "64M"]);
    qemu_io(&base, "qcow2", &["write -P 9 0 64M".into()]);
    let cases: &[(&str, &str, bool)] = &[
        ("compat=1.1", "compat=0.10", false),
        ("compat=1.1", "compat=0.10", true),
        ("compat=0.10", "compat=1.1", false),
        ("compat=0.10", "compat=1.1,lazy_refcounts=on", true),
        ("compat=1.1", "lazy_refcounts=on", false),
        ("compat=1.1,lazy_refcounts=on", "lazy_refcounts=off", false),
        ("compat=1.1", "compat=0.10,lazy_refcounts=on", false),
        ("compat=0.10", "lazy_refcounts=on", false),
        ("compat=1.1", "size=128M", false),
        ("compat=1.1", "size=1000", false),
        ("compat=1.1", "foo=bar", false),
        ("compat=1.1", "cluster_size=4k", false),
        ("compat=1.1", "compat=0.42", false),
        ("compat=1.1", "backing_file=x", false),
        (
            "compat=1.1",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            true,
        ),
        ("compat=1.1", "refcount_bits=16", false),
        ("compat=1.1,refcount_bits=8", "compat=0.10", false),
    ];
    for (i, (create, amend, backing)) in cases.iter().enumerate() {
        let q = d.path(&format!("q{i}.qcow2"));
        let o = d.path(&format!("o{i}.qcow2"));
        amend_subject(&q, create, *backing);
        amend_subject(&o, create, *backing);
        let qo = qemu_img(&["amend", "-o", amend, &s(&q)]);
        let (code, out, err) = img(&["amend", "-o", amend, &s(&o)]);
        let what = format!("create -o {create}, amend -o {amend}");
        assert_eq!(
            code,
            qo.status.code().unwrap_or(-1),
            "{what}: exit code ({out}{err})"
        );
        assert_eq!(out, String::from_utf8_lossy(&qo.stdout), "{what}: stdout");
        assert_clean(&o);
        assert_identical(&q, "qcow2", &o, "qcow2");
        assert_eq!(
            info_without_names(&q),
            info_without_names(&o),
            "{what}: info"
        );
        let map = |p: &Path| {
            let j: serde_json::Value =
                serde_json::from_str(&qemu_img_ok(&["map", "--output=json", &s(p)])).unwrap();
            j.as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["start"].clone(),
                        e["length"].clone(),
                        e["zero"].clone(),
                        e["data"].clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(map(&q), map(&o), "{what}: map");
    }
    // Refused without options and on raw images, as qemu-img does.
    let raw = d.path("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", &s(&raw), "1M"]);
    same_as_qemu(&["amend", &s(&raw)]);
    same_as_qemu(&["amend", "-f", "raw", "-o", "size=2M", &s(&raw)]);
}

#[test]
fn bench_writes_what_qemu_img_bench_writes() {
    let d = Scratch::new("verbs-bench");
    let q = d.path("q.qcow2");
    let o = d.path("o.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &s(&q), "8M"]);
    std::fs::copy(&q, &o).unwrap();
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "-w",
            "-c",
            "1000",
            "-d",
            "4",
            "-s",
            "4k",
            "-S",
            "12k",
            "--pattern=0xa5",
            "-o",
            "512",
        ],
        vec![
            "-w",
            "-c",
            "10",
            "--flush-interval=4",
            "-d",
            "2",
            "--pattern=7",
        ],
        vec!["-c", "100"],
        vec!["-c", "10", "-s", "0"],
        vec!["-c", "-1"],
        vec!["--pattern=300"],
        vec!["-t", "bogus"],
        vec!["-w", "-d", "8", "--flush-interval=4"],
        vec!["--flush-interval=4"],
        vec!["-c", "3", "-s", "1k", "-o", "9M"],
        vec!["-o", "1M-2k"],
    ];
    for r in runs {
        let mut qa = vec!["bench"];
        qa.extend(r.iter().copied());
        let mut oa = qa.clone();
        let (qs, os) = (s(&q), s(&o));
        qa.push(&qs);
        oa.push(&os);
        let qr = qemu_img(&qa);
        let (code, out, err) = img(&oa);
        assert_eq!(
            code,
            qr.status.code().unwrap_or(-1),
            "bench {r:?}: {out}{err}"
        );
        let qout = String::from_utf8_lossy(&qr.stdout);
        let lines = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with("Run completed in "))
                .map(String::from)
                .collect()
        };
        assert_eq!(lines(&out), lines(&qout), "bench {r:?}: stdout");
        if code == 0 {
            let last = out.lines().last().unwrap_or("");
            let secs = last
                .strip_prefix("Run completed in ")
                .and_then(|t| t.strip_suffix(" seconds."))
                .unwrap_or_else(|| panic!("bench {r:?}: last line {last:?}"));
            let (whole, frac) = secs.split_once('.').expect("seconds with a fraction");
            assert!(whole.parse::<u64>().is_ok() && frac.len() == 3, "{last:?}");
        }
    }
    assert_identical(&q, "qcow2", &o, "qcow2");
    assert_clean(&o);
}

#[test]
fn resize_with_an_inconsistent_bitmap_is_refused_like_qemu() {
    let d = Scratch::new("verbs-resize-bitmap");
    let p = d.path("a.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &s(&p), "64M"]);
    qemu_img_ok(&["bitmap", "--add", &s(&p), "b0"]);
    // A consistent bitmap follows the new size (QEMU then opens and writes past the old end).
    img_ok(&["resize", &s(&p), "128M"]);
    qemu_io(&p, "qcow2", &["write 100M 64k".into()]);
    let info = qemu_img_ok(&["info", "--output=json", &s(&p)]);
    assert!(info.contains("\"b0\""), "{info}");
    assert_clean(&p);
    // Mark it in use, as a crash leaves it: QEMU refuses the resize, so do we.
    let bytes = std::fs::read(&p).unwrap();
    let dir = find_bitmap_directory(&bytes);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::os::unix::fs::FileExt;
    let flags = u32::from_be_bytes(bytes[dir + 12..dir + 16].try_into().unwrap()) | 1;
    f.write_all_at(&flags.to_be_bytes(), dir as u64 + 12)
        .unwrap();
    drop(f);
    let q = d.path("q.qcow2");
    std::fs::copy(&p, &q).unwrap();
    let qr = qemu_img(&["resize", &s(&q), "256M"]);
    assert_eq!(qr.status.code(), Some(1));
    let (code, _, err) = img(&["resize", &s(&p), "256M"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Bitmap 'b0' is inconsistent"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&q).unwrap());
}

/// Offset of the bitmap directory (from the header's bitmaps extension).
fn find_bitmap_directory(b: &[u8]) -> usize {
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize;
    loop {
        let (ty, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            return u64::from_be_bytes(b[at + 24..at + 32].try_into().unwrap()) as usize;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}
