//! The device thread: one epoll loop that runs the handlers of every virtio
//! device (queue kicks, TAP readiness, console input), off the vCPU threads.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

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
    /// Wakes the loop so it sees a pause request.
    wake: EventFd,
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    requested: u32,
    parked: bool,
}

/// The token of the loop's own wake-up eventfd (handler tokens start at 1).
const WAKE_TOKEN: u64 = 0;

/// Registration of one descriptor; dropping it does not unregister (call `remove`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(u64);

impl EventLoop {
    pub fn new() -> std::io::Result<Arc<Self>> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&wake),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        Ok(Arc::new(EventLoop {
            epoll,
            handlers: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            running: Mutex::new(None),
            idle: Condvar::new(),
            thread: OnceLock::new(),
            wake,
            pause: Mutex::new(PauseState::default()),
            pause_changed: Condvar::new(),
        }))
    }

    /// Starts the loop on its own thread.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("devices".into())
            .stack_size(512 << 10)
            .spawn(move || {
                crate::seccomp::apply(crate::seccomp::ThreadKind::Device);
                this.run()
            })?;
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

    /// Stops running handlers: when this returns, none runs until `resume`
    /// (a snapshot needs the devices' rings and guest memory to hold still).
    /// Pauses nest; a loop that was never spawned counts as paused.
    pub fn pause(&self) {
        let mut st = self.pause.lock().unwrap_or_else(|p| p.into_inner());
        st.requested += 1;
        if self.thread.get().is_none() || self.thread.get() == Some(&std::thread::current().id()) {
            return;
        }
        let _ = self.wake.write(1);
        while !st.parked {
            st = self
                .pause_changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        let mut st = self.pause.lock().unwrap_or_else(|p| p.into_inner());
        st.requested = st.requested.saturating_sub(1);
        self.pause_changed.notify_all();
    }

    /// Parks the loop thread while a pause is requested.
    fn checkpoint(&self) {
        let mut st = self.pause.lock().unwrap_or_else(|p| p.into_inner());
        if st.requested == 0 {
            return;
        }
        st.parked = true;
        self.pause_changed.notify_all();
        while st.requested > 0 {
            st = self
                .pause_changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        st.parked = false;
    }

    fn run(&self) {
        let _ = self.thread.set(std::thread::current().id());
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            self.checkpoint();
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
                if token == WAKE_TOKEN {
                    let _ = self.wake.read();
                    continue;
                }
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
                // A pause waits for the handler that is running, not for the whole batch.
                self.checkpoint();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn no_handler_runs_while_paused() {
        let el = EventLoop::new().unwrap();
        el.spawn().unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let (r, f) = (runs.clone(), fd.try_clone().unwrap());
        el.add(
            fd.as_raw_fd(),
            EventSet::IN,
            Box::new(move |_| {
                let _ = f.read();
                r.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        el.pause();
        fd.write(1).unwrap();
        // Give a running loop every chance to (wrongly) run the handler.
        for _ in 0..100 {
            std::thread::yield_now();
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        el.resume();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "handler never ran after resume"
            );
            std::thread::yield_now();
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
