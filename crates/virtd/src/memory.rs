//! Giving memory back after a burst of requests. A burst of clients grows tokio's blocking pool;
//! its threads end when idle, but glibc keeps the memory they freed (in its arenas) mapped. So:
//! few arenas (set before any thread starts), and `malloc_trim` once the daemon has gone quiet
//! after serving requests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// malloc arenas at most: the main one and one for all other threads. The daemon's threads
/// (two async workers, blocking-pool threads that mostly wait on locks and drivers) do not
/// allocate hard enough in parallel to need one arena each.
const ARENAS: i32 = 2;

/// How often the trimmer looks; it trims after one whole period without a request.
pub const TRIM_PERIOD: Duration = Duration::from_secs(5);

/// Cap glibc's malloc arenas. Call first thing in `main`, before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Hand the allocator's free memory back to the kernel (all arenas).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' locks itself; no pointers are passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Requests being answered, and how many were answered so far.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    served: AtomicU64,
}

/// One request in flight; counted as served when dropped.
pub struct Serving(Arc<Activity>);

impl Activity {
    pub fn begin(self: &Arc<Self>) -> Serving {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Serving(self.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.served.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decides, once per period, whether to trim: yes after a period with no request in flight and
/// none served, if requests were served since the last trim (an idle daemon is not trimmed
/// again and again).
#[derive(Debug, Default)]
pub struct IdleTrim {
    seen: u64,
    trimmed_at: u64,
}

impl IdleTrim {
    pub fn tick(&mut self, activity: &Activity) -> bool {
        let served = activity.served.load(Ordering::Relaxed);
        let busy = activity.in_flight.load(Ordering::Relaxed) > 0 || served != self.seen;
        self.seen = served;
        if busy || served == self.trimmed_at {
            return false;
        }
        self.trimmed_at = served;
        true
    }
}

/// Run `trim` whenever the daemon went quiet after serving requests (checked every `period`).
pub async fn trim_when_idle(activity: Arc<Activity>, period: Duration, trim: impl Fn()) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = IdleTrim::default();
    loop {
        ticks.tick().await;
        if idle.tick(&activity) {
            trim();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_quiet_period_following_requests() {
        let activity = Arc::new(Activity::default());
        let mut idle = IdleTrim::default();
        assert!(
            !idle.tick(&activity),
            "a daemon that served nothing is not trimmed"
        );
        let a = activity.begin();
        let b = activity.begin();
        drop(a);
        assert!(!idle.tick(&activity), "a request is in flight");
        drop(b);
        assert!(!idle.tick(&activity), "requests were served in this period");
        assert!(
            idle.tick(&activity),
            "a whole quiet period after the burst: trim"
        );
        assert!(
            !idle.tick(&activity),
            "still quiet: nothing new to give back"
        );
        drop(activity.begin());
        assert!(!idle.tick(&activity));
        assert!(
            idle.tick(&activity),
            "quiet again after new requests: trim again"
        );
    }

    #[test]
    fn a_request_that_stays_in_flight_holds_the_trim_off() {
        let activity = Arc::new(Activity::default());
        let mut idle = IdleTrim::default();
        drop(activity.begin());
        let long = activity.begin();
        for _ in 0..3 {
            assert!(!idle.tick(&activity));
        }
        drop(long);
        assert!(!idle.tick(&activity));
        assert!(idle.tick(&activity));
    }

    #[tokio::test(start_paused = true)]
    async fn the_trimmer_task_trims_when_the_daemon_goes_quiet() {
        let activity = Arc::new(Activity::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(trim_when_idle(activity.clone(), TRIM_PERIOD, move || {
            let _ = tx.send(());
        }));
        drop(activity.begin());
        // Paused clock: the runtime advances it whenever every task waits.
        rx.recv().await.expect("the trimmer ran after the requests");
        tokio::time::sleep(3 * TRIM_PERIOD).await;
        assert!(rx.try_recv().is_err(), "trimmed once while it stays quiet");
        task.abort();
    }
}
