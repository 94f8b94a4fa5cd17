//! Metadata cache eviction: with the cache limited to its minimum (16 tables), a
//! workload over many L2 tables and refcount blocks still reads back exactly and
//! leaves an image `qemu-img check` finds clean. (One test per binary: the limit is
//! read once per process.)

mod common;

use common::*;
use ferrovirt_disk::{create, open, CreateOptions, Format, OpenOptions, Preallocation};

#[test]
fn eviction_keeps_images_consistent() {
    std::env::set_var("FERROVIRT_DISK_CACHE_BYTES", "1");
    let d = Scratch::new("cache");
    let p = d.path("small-clusters.qcow2");
    let size: u64 = 16 << 20;
    // 512-byte clusters: an L2 table maps 32 KiB, a refcount block 256 clusters.
    create(
        &p,
        &CreateOptions {
            format: Format::Qcow2,
            size,
            cluster_size: Some(512),
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(31);
    {
        let img = open(
            &p,
            &OpenOptions {
                format: None,
                read_only: false,
                direct: false,
            },
        )
        .unwrap();
        for i in 0..3000 {
            let len = 1 + rng.below(3000);
            let off = rng.below(size - len);
            let (o, l) = (off as usize, len as usize);
            if i % 7 == 0 {
                img.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            } else {
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                img.write_at(&buf, off).unwrap();
                model[o..o + l].copy_from_slice(&buf);
            }
            if i % 500 == 0 {
                img.flush().unwrap();
            }
        }
        img.flush().unwrap();
        let mut got = vec![0u8; size as usize];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == model, "reads differ from the model under eviction");
    }
    assert_clean(&p);
    let reference = d.path("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_identical(&p, "qcow2", &reference, "raw");
}
