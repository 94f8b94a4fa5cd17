//! The library against the real qemu-img: images we create and write must pass
//! `qemu-img check` and compare identical; images qemu-img makes must read back
//! byte-identical to `qemu-img convert -O raw`.

mod common;

use common::*;
use ferrovirt_disk::{
    create, info, open, BlockBackend, CreateOptions, Format, OpenOptions, Preallocation,
};
use std::path::Path;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn qcow2_opts(size: u64, cluster: Option<u32>) -> CreateOptions {
    CreateOptions {
        format: Format::Qcow2,
        size,
        cluster_size: cluster,
        preallocation: Preallocation::Off,
        backing: None,
    }
}

fn rw(path: &Path) -> Arc<dyn BlockBackend> {
    rw_mode(path, false)
}

fn rw_mode(path: &Path, direct: bool) -> Arc<dyn BlockBackend> {
    open(
        path,
        &OpenOptions {
            format: None,
            read_only: false,
            direct,
        },
    )
    .unwrap_or_else(|e| panic!("open read-write (direct={direct}): {e}"))
}

fn ro(path: &Path) -> Arc<dyn BlockBackend> {
    open(
        path,
        &OpenOptions {
            format: None,
            read_only: true,
            direct: false,
        },
    )
    .expect("open read-only")
}

fn qemu_info_json(path: &Path, chain: bool) -> serde_json::Value {
    let mut args = vec!["info", "--output=json"];
    if chain {
        args.push("--backing-chain");
    }
    let p = s(path);
    args.push(&p);
    serde_json::from_str(&qemu_img_ok(&args)).expect("qemu-img info json")
}

