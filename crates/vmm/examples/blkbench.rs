//! Device-level virtio-blk benchmark: drives ferrovmm's virtio-blk through its
//! PCI transport from the host side — requests written into guest memory,
//! notifications through the queue eventfd (what KVM's ioeventfd does),
//! completions read from the used ring — and prints throughput and latency.
//!
//! Usage: blkbench FILE randread4k|seqread128k|seqwrite128k QUEUE_DEPTH SECONDS [direct]

#[allow(dead_code)]
#[path = "../tests/common/vdriver.rs"]
mod vdriver;

use std::time::{Duration, Instant};

use ferrovmm::virtio::block::{Block, BlockOptions};
use vdriver::{Driver, DATA_BASE};
use vm_memory::{Bytes, GuestAddress};

const SLOT: u64 = 0x4_0000; // per in-flight request: header, status, 128 KiB buffer

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!(
            "usage: blkbench FILE randread4k|seqread128k|seqwrite128k QUEUE_DEPTH SECONDS [direct]"
        );
        std::process::exit(2);
    }
    let (path, mode) = (&args[1], args[2].as_str());
    let depth: u16 = args[3].parse().expect("queue depth");
    let seconds: f64 = args[4].parse().expect("seconds");
    let direct = args.get(5).is_some_and(|a| a == "direct");
    let (bs, write, random) = match mode {
        "randread4k" => (4096u32, false, true),
        "seqread128k" => (131_072, false, false),
        "seqwrite128k" => (131_072, true, false),
        _ => panic!("unknown mode {mode}"),
    };
    let opts = ferrovirt_disk::OpenOptions {
        format: Some(ferrovirt_disk::Format::Raw),
        read_only: false,
        direct,
    };
    let backend = ferrovirt_disk::open(std::path::Path::new(path), &opts).expect("open image");
    let sectors = backend.size() / 512;
    let mut d = Driver::new(
        Box::new(Block::new(
            backend,
            BlockOptions {
                read_only: false,
                serial: String::new(),
            },
        )),
        256,
    );
    d.init(None, 256);

    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq: u64 = 0;
    let span = sectors - u64::from(bs / 512);
    let mut pick = |rng: &mut u64| -> u64 {
        if random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % (span / 8)) * 8
        } else {
            let s = next_seq;
            next_seq = (next_seq + u64::from(bs / 512)) % span;
            s
        }
    };
    // One slot per in-flight request; slot i's chain uses descriptors 3i..3i+2.
    let mut started = vec![Instant::now(); usize::from(depth)];
    let submit = |d: &mut Driver, slot: u16, sector: u64| {
        let base = DATA_BASE + u64::from(slot) * SLOT;
        d.mem
            .write_obj(u32::from(write), GuestAddress(base))
            .unwrap();
        d.mem.write_obj(0u32, GuestAddress(base + 4)).unwrap();
        d.mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
        let first = slot * 3;
        d.set_desc(0, first, base, 16, vdriver::VIRTQ_DESC_F_NEXT, first + 1);
        let data_flags = vdriver::VIRTQ_DESC_F_NEXT
            | if write {
                0
            } else {
                vdriver::VIRTQ_DESC_F_WRITE
            };
        d.set_desc(0, first + 1, base + 0x1000, bs, data_flags, first + 2);
        d.set_desc(
            0,
            first + 2,
            base + 0x100,
            1,
            vdriver::VIRTQ_DESC_F_WRITE,
            0,
        );
        d.publish(0, first);
    };
    for slot in 0..depth {
        let s = pick(&mut rng);
        submit(&mut d, slot, s);
        started[usize::from(slot)] = Instant::now();
    }
    d.kick(0);
    let begin = Instant::now();
    let mut latencies = Vec::new();
    let mut done = 0u64;
    while begin.elapsed() < Duration::from_secs_f64(seconds) {
        for (id, _len) in d.wait_used(0, 1, Duration::from_secs(30)) {
            let slot = (id / 3) as u16;
            latencies.push(started[usize::from(slot)].elapsed());
            let st: u8 = d
                .mem
                .read_obj(GuestAddress(DATA_BASE + u64::from(slot) * SLOT + 0x100))
                .unwrap();
            assert_eq!(st, 0, "request failed");
            done += 1;
            let s = pick(&mut rng);
            submit(&mut d, slot, s);
            started[usize::from(slot)] = Instant::now();
            d.kick(0);
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let mbps = done as f64 * f64::from(bs) / elapsed / 1e6;
    println!(
        "{{\"mode\":\"{mode}\",\"depth\":{depth},\"iops\":{:.0},\"mb_per_s\":{mbps:.1},\"lat_median_us\":{:.1},\"lat_p99_us\":{:.1}}}",
        done as f64 / elapsed,
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}
