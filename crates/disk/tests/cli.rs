//! `ferrovirt img` verbs end to end, checked with qemu-img.

mod common;

use common::*;

fn qemu_map_data(path: &str) -> Vec<(u64, u64)> {
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["map", "--output=json", path])).unwrap();
    runs(&j)
}

/// Byte ranges that hold data, merged.
fn runs(j: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in j.as_array().unwrap() {
        if e["data"] != true {
            continue;
        }
        let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match out.last_mut() {
            Some(l) if l.0 + l.1 == st => l.1 += len,
            _ => out.push((st, len)),
        }
    }
    out
}

#[test]
fn create_info_check_via_cli() {
    let d = Scratch::new("cli-create");
    let base = s(&d.path("base.qcow2"));
    let ov = s(&d.path("ov.qcow2"));
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4K",
        &base,
        "16G",
    ]);
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &ov,
    ]);
    let j: serde_json::Value =
        serde_json::from_str(&img_ok(&["info", "--output=json", &ov])).unwrap();
    assert_eq!(j["virtual-size"], 16u64 << 30);
    assert_eq!(j["backing-filename"], "base.qcow2");
    let chain: serde_json::Value =
        serde_json::from_str(&img_ok(&["info", "--output=json", "--backing-chain", &ov])).unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 2);
    assert_eq!(chain[1]["cluster-size"], 4096);
    let human = img_ok(&["info", &ov]);
    assert!(
        human.contains("virtual size: 16 GiB (17179869184 bytes)"),
        "{human}"
    );
    let (code, out, _) = img(&["check", &ov]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No errors were found on the image."));
    assert_clean(&d.path("ov.qcow2"));
    // Bad input: one clear line, exit 1; usage errors exit 2.
    let (code, _, err) = img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=3000",
        &s(&d.path("x.qcow2")),
        "1G",
    ]);
    let one_line = |err: &str| assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert_eq!(code, 1);
    assert!(err.contains("cluster size 3000 is invalid"), "{err}");
    one_line(&err);
    let (code, _, err) = img(&["create", "-f", "qcow2", &s(&d.path("y.qcow2")), "12Q"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid size '12Q'"), "{err}");
    one_line(&err);
    let (code, _, _) = img(&["create", "--bogus"]);
    assert_eq!(code, 2);
    let (code, _, err) = img(&["info", &s(&d.path("missing.qcow2"))]);
    assert_eq!(code, 1);
    assert!(err.contains("No such file"), "{err}");
    one_line(&err);
}

#[test]
fn convert_flattens_and_stays_sparse() {
    let d = Scratch::new("cli-convert");
    let base = d.path("base.qcow2");
    let ov = d.path("ov.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&base), "64M"]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -P 2 40M 64k".into()],
    );
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
    qemu_io(
        &ov,
        "qcow2",
        &["write -P 3 512k 1M".into(), "write -z 40M 4k".into()],
    );
    let raw = d.path("flat.raw");
    img_ok(&["convert", "-O", "raw", &s(&ov), &s(&raw)]);
    assert_identical(&ov, "qcow2", &raw, "raw");
    let q = d.path("flat.qcow2");
    img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536",
        &s(&raw),
        &s(&q),
    ]);
    assert_identical(&ov, "qcow2", &q, "qcow2");
    assert_clean(&q);
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&q)])).unwrap();
    assert!(
        j.get("backing-filename").is_none(),
        "convert must flatten the chain"
    );
    // Sparse: only the ~1.6 MiB of data is allocated, not 64 MiB.
    assert!(j["actual-size"].as_u64().unwrap() < 4 << 20, "{j}");
    let rawj: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&raw)])).unwrap();
    assert!(rawj["actual-size"].as_u64().unwrap() < 4 << 20, "{rawj}");
}

