//! Lifecycle event fan-out to /v1/events subscribers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use ferrovirt_api::state::{Event, EventKind};

use crate::runtime::now_ms;

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
            subs.retain(|s| s.send(event.clone()).is_ok());
        }
    }

    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push(tx);
        }
        rx
    }
}
