//! The device thread: one epoll loop that runs the handlers of every virtio
//! device (queue kicks, TAP readiness, console input), off the vCPU threads.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What a handler is told: the events that fired on its descriptor.
pub type Handler = Box<dyn FnMut(EventSet) + Send>;

pub struct EventLoop {
    epoll: Epoll,
    handlers: Mutex<HashMap<u64, (RawFd, Option<Handler>)>>,
    next_token: AtomicU64,
    /// The token whose handler runs right now, so `remove` can wait for it.
    running: Mutex<Option<u64>>,
    idle: Condvar,
    thread: OnceLock<ThreadId>,
}

/// Registration of one descriptor; dropping it does not unregister (call `remove`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(u64);

impl EventLoop {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(EventLoop {
            epoll: Epoll::new()?,
            handlers: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            running: Mutex::new(None),
            idle: Condvar::new(),
            thread: OnceLock::new(),
        }))
    }

    /// Starts the loop on its own thread.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("devices".into())
            .stack_size(512 << 10)
            .spawn(move || this.run())?;
        Ok(())
    }

    /// Calls `handler` whenever `fd` has `events` (level triggered).
    pub fn add(&self, fd: RawFd, events: EventSet, handler: Handler) -> std::io::Result<Token> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, (fd, Some(handler)));
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        {
            self.handlers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&token);
            return Err(e);
        }
        Ok(Token(token))
    }

    /// Changes the events watched for a registration (e.g. stop reading a TAP while the guest has no buffers).
    pub fn modify(&self, token: Token, events: EventSet) {
        let fd = self
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&token.0)
            .map(|h| h.0);
        if let Some(fd) = fd {
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(events, token.0),
            );
        }
    }

    /// Unregisters a descriptor. When this returns, its handler is not running and will not
    /// run again (a device reset relies on that: the rings must not be touched afterwards).
    pub fn remove(&self, token: Token) {
        let entry = self
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&token.0);
        if let Some((fd, _)) = entry {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if self.thread.get() == Some(&std::thread::current().id()) {
            return; // called from a handler: nothing else can be running
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running == Some(token.0) {
            running = self.idle.wait(running).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn run(&self) {
        let _ = self.thread.set(std::thread::current().id());
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("device event loop: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                // Take the handler out so it runs without the map locked (it may add or remove).
                let handler = {
                    let mut map = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
                    let h = map.get_mut(&token).and_then(|h| h.1.take());
                    if h.is_some() {
                        // Marked under the map lock, so `remove` either sees it or wins the race.
                        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
                    }
                    h
                };
                let Some(mut handler) = handler else { continue };
                handler(ev.event_set());
                {
                    let mut map = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(slot) = map.get_mut(&token) {
                        slot.1 = Some(handler);
                    }
                }
                *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.idle.notify_all();
            }
        }
    }
}

/// The event-loop registrations of one active device: what a device reset removes.
#[derive(Default)]
pub struct Registrations {
    active: Vec<(Arc<EventLoop>, Token)>,
}

impl Registrations {
    /// Calls `handler` whenever `fd` is readable.
    pub fn on_readable(
        &mut self,
        el: &Arc<EventLoop>,
        fd: RawFd,
        handler: Handler,
    ) -> Result<Token, String> {
        let token = el
            .add(fd, EventSet::IN, handler)
            .map_err(|e| format!("event loop: {e}"))?;
        self.active.push((el.clone(), token));
        Ok(token)
    }

    /// Calls `work` after each guest notification on `kick` (the eventfd is drained first).
    pub fn on_kick(
        &mut self,
        el: &Arc<EventLoop>,
        kick: vmm_sys_util::eventfd::EventFd,
        mut work: impl FnMut() + Send + 'static,
    ) -> Result<Token, String> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&kick);
        self.on_readable(
            el,
            fd,
            Box::new(move |_| {
                let _ = kick.read();
                work();
            }),
        )
    }

    /// Removes every registration; no handler runs once this returns.
    pub fn clear(&mut self) {
        for (el, token) in self.active.drain(..) {
            el.remove(token);
        }
    }
}