#[test]
fn commit_rebase_resize() {
    let d = Scratch::new("cli-commit");
    let base = d.path("base.qcow2");
    let ov = d.path("ov.qcow2");
    img_ok(&["create", "-f", "qcow2", &s(&base), "32M"]);
    qemu_io(&base, "qcow2", &["write -P 1 0 4M".into()]);
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&ov),
    ]);
    qemu_io(
        &ov,
        "qcow2",
        &["write -P 7 1M 100k".into(), "write -z 3M 64k".into()],
    );
    let view = d.path("view.raw");
    qemu_img_ok(&["convert", "-O", "raw", &s(&ov), &s(&view)]);

    // commit: the base now holds the overlay's view; the overlay is empty.
    let out = img_ok(&["commit", &s(&ov)]);
    assert!(out.contains("Image committed."));
    assert_identical(&base, "qcow2", &view, "raw");
    assert_identical(&ov, "qcow2", &view, "raw");
    assert_clean(&base);
    assert_clean(&ov);
    let m: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["map", "--output=json", &s(&ov)])).unwrap();
    let own = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .count();
    assert_eq!(own, 0, "the overlay still maps data after commit: {m}");

    // rebase (safe) onto an empty base keeps the guest view.
    let other = d.path("other.qcow2");
    img_ok(&["create", "-f", "qcow2", &s(&other), "32M"]);
    img_ok(&["rebase", "-b", "other.qcow2", "-F", "qcow2", &s(&ov)]);
    assert_identical(&ov, "qcow2", &view, "raw");
    assert_clean(&ov);
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&ov)])).unwrap();
    assert_eq!(j["backing-filename"], "other.qcow2");
    // rebase -u only rewrites the header.
    img_ok(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", &s(&ov)]);
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&ov)])).unwrap();
    assert_eq!(j["backing-filename"], "base.qcow2");
    assert_eq!(j["backing-filename-format"], "qcow2");

    // resize: grow by +1G, then to an absolute size; data stays; shrinking is refused.
    img_ok(&["resize", &s(&base), "+1G"]);
    img_ok(&["resize", &s(&base), "40G"]);
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&base)])).unwrap();
    assert_eq!(j["virtual-size"], 40u64 << 30);
    assert_clean(&base);
    qemu_io(
        &base,
        "qcow2",
        &[
            "read -P 7 1M 100k".into(),
            "write -P 9 39G 64k".into(),
            "read -P 9 39G 64k".into(),
        ],
    );
    assert_clean(&base);
    let (code, _, err) = img(&["resize", &s(&base), "1G"]);
    assert_eq!(code, 1);
    assert!(err.contains("shrinking"), "{err}");
    // With 4 KiB clusters one L1 cluster maps 1 GiB: growing to 4 GiB moves the L1 table.
    let small = d.path("small.qcow2");
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &s(&small),
        "512M",
    ]);
    qemu_io(&small, "qcow2", &["write -P 5 100M 1M".into()]);
    img_ok(&["resize", &s(&small), "4G"]);
    assert_clean(&small);
    qemu_io(
        &small,
        "qcow2",
        &[
            "read -P 5 100M 1M".into(),
            "write -P 6 4095M 1M".into(),
            "read -P 6 4095M 1M".into(),
        ],
    );
    assert_clean(&small);
    let r = d.path("r.raw");
    img_ok(&["create", "-f", "raw", &s(&r), "1M"]);
    img_ok(&["resize", &s(&r), "+1M"]);
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 2 << 20);
}

#[test]
fn map_agrees_with_qemu() {
    let d = Scratch::new("cli-map");
    let base = d.path("base.qcow2");
    let ov = d.path("ov.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&base), "16M"]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -P 2 8M 64k".into()],
    );
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
    qemu_io(
        &ov,
        "qcow2",
        &["write -P 3 512k 1M".into(), "write -z 8M 64k".into()],
    );
    let ours: serde_json::Value =
        serde_json::from_str(&img_ok(&["map", "--output=json", &s(&ov)])).unwrap();
    assert_eq!(runs(&ours), qemu_map_data(&s(&ov)));
    let human = img_ok(&["map", &s(&ov)]);
    assert!(human.starts_with("Offset"), "{human}");
}

