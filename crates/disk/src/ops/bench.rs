//! `bench`: qemu-img bench's request pattern over this library. Request 0 goes to
//! offset, request i > 0 to (offset + i * step) mod image size (QEMU 7.2); `depth` threads keep that many
//! requests in flight; with a flush interval, every Nth request is followed by a flush
//! that waits for the requests in flight unless `no_drain`.

use crate::{open, DiskError, Format, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub count: u64,
    pub depth: u64,
    pub buf_size: u64,
    /// None or 0: the buffer size.
    pub step: Option<u64>,
    pub offset: u64,
    pub write: bool,
    /// Byte written by write requests.
    pub pattern: u8,
    /// 0: no flushes during the run.
    pub flush_interval: u64,
    pub no_drain: bool,
    /// O_DIRECT (cache=none, directsync).
    pub direct: bool,
    /// A flush after every write (cache=writethrough, directsync).
    pub write_through: bool,
    pub format: Option<Format>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            count: 75000,
            depth: 64,
            buf_size: 4096,
            step: None,
            offset: 0,
            write: false,
            pattern: 0,
            flush_interval: 0,
            no_drain: false,
            direct: false,
            write_through: false,
            format: None,
        }
    }
}

impl BenchOptions {
    pub fn step(&self) -> u64 {
        self.step.filter(|&s| s != 0).unwrap_or(self.buf_size)
    }

    /// The lines qemu-img bench prints before the run.
    pub fn announcement(&self) -> String {
        let mut s = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            self.count,
            if self.write { "write" } else { "read" },
            self.buf_size,
            self.depth,
            self.offset,
            self.step()
        );
        if self.flush_interval > 0 {
            s += &format!("Sending flush every {} requests\n", self.flush_interval);
        }
        s
    }

    /// qemu-img bench's checks of option combinations.
    pub fn validate(&self) -> Result<(), DiskError> {
        let bad = |m: &str| Err(DiskError::InvalidArgument(m.into()));
        if self.depth == 0 {
            return bad("Invalid queue depth specified");
        }
        if self.buf_size > i32::MAX as u64 {
            return bad("Invalid buffer size specified");
        }
        if self.flush_interval > 0 && !self.write {
            return bad("--flush-interval is only available in write tests");
        }
        if self.flush_interval > 0 && self.flush_interval < self.depth {
            return bad("Flush interval can't be smaller than depth");
        }
        Ok(())
    }
}

/// A page-aligned buffer, so that O_DIRECT can use it as is.
fn aligned(len: usize, fill: u8) -> crate::file::AlignedBuf {
    let mut b = crate::file::AlignedBuf::zeroed(len);
    b.fill(fill);
    b
}

/// Runs the requests; `announce` gets the announcement once the image is open and
/// before the clock starts. Returns the run's duration (the final flush excluded).
pub fn bench(
    path: &Path,
    o: &BenchOptions,
    announce: impl FnOnce(&str),
) -> Result<Duration, DiskError> {
    o.validate()?;
    let img = open(
        path,
        &OpenOptions {
            format: o.format,
            read_only: !o.write,
            direct: o.direct,
        },
    )?;
    announce(&o.announcement());
    let image_size = img.size();
    let next = Arc::new(AtomicU64::new(0));
    // Requests hold it shared; a draining flush takes it exclusively.
    let drain = Arc::new(RwLock::new(()));
    let start = Instant::now();
    let workers: Vec<_> = (0..o.depth.min(o.count))
        .map(|_| {
            let (img, next, drain, o) = (img.clone(), next.clone(), drain.clone(), o.clone());
            std::thread::spawn(move || -> Result<(), DiskError> {
                let mut buf = aligned(o.buf_size as usize, if o.write { o.pattern } else { 0 });
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= o.count {
                        return Ok(());
                    }
                    // QEMU wraps the offset after each request, not before the first.
                    let off = if i == 0 {
                        o.offset
                    } else if image_size == 0 {
                        0
                    } else {
                        (o.offset as u128 + i as u128 * o.step() as u128) as u64 % image_size
                    };
                    {
                        let _r = drain.read().unwrap_or_else(|p| p.into_inner());
                        if o.write {
                            img.write_at(&buf, off)?;
                            if o.write_through {
                                img.flush()?;
                            }
                        } else {
                            img.read_at(&mut buf, off)?;
                        }
                    }
                    if o.flush_interval > 0 && (i + 1) % o.flush_interval == 0 {
                        let _w =
                            (!o.no_drain).then(|| drain.write().unwrap_or_else(|p| p.into_inner()));
                        img.flush()?;
                    }
                }
            })
        })
        .collect();
    let mut first_err = None;
    for w in workers {
        let r = w
            .join()
            .unwrap_or_else(|_| Err(DiskError::InvalidArgument("a bench worker panicked".into())));
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    let took = start.elapsed();
    if let Some(e) = first_err {
        return Err(DiskError::InvalidArgument(format!("Failed request: {e}")));
    }
    if o.write {
        img.flush()?;
    }
    Ok(took)
}
