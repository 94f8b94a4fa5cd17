//! Several threads issuing requests at once, as ferrovmm's virtio-blk workers do.

mod common;

use common::*;
use ferrovirt_disk::{
    create, open, BlockBackend, CreateOptions, Format, OpenOptions, Preallocation,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const THREADS: u64 = 4;

fn new_image(d: &Scratch, size: u64, backing: bool) -> std::path::PathBuf {
    let p = d.path("img.qcow2");
    let mut o = CreateOptions {
        format: Format::Qcow2,
        size,
        cluster_size: Some(65536),
        preallocation: Preallocation::Off,
        backing: None,
    };
    if backing {
        let b = d.path("base.qcow2");
        qemu_img_ok(&["create", "-f", "qcow2", &s(&b), &size.to_string()]);
        qemu_io(&b, "qcow2", &[format!("write -P 0x42 0 {size}")]);
        o.backing = Some(("base.qcow2".into(), Format::Qcow2));
    }
    create(&p, &o).unwrap();
    p
}

fn rw(p: &Path) -> Arc<dyn BlockBackend> {
    open(
        p,
        &OpenOptions {
            format: None,
            read_only: false,
            direct: false,
        },
    )
    .unwrap()
}

fn read_all(img: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// Each thread owns a region and mixes writes, zero-writes, discards and flushes in
/// it; allocation, freeing and flushing run concurrently across threads.
fn different_regions(backing: bool) {
    let d = Scratch::new(if backing { "conc-diff-b" } else { "conc-diff" });
    let size = 16 * MIB;
    let p = new_image(&d, size, backing);
    let img = rw(&p);
    let initial = read_all(&*img);
    let region = size / THREADS;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            let mut model = initial[(t * region) as usize..((t + 1) * region) as usize].to_vec();
            std::thread::spawn(move || {
                let mut rng = Rng(100 + t);
                for _ in 0..300 {
                    let len = 1 + rng.below(150_000);
                    let off = rng.below(region - len);
                    let (o, l) = (off as usize, len as usize);
                    match rng.below(10) {
                        0 => {
                            img.discard(t * region + off, len).unwrap();
                            model[o..o + l].fill(0);
                        }
                        1 => {
                            img.write_zeroes(t * region + off, len, false).unwrap();
                            model[o..o + l].fill(0);
                        }
                        2 => img.flush().unwrap(),
                        _ => {
                            let mut buf = vec![0u8; l];
                            rng.fill(&mut buf);
                            img.write_at(&buf, t * region + off).unwrap();
                            model[o..o + l].copy_from_slice(&buf);
                        }
                    }
                    if rng.below(4) == 0 {
                        let mut back = vec![0u8; l];
                        img.read_at(&mut back, t * region + off).unwrap();
                        assert!(back == model[o..o + l], "thread {t} read back other data");
                    }
                }
                model
            })
        })
        .collect();
    let mut model = Vec::new();
    for h in handles {
        model.extend(h.join().expect("worker panicked"));
    }
    img.flush().unwrap();
    assert!(
        read_all(&*img) == model,
        "final contents differ from the threads' models"
    );
    drop(img);
    assert_clean(&p);
    let reference = d.path("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_identical(&p, "qcow2", &reference, "raw");
}

#[test]
fn concurrent_requests_to_different_clusters() {
    different_regions(false);
}

#[test]
fn concurrent_requests_to_different_clusters_with_backing() {
    different_regions(true);
}

/// All threads write disjoint slices of the same (initially unallocated) clusters:
/// concurrent copy-on-write of one cluster must not lose any thread's bytes.
#[test]
fn concurrent_writes_into_the_same_clusters() {
    let d = Scratch::new("conc-same");
    let size = 4 * MIB;
    let p = new_image(&d, size, true);
    let img = rw(&p);
    let slice = 65536 / THREADS;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for round in 0..3u8 {
                    for c in 0..size / 65536 {
                        let buf = vec![t as u8 * 16 + round + 1; slice as usize];
                        img.write_at(&buf, c * 65536 + t * slice).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer panicked");
    }
    let got = read_all(&*img);
    for (i, chunk) in got.chunks(slice as usize).enumerate() {
        let t = (i as u64 % THREADS) as u8;
        assert!(
            chunk.iter().all(|&b| b == t * 16 + 3),
            "slice {i} lost a write"
        );
    }
    img.flush().unwrap();
    drop(img);
    assert_clean(&p);
}

/// Readers racing a writer over the same clusters only ever see bytes that were
/// really written there (the backing pattern or one of the writer's versions).
#[test]
fn concurrent_reads_and_writes_of_the_same_clusters() {
    let d = Scratch::new("conc-rw");
    let size = 2 * MIB;
    let p = new_image(&d, size, true);
    let img = rw(&p);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let img = img.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(7 + r);
                let mut buf = vec![0u8; 100_000];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) || n < 50 {
                    let off = rng.below(size - buf.len() as u64);
                    img.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf.iter().all(|&b| b == 0x42 || (0x80..0x90).contains(&b)),
                        "reader saw foreign bytes"
                    );
                    n += 1;
                }
            })
        })
        .collect();
    let mut rng = Rng(99);
    for v in 0..16u8 {
        for _ in 0..20 {
            let len = 512 * (1 + rng.below(300));
            let off = rng.below(size - len) / 512 * 512;
            img.write_at(&vec![0x80 + v; len as usize], off).unwrap();
        }
        if v % 4 == 0 {
            img.flush().unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader panicked");
    }
    img.flush().unwrap();
    drop(img);
    assert_clean(&p);
}
