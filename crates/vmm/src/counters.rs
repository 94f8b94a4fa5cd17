//! Counts of vCPU exits by kind, for `GET /vm/counters`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub unhandled_io: AtomicU64,
    pub hlt: AtomicU64,
    pub interrupted: AtomicU64,
    pub shutdown: AtomicU64,
    pub system_event: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct ExitCountersSnapshot {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    /// Port or MMIO accesses with no device behind them (ignored, reads return ones).
    pub unhandled_io: u64,
    pub hlt: u64,
    /// KVM_RUN interrupted by a signal (pause, stop).
    pub interrupted: u64,
    pub shutdown: u64,
    pub system_event: u64,
    pub other: u64,
}

impl ExitCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ExitCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCountersSnapshot {
            io_in: get(&self.io_in),
            io_out: get(&self.io_out),
            mmio_read: get(&self.mmio_read),
            mmio_write: get(&self.mmio_write),
            unhandled_io: get(&self.unhandled_io),
            hlt: get(&self.hlt),
            interrupted: get(&self.interrupted),
            shutdown: get(&self.shutdown),
            system_event: get(&self.system_event),
            other: get(&self.other),
        }
    }
}
