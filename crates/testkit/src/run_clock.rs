//! Time limits for emulated guests that measure the guest's progress, not the host's load.
//!
//! A TCG guest on a shared 2-core host can spend most of the wall clock waiting for a CPU
//! (seen: load 25-50 while other builds ran, a 60 s nested run taking over 400 s). A limit
//! in wall-clock time then fails a run that is only slow. [`RunClock`] counts the wall time
//! during which the VM's process was not waiting in the kernel's run queue: the time it ran
//! or slept by itself. A guest that hangs still reaches its limit (spinning or idle), a guest
//! that was only starved does not.

use std::path::Path;
use std::time::{Duration, Instant};

/// Wall time of one process minus the time its most-starved thread waited for a CPU.
pub struct RunClock {
    pid: u32,
    start: Instant,
    waited_at_start: Duration,
    /// The last value read, kept when /proc stops answering (the process is gone).
    last_waited: Duration,
}

impl RunClock {
    /// Starts counting now for process `pid`.
    pub fn new(pid: u32) -> Self {
        let waited = run_queue_wait(pid).unwrap_or_default();
        RunClock {
            pid,
            start: Instant::now(),
            waited_at_start: waited,
            last_waited: waited,
        }
    }

    /// Wall time since `new`.
    pub fn wall(&self) -> Duration {
        self.start.elapsed()
    }

    /// Time spent waiting for a CPU since `new` (as of the last `elapsed` call).
    pub fn starved(&self) -> Duration {
        self.last_waited.saturating_sub(self.waited_at_start)
    }

    /// Wall time since `new` minus the time the process waited for a CPU.
    pub fn elapsed(&mut self) -> Duration {
        if let Some(waited) = run_queue_wait(self.pid) {
            self.last_waited = self.last_waited.max(waited);
        }
        self.wall().saturating_sub(self.starved())
    }
}

/// The longest run-queue wait of any thread of `pid` (field 2 of
/// /proc/PID/task/TID/schedstat, in ns). The busiest thread (a TCG vCPU) is the one that
/// waits most; summing would count parallel waits twice. None when the process is gone or
/// the kernel keeps no schedstat.
fn run_queue_wait(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task")).ok()?;
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max()
        .map(Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_process_runs_on_the_wall_clock() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let mut clock = RunClock::new(child.id());
        child.wait().unwrap();
        let elapsed = clock.elapsed();
        // Sleeping is not waiting for a CPU: all of the wall time counts.
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(clock.starved() <= clock.wall());
    }

    #[test]
    fn the_run_queue_wait_of_this_process_is_readable() {
        assert!(
            run_queue_wait(std::process::id()).is_some(),
            "/proc/self/task/*/schedstat is not readable: the kernel lacks CONFIG_SCHED_INFO"
        );
    }
}
