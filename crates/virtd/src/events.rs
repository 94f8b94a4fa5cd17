//! Lifecycle event fan-out to /v1/events subscribers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc::{channel, Receiver, Sender};

use ferrovirt_api::state::{Event, EventKind};

use crate::runtime::now_ms;

/// Events queued per subscriber.
const SUBSCRIBER_QUEUE: usize = 256;

#[derive(Default)]
pub struct EventBus {
    seq: AtomicU64,
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventBus {
    pub fn emit(&self, domain: &str, kind: EventKind, detail: &str) {
        let event = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: now_ms(),
            domain: domain.to_string(),
            kind,
            detail: detail.to_string(),
        };
        if let Ok(mut subs) = self.subscribers.lock() {
            // A subscriber this far behind (not reading) is dropped: its stream ends.
            subs.retain(|s| s.try_send(event.clone()).is_ok());
        }
    }

    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel(SUBSCRIBER_QUEUE);
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push(tx);
        }
        rx
    }
}