#[test]
fn created_images_pass_qemu_check_and_info() {
    let d = Scratch::new("create");
    for (cluster, size) in [
        (4096u32, 100 * MIB + 512),
        (65536, 16 << 30),
        (2 << 20, 3 * MIB),
    ] {
        let p = d.path(&format!("c{cluster}.qcow2"));
        create(&p, &qcow2_opts(size, Some(cluster))).unwrap();
        assert_clean(&p);
        let j = qemu_info_json(&p, false);
        assert_eq!(j["virtual-size"], size);
        assert_eq!(j["cluster-size"], cluster);
        assert_eq!(j["format"], "qcow2");
        assert_eq!(j["format-specific"]["data"]["compat"], "1.1");
        // Our own info agrees with qemu-img's on every field both report.
        let ours = serde_json::to_value(&info(&p, false).unwrap()[0]).unwrap();
        for k in [
            "virtual-size",
            "cluster-size",
            "format",
            "format-specific",
            "dirty-flag",
        ] {
            assert_eq!(ours[k], j[k], "field {k}");
        }
    }
    let raw = d.path("r.raw");
    create(
        &raw,
        &CreateOptions {
            format: Format::Raw,
            size: 5 * MIB + 3,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    let j = qemu_info_json(&raw, false);
    assert_eq!(
        j["virtual-size"],
        5 * MIB + 512,
        "rounded up to whole sectors"
    );
    assert_eq!(j["format"], "raw");
}

#[test]
fn backing_chain_reported_like_qemu() {
    let d = Scratch::new("chain");
    let base = d.path("base.raw");
    create(
        &base,
        &CreateOptions {
            format: Format::Raw,
            size: 8 * MIB,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    let mid = d.path("mid.qcow2");
    let mut o = qcow2_opts(0, None);
    o.backing = Some(("base.raw".into(), Format::Raw));
    create(&mid, &o).unwrap();
    let top = d.path("top.qcow2");
    o.backing = Some(("mid.qcow2".into(), Format::Qcow2));
    create(&top, &o).unwrap();
    assert_clean(&mid);
    assert_clean(&top);
    let q = qemu_info_json(&top, true);
    let ours = serde_json::to_value(info(&top, true).unwrap()).unwrap();
    let q = q.as_array().unwrap();
    let ours = ours.as_array().unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(ours.len(), 3);
    for (a, b) in q.iter().zip(ours) {
        for k in [
            "virtual-size",
            "format",
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
            "filename",
        ] {
            assert_eq!(a[k], b[k], "field {k}");
        }
    }
    assert_eq!(q[0]["virtual-size"], 8 * MIB);
}

/// A seeded mix of writes, zero-writes and discards, applied to the image and to an
/// in-memory model of the disk.
fn workload(img: &dyn BlockBackend, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for _ in 0..ops {
        let kind = rng.below(10);
        let len = match rng.below(4) {
            0 => 1 + rng.below(4096),
            1 => 4096,
            2 => 65536,
            _ => 1 + rng.below(300_000),
        }
        .min(size);
        let off = if rng.below(2) == 0 {
            rng.below(size - len + 1) / 512 * 512
        } else {
            rng.below(size - len + 1)
        };
        let (o, l) = (off as usize, len as usize);
        match kind {
            0..=5 => {
                // Page-aligned buffers, so that cache=none really uses O_DIRECT.
                let mut storage = vec![0u8; l + 4096];
                let start = storage.as_ptr().align_offset(4096);
                let buf = &mut storage[start..start + l];
                rng.fill(buf);
                img.write_at(buf, off).unwrap();
                model[o..o + l].copy_from_slice(buf);
            }
            6 | 7 => {
                img.write_zeroes(off, len, kind == 7).unwrap();
                model[o..o + l].fill(0);
            }
            8 => {
                img.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            _ => img.flush().unwrap(),
        }
    }
}

fn read_all(img: &dyn BlockBackend) -> Vec<u8> {
    let size = img.size() as usize;
    let mut storage = vec![0u8; size + 4096];
    let start = storage.as_ptr().align_offset(4096);
    let v = &mut storage[start..start + size];
    for (i, c) in v.chunks_mut(MIB as usize).enumerate() {
        img.read_at(c, i as u64 * MIB).unwrap();
    }
    v.to_vec()
}

fn random_workload_case(name: &str, backing: Option<Format>, cluster: Option<u32>, seed: u64) {
    random_workload_mode(name, backing, cluster, seed, false)
}

fn random_workload_mode(
    name: &str,
    backing: Option<Format>,
    cluster: Option<u32>,
    seed: u64,
    direct: bool,
) {
    let d = Scratch::new(name);
    let size = 24 * MIB;
    let top = d.path("top.qcow2");
    let mut model = vec![0u8; size as usize];
    let mut o = qcow2_opts(size, cluster);
    if let Some(bf) = backing {
        // A backing file with a known pattern, written by qemu-io.
        let base = d.path("base.img");
        qemu_img_ok(&["create", "-f", bf.as_str(), &s(&base), &size.to_string()]);
        let cmds: Vec<String> = (0..12)
            .map(|i| {
                format!(
                    "write -P {} {} {}",
                    0x10 + i,
                    i * 2 * MIB + 4096 * i,
                    MIB + 777
                )
            })
            .collect();
        qemu_io(&base, bf.as_str(), &cmds);
        model = read_all(&*ro(&base));
        o.backing = Some(("base.img".into(), bf));
    }
    create(&top, &o).unwrap();
    // A raw copy of the starting contents gets the same workload through the raw driver.
    let raw_copy = d.path("copy.raw");
    std::fs::write(&raw_copy, &model).unwrap();
    {
        let raw = rw_mode(&raw_copy, direct);
        let mut scratch_model = model.clone();
        workload(&*raw, &mut scratch_model, seed, 400);
        workload(&*raw, &mut scratch_model, seed ^ 0x5555, 200);
        raw.flush().unwrap();
    }
    {
        let img = rw_mode(&top, direct);
        workload(&*img, &mut model, seed, 400);
        img.flush().unwrap();
        assert!(read_all(&*img) == model, "our reads differ from the model");
    }
    assert_clean(&top);
    // Reopen: everything persisted; a second round on the reopened image.
    {
        let img = rw(&top);
        assert!(
            read_all(&*img) == model,
            "reads after reopen differ from the model"
        );
        workload(&*img, &mut model, seed ^ 0x5555, 200);
        img.flush().unwrap();
    }
    assert_clean(&top);
    let reference = d.path("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_identical(&top, "qcow2", &reference, "raw");
    assert_identical(&top, "qcow2", &raw_copy, "raw");
}

#[test]
fn random_workload_no_backing() {
    random_workload_case("wl-plain", None, None, 1);
}

#[test]
fn random_workload_small_clusters() {
    random_workload_case("wl-4k", None, Some(4096), 2);
}

#[test]
fn random_workload_qcow2_backing() {
    random_workload_case("wl-qb", Some(Format::Qcow2), None, 3);
}

/// cache=none: aligned requests go through O_DIRECT, the others through the page cache.
#[test]
fn random_workload_direct_io() {
    random_workload_mode("wl-direct", Some(Format::Qcow2), None, 5, true);
}

#[test]
fn random_workload_raw_backing() {
    random_workload_case("wl-rb", Some(Format::Raw), Some(512), 4);
}

/// Every byte of `img` (ours) equals `qemu-img convert -O raw` of the same image.
fn assert_reads_like_qemu(d: &Scratch, img: &Path) {
    let reference = d.path("reference.raw");
    let _ = std::fs::remove_file(&reference);
    qemu_img_ok(&["convert", "-O", "raw", &s(img), &s(&reference)]);
    let want = std::fs::read(&reference).unwrap();
    let got = read_all(&*ro(img));
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "{} reads differently from qemu-img convert",
        img.display()
    );
}

/// Our `check` agrees with qemu-img's on images qemu-img considers clean.
fn assert_our_check_is_clean(p: &Path) {
    let r = ferrovirt_disk::ops::check(p, None).unwrap();
    assert_eq!(r.exit_code(), 0, "{}: {:?}", p.display(), r.messages);
}

fn pattern_cmds() -> Vec<String> {
    vec![
        "write -P 0x11 0 4096".into(),
        "write -P 0x22 70000 5000".into(),
        "write -P 0x33 1M 3M".into(),
        "write -z 2M 64k".into(),
        "write -P 0x44 7340032 1".into(),
        "discard 3M 128k".into(),
    ]
}

#[test]
fn qemu_made_images_read_back_identically() {
    let d = Scratch::new("qemu-made");
    let cases: &[(&str, &[&str])] = &[
        ("c4k", &["-o", "cluster_size=4096"]),
        ("c64k", &[]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("meta", &["-o", "preallocation=metadata"]),
        ("full", &["-o", "preallocation=full"]),
        ("v2", &["-o", "compat=0.10"]),
        ("rc8", &["-o", "refcount_bits=8"]),
        ("rc64", &["-o", "refcount_bits=64"]),
        ("lazy", &["-o", "lazy_refcounts=on"]),
    ];
    for (name, extra) in cases {
        let p = d.path(&format!("{name}.qcow2"));
        let ps = s(&p);
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend_from_slice(extra);
        args.push(&ps);
        args.push("8M");
        qemu_img_ok(&args);
        qemu_io(&p, "qcow2", &pattern_cmds());
        assert_reads_like_qemu(&d, &p);
        assert_our_check_is_clean(&p);
        // Writing through us keeps it valid for qemu-img.
        let img = rw(&p);
        img.write_at(&[0x5a; 10000], 65000).unwrap();
        img.flush().unwrap();
        drop(img);
        assert_clean(&p);
        assert_reads_like_qemu(&d, &p);
    }
}

#[test]
fn compressed_and_backed_images_read_back_identically() {
    let d = Scratch::new("qemu-comp");
    let src = d.path("src.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&src), "8M"]);
    qemu_io(&src, "qcow2", &pattern_cmds());
    for ctype in ["zlib", "zstd"] {
        let c = d.path(&format!("{ctype}.qcow2"));
        qemu_img_ok(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype}"),
            &s(&src),
            &s(&c),
        ]);
        assert_reads_like_qemu(&d, &c);
        assert_our_check_is_clean(&c);
        // Overwriting part of a compressed cluster decompresses it (copy-on-write).
        let img = rw(&c);
        img.write_at(&[0x77; 100], 1_048_600).unwrap();
        img.flush().unwrap();
        drop(img);
        assert_clean(&c);
        assert_reads_like_qemu(&d, &c);
    }
    let ov = d.path("ov.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "src.qcow2",
        "-F",
        "qcow2",
        &s(&ov),
        "12M",
    ]);
    qemu_io(
        &ov,
        "qcow2",
        &[
            "write -P 0x99 1500000 70000".into(),
            "write -z 0 4096".into(),
            "write -P 0x98 9M 1M".into(),
        ],
    );
    assert_reads_like_qemu(&d, &ov);
}

#[test]
fn preallocated_images_are_valid() {
    let d = Scratch::new("prealloc");
    for (mode, cluster) in [
        (Preallocation::Metadata, 65536u32),
        (Preallocation::Metadata, 4096),
        (Preallocation::Falloc, 65536),
        (Preallocation::Full, 65536),
    ] {
        let p = d.path(&format!("{mode:?}-{cluster}.qcow2"));
        let mut o = qcow2_opts(20 * MIB, Some(cluster));
        o.preallocation = mode;
        create(&p, &o).unwrap();
        assert_clean(&p);
        // Every cluster is allocated up front, and reads as zeros.
        let m: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(&["map", "--output=json", &s(&p)])).unwrap();
        let unallocated: u64 = m
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["present"] != true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(unallocated, 0, "{mode:?}: {m}");
        let img = rw(&p);
        assert!(read_all(&*img).iter().all(|&b| b == 0));
        img.write_at(&[9u8; 3000], 5 * MIB + 100).unwrap();
        img.flush().unwrap();
        drop(img);
        assert_clean(&p);
        qemu_io(
            &p,
            "qcow2",
            &["read -P 9 5242980 3000".into(), "read -P 0 0 5M".into()],
        );
        if mode == Preallocation::Full {
            let j = qemu_info_json(&p, false);
            assert!(
                j["actual-size"].as_u64().unwrap() >= 20 * MIB,
                "full preallocation allocates host blocks: {j}"
            );
        }
    }
}

/// A version 2 image made by qemu-img, with a backing file and a size that is not a
/// multiple of the cluster size: v2 has no zero flag, so zero-writes write zeros.
#[test]
fn random_workload_on_qemu_made_v2_image() {
    let d = Scratch::new("wl-v2");
    let size = 6 * MIB + 1536;
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        &s(&base),
        &size.to_string(),
    ]);
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x61 0 3M".into(),
            format!("write -P 0x62 {} 1536", size - 1536),
        ],
    );
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&top),
    ]);
    let mut model = read_all(&*ro(&top));
    {
        let img = rw(&top);
        workload(&*img, &mut model, 11, 300);
        img.flush().unwrap();
        assert!(read_all(&*img) == model, "our reads differ from the model");
    }
    assert_clean(&top);
    let j = qemu_info_json(&top, false);
    assert_eq!(j["format-specific"]["data"]["compat"], "0.10");
    let reference = d.path("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_identical(&top, "qcow2", &reference, "raw");
}