#[test]
fn check_reports_and_repairs_leaks() {
    let d = Scratch::new("cli-check");
    let p = d.path("leak.qcow2");
    img_ok(&["create", "-f", "qcow2", &s(&p), "16M"]);
    // Leak: refcount 1 for cluster 5 (offset 0x50000), which nothing references.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.resize(6 * 65536, 0);
    bytes[2 * 65536 + 10] = 0;
    bytes[2 * 65536 + 11] = 1;
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(
        qemu_img(&["check", &s(&p)]).status.code(),
        Some(3),
        "qemu-img sees the leak"
    );
    let (code, out, _) = img(&["check", &s(&p)]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("1 leaked clusters were found"), "{out}");
    let (code, out, _) = img(&["check", "-r", "leaks", &s(&p)]);
    assert_eq!(code, 0, "{out}");
    assert_clean(&p);
    // Corruption: a refcount of 0 for the L1 table cluster.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[2 * 65536 + 6] = 0;
    bytes[2 * 65536 + 7] = 0;
    std::fs::write(&p, &bytes).unwrap();
    let (code, out, _) = img(&["check", &s(&p)]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(qemu_img(&["check", &s(&p)]).status.code(), Some(2));
    let (code, out, _) = img(&["check", "-r", "all", &s(&p)]);
    assert_eq!(code, 0, "{out}");
    assert_clean(&p);
    let raw = d.path("r.raw");
    img_ok(&["create", "-f", "raw", &s(&raw), "1M"]);
    let (code, _, err) = img(&["check", &s(&raw)]);
    assert_eq!(
        code, 63,
        "qemu-img's code for a format without checks: {err}"
    );
    let (code, out, _) = img(&["check", "--output=json", &s(&p)]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["check-errors"], 0);
    assert_eq!(j["format"], "qcow2");
}

#[test]
fn safe_rebase_keeps_the_view_when_the_new_backing_has_data() {
    let d = Scratch::new("cli-rebase");
    let a = d.path("a.qcow2");
    let b = d.path("b.qcow2");
    let ov = d.path("ov.qcow2");
    img_ok(&["create", "-f", "qcow2", &s(&a), "8M"]);
    img_ok(&["create", "-f", "qcow2", &s(&b), "8M"]);
    qemu_io(&a, "qcow2", &["write -P 1 0 1M".into()]);
    qemu_io(
        &b,
        "qcow2",
        &["write -P 2 512k 2M".into(), "write -P 3 7M 4k".into()],
    );
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        &s(&ov),
    ]);
    qemu_io(&ov, "qcow2", &["write -P 4 6M 64k".into()]);
    let view = d.path("view.raw");
    qemu_img_ok(&["convert", "-O", "raw", &s(&ov), &s(&view)]);
    img_ok(&["rebase", "-b", "b.qcow2", "-F", "qcow2", &s(&ov)]);
    assert_identical(&ov, "qcow2", &view, "raw");
    assert_clean(&ov);
    // Removing the backing file altogether keeps the view too.
    img_ok(&["rebase", "-b", "", &s(&ov)]);
    assert_identical(&ov, "qcow2", &view, "raw");
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(&ov)])).unwrap();
    assert!(j.get("backing-filename").is_none(), "{j}");
}

/// A petabyte of virtual size with almost nothing allocated: map, convert, commit and
/// check take time in proportion to what is allocated, not to the virtual size.
#[test]
fn huge_sparse_images_are_handled_quickly() {
    let d = Scratch::new("cli-huge");
    let base = d.path("base.qcow2");
    let ov = d.path("ov.qcow2");
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        &s(&base),
        "1P",
    ]);
    img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&ov),
    ]);
    qemu_io(&ov, "qcow2", &["write -P 7 1T 64k".into()]);
    let m: serde_json::Value =
        serde_json::from_str(&img_ok(&["map", "--output=json", &s(&ov)])).unwrap();
    assert_eq!(
        m.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .count(),
        1,
        "{m}"
    );
    let out = d.path("flat.qcow2");
    img_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=2M",
        &s(&ov),
        &s(&out),
    ]);
    qemu_io(
        &out,
        "qcow2",
        &["read -P 7 1T 64k".into(), "read -P 0 0 1M".into()],
    );
    img_ok(&["commit", &s(&ov)]);
    qemu_io(&base, "qcow2", &["read -P 7 1T 64k".into()]);
    img_ok(&["check", &s(&base)]);
    // (How fast this is for a 2 TiB image is bench/disk's business, not this test's.)
}

