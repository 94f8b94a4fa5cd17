//! A minimal stderr logger for the `log` facade.
//!
//! Messages the guest can cause at will (virtio-queue rejecting ring addresses it wrote,
//! say) are demoted to debug, so a hostile guest cannot flood the host's logs.

use std::sync::atomic::{AtomicUsize, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

static MAX_LEVEL: AtomicUsize = AtomicUsize::new(0);

/// Crates whose errors are about guest-written values.
const GUEST_DRIVEN_TARGETS: &[&str] = &["virtio_queue"];

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }
    fn log(&self, record: &Record) {
        let mut level = record.level();
        if GUEST_DRIVEN_TARGETS
            .iter()
            .any(|t| record.target().starts_with(t))
        {
            level = level.max(Level::Debug);
        }
        if level as usize > MAX_LEVEL.load(Ordering::Relaxed) {
            return;
        }
        eprintln!(
            "ferrovmm: {}: {}",
            level.as_str().to_lowercase(),
            record.args()
        );
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: LevelFilter) {
    MAX_LEVEL.store(level as usize, Ordering::Relaxed);
    if log::set_logger(&LOGGER).is_ok() {
        // Demotion only lowers a level, so the facade can keep filtering at the chosen
        // level: debug! on the vCPU exit path costs nothing unless asked for.
        log::set_max_level(level);
    }
}
