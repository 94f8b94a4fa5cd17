//! `qemu-img bench` for this library: the same request pattern and options
//! (-c count, -d depth, -s buffer size, -S step, -o offset, -w, -t cache, -f fmt),
//! with `depth` worker threads keeping that many requests in flight.
//!
//! Request i goes to (offset + i*step) mod image size, as in qemu-img bench.

use ferrovirt_disk::{open, Format, OpenOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

struct Args {
    count: u64,
    depth: u64,
    size: u64,
    step: Option<u64>,
    offset: u64,
    write: bool,
    direct: bool,
    format: Option<Format>,
    file: String,
}

fn parse_num(s: &str) -> Result<u64, String> {
    let (n, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .map(|v| v * mul)
        .map_err(|_| format!("invalid number '{s}'"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        count: 75000,
        depth: 64,
        size: 4096,
        step: None,
        offset: 0,
        write: false,
        direct: false,
        format: None,
        file: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-c" => a.count = parse_num(&val("-c")?)?,
            "-d" => a.depth = parse_num(&val("-d")?)?.max(1),
            "-s" => a.size = parse_num(&val("-s")?)?,
            "-S" => a.step = Some(parse_num(&val("-S")?)?),
            "-o" => a.offset = parse_num(&val("-o")?)?,
            "-w" => a.write = true,
            "-t" => a.direct = val("-t")? == "none",
            "-f" => a.format = Some(Format::parse(&val("-f")?).map_err(|e| e.to_string())?),
            f if !f.starts_with('-') => a.file = f.to_string(),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.file.is_empty() {
        return Err("usage: diskbench [-c N] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFF] [-w] [-t none|writeback] [-f FMT] FILE".into());
    }
    Ok(a)
}

/// Backing storage with a page-aligned window, so that O_DIRECT (-t none) can use it as is.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("diskbench: {e}");
            std::process::exit(2);
        }
    };
    let img = match open(
        std::path::Path::new(&a.file),
        &OpenOptions {
            format: a.format,
            read_only: !a.write,
            direct: a.direct,
        },
    ) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("diskbench: {e}");
            std::process::exit(1);
        }
    };
    let step = a.step.unwrap_or(a.size);
    let image_size = img.size();
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        a.count,
        if a.write { "write" } else { "read" },
        a.size,
        a.depth,
        a.offset,
        step
    );
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..a.depth.min(a.count.max(1)))
        .map(|_| {
            let img = img.clone();
            let next = next.clone();
            let (count, size, offset, write) = (a.count, a.size, a.offset, a.write);
            std::thread::spawn(move || -> Result<(), String> {
                let mut storage = AlignedBuf::new(size as usize);
                let buf = storage.as_mut();
                buf.fill(if write { 0xa5 } else { 0 });
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok(());
                    }
                    let off = (offset + i.wrapping_mul(step)) % image_size.max(1);
                    let r = if write {
                        img.write_at(buf, off)
                    } else {
                        img.read_at(buf, off)
                    };
                    r.map_err(|e| e.to_string())?;
                }
            })
        })
        .collect();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("diskbench: request failed: {e}");
                std::process::exit(1);
            }
            Err(_) => {
                eprintln!("diskbench: worker panicked");
                std::process::exit(1);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("Run completed in {secs:.3} seconds.");
    if let Err(e) = img.flush() {
        eprintln!("diskbench: flush failed: {e}");
        std::process::exit(1);
    }
}