#[test]
fn sizes_beyond_a_file_offset_are_refused_like_qemu_img() {
    let d = Scratch::new("cli-bigsize");
    for (fmt, size) in [
        ("raw", "18446744073709551615"),
        ("raw", "8E"),
        ("qcow2", "8E"),
        ("raw", "9223372036854775807"),
        ("qcow2", "16E"),
    ] {
        let f = d.path(&format!("big-{fmt}-{size}"));
        let (code, out, err) = img(&["create", "-f", fmt, &s(&f), size]);
        assert_eq!(code, 1, "create -f {fmt} {size}: {out}{err}");
        assert!(
            err.contains("invalid image size") || err.contains("invalid size"),
            "create -f {fmt} {size}: {err}"
        );
        assert!(!err.contains("conversion"), "{err}");
        assert!(!f.exists(), "create -f {fmt} {size} left a file");
        // qemu-img refuses the same sizes.
        let q = qemu_img(&["create", "-f", fmt, &s(&d.path("q")), size]);
        assert!(!q.status.success(), "qemu-img accepted {size}");
    }
    // Large sizes that fit work, and a size the file system cannot hold leaves no file.
    let f = d.path("big.raw");
    let out = img_ok(&["create", "-f", "raw", &s(&f), "4T"]);
    assert!(out.contains("size=4398046511104"), "{out}");
    let f = d.path("max.raw");
    if img(&["create", "-f", "raw", &s(&f), "9223372036854775296"]).0 != 0 {
        assert!(!f.exists(), "a failed create left its file");
    }
    // Resizing past the limit is refused too and leaves the image as it was.
    let r = d.path("r.raw");
    img_ok(&["create", "-f", "raw", &s(&r), "1M"]);
    let (code, _, err) = img(&["resize", &s(&r), "+8E"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 1 << 20);
}

#[test]
fn compare_says_what_qemu_img_compare_says() {
    let d = Scratch::new("cli-compare");
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&base), "8M"]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 2M".into(), "write -c -P 2 4M 64k".into()],
    );
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&top),
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 3 1M 100k".into(), "write -z 4M 4k".into()],
    );
    let flat = d.path("flat.raw");
    qemu_img_ok(&["convert", "-O", "raw", &s(&top), &s(&flat)]);
    let changed = d.path("changed.raw");
    let mut bytes = std::fs::read(&flat).unwrap();
    bytes[1_234_567] ^= 0xff;
    std::fs::write(&changed, &bytes).unwrap();
    let bigger = d.path("bigger.raw");
    let mut b2 = std::fs::read(&flat).unwrap();
    b2.resize(10 << 20, 0);
    std::fs::write(&bigger, &b2).unwrap();
    let bigger_data = d.path("bigger-data.raw");
    b2[9 << 20] = 1;
    std::fs::write(&bigger_data, &b2).unwrap();
    let missing = d.path("missing.qcow2");
    let cases: Vec<Vec<String>> = vec![
        vec![s(&top), s(&flat)],
        vec![s(&flat), s(&top)],
        vec![s(&top), s(&changed)],
        vec![s(&top), s(&bigger)],
        vec!["-s".into(), s(&top), s(&bigger)],
        vec![s(&top), s(&bigger_data)],
        vec![s(&base), s(&top)],
        vec!["-q".into(), s(&top), s(&changed)],
        vec![s(&top), s(&missing)],
    ];
    for c in cases {
        let mut args = vec!["compare"];
        args.extend(c.iter().map(|x| x.as_str()));
        let q = qemu_img(&args);
        let (code, out, _) = img(&args);
        assert_eq!(code, q.status.code().unwrap(), "exit code of compare {c:?}");
        assert_eq!(
            out,
            String::from_utf8_lossy(&q.stdout),
            "output of compare {c:?}"
        );
    }
}

#[test]
fn dd_copies_like_qemu_img_dd() {
    let d = Scratch::new("cli-dd");
    let src = d.path("src.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&src), "5000000"]);
    qemu_io(
        &src,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -P 2 3M 100k".into()],
    );
    let cases: &[&[&str]] = &[
        &[],
        &["bs=4k", "count=100"],
        &["bs=1M", "skip=2"],
        &["bs=512", "skip=3", "count=20000"],
        &["bs=3000", "count=1000"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        for fmt in ["raw", "qcow2"] {
            let ours = d.path(&format!("o{i}.{fmt}"));
            let theirs = d.path(&format!("t{i}.{fmt}"));
            let run = |tool_ours: bool, out: &std::path::Path| {
                let iff = format!("if={}", s(&src));
                let off = format!("of={}", s(out));
                let mut a = vec!["dd", "-f", "qcow2", "-O", fmt];
                a.extend_from_slice(extra);
                a.extend([iff.as_str(), off.as_str()]);
                if tool_ours {
                    img_ok(&a);
                } else {
                    qemu_img_ok(&a);
                }
            };
            run(true, &ours);
            run(false, &theirs);
            let size = |p: &std::path::Path| {
                let j: serde_json::Value =
                    serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &s(p)])).unwrap();
                j["virtual-size"].as_u64().unwrap()
            };
            assert_eq!(size(&ours), size(&theirs), "dd {extra:?} -O {fmt}");
            assert_identical(&ours, fmt, &theirs, fmt);
            if fmt == "qcow2" {
                assert_clean(&ours);
            }
        }
    }
    let (code, _, err) = img(&["dd", "bs=0", "if=a", "of=b"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = img(&["dd", &format!("if={}", s(&src))]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = img(&["dd", "bogus=1", "if=a", "of=b"]);
    assert_eq!(code, 1, "{err}");
}
