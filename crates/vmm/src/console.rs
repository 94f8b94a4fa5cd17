//! The main thread's event loop: console input into the serial port, console
//! socket clients, and the stop event that ends the process.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::error::{Error, Result};
use crate::lifecycle::StopReason;
use crate::vm::Machine;

const TOKEN_STOP: u64 = u64::MAX;
const TOKEN_INPUT_SPACE: u64 = u64::MAX - 1;
const TOKEN_LISTENER: u64 = u64::MAX - 2;
/// Console input held back while the guest's FIFO is full.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// A source of console input: stdin or a socket client.
enum Input {
    Stdin,
    Client(UnixStream),
}

impl Input {
    fn fd(&self) -> RawFd {
        match self {
            Input::Stdin => libc::STDIN_FILENO,
            Input::Client(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Input::Stdin => std::io::stdin().lock().read(buf),
            Input::Client(s) => s.read(buf),
        }
    }
}

/// Binds the console socket; a stale socket file from an earlier run is replaced.
pub fn bind_socket(path: &Path, flag: &str) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path)
        .map_err(|e| Error::usage(format!("{flag}: cannot listen on {}: {e}", path.display())))
}

pub struct EventLoop<'a> {
    machine: &'a Machine,
    epoll: Epoll,
    inputs: Vec<Input>,
    listener: Option<UnixListener>,
    pending: VecDeque<u8>,
    inputs_armed: bool,
}

impl<'a> EventLoop<'a> {
    pub fn new(machine: &'a Machine, stdin: bool, listener: Option<UnixListener>) -> Result<Self> {
        let epoll = Epoll::new().map_err(|e| Error::host(format!("epoll: {e}")))?;
        let add = |fd: RawFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| Error::host(format!("epoll_ctl: {e}")))
        };
        add(machine.lifecycle.stop_evt.as_raw_fd(), TOKEN_STOP)?;
        add(machine.serial_input_space.as_raw_fd(), TOKEN_INPUT_SPACE)?;
        if let Some(l) = &listener {
            l.set_nonblocking(true)
                .map_err(|e| Error::host(format!("console socket: {e}")))?;
            add(l.as_raw_fd(), TOKEN_LISTENER)?;
        }
        let mut this = EventLoop {
            machine,
            epoll,
            inputs: Vec::new(),
            listener,
            pending: VecDeque::new(),
            inputs_armed: true,
        };
        if stdin {
            this.add_input(Input::Stdin);
        }
        Ok(this)
    }

    fn add_input(&mut self, input: Input) {
        let fd = input.fd();
        if self.inputs_armed {
            let _ = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            );
        }
        self.inputs.push(input);
    }

    fn remove_input(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.inputs.retain(|i| i.fd() != fd);
    }

    /// Stops (or resumes) watching input while the guest cannot take more.
    fn arm_inputs(&mut self, armed: bool) {
        if armed == self.inputs_armed {
            return;
        }
        for input in &self.inputs {
            let op = if armed {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            let _ = self.epoll.ctl(
                op,
                input.fd(),
                EpollEvent::new(EventSet::IN, input.fd() as u64),
            );
        }
        self.inputs_armed = armed;
    }

    fn push_pending_input(&mut self) {
        if !self.pending.is_empty() {
            let bytes: Vec<u8> = self.pending.iter().copied().collect();
            let taken = self
                .machine
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(&bytes);
            self.pending.drain(..taken);
        }
        self.arm_inputs(self.pending.len() < MAX_PENDING_INPUT);
    }

    fn accept_clients(&mut self) {
        loop {
            let Some(Ok((stream, _))) = self.listener.as_ref().map(|l| l.accept()) else {
                return;
            };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Some(clients) = &self.machine.serial_clients {
                clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(stream);
            }
            self.add_input(Input::Client(reader));
        }
    }

    fn read_input(&mut self, fd: RawFd) {
        let Some(pos) = self.inputs.iter().position(|i| i.fd() == fd) else {
            return;
        };
        let mut buf = [0u8; 4096];
        match self.inputs[pos].read(&mut buf) {
            Ok(0) => self.remove_input(fd),
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                self.push_pending_input();
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => self.remove_input(fd),
        }
    }

    /// Runs until the VM stops; returns why.
    pub fn run(&mut self) -> StopReason {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            if let Some(reason) = self.machine.lifecycle.stop_reason() {
                return reason;
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return StopReason::Crash {
                        cause: ferrovmm_api::CrashCause::Vmm,
                        detail: format!("epoll_wait failed: {e}"),
                        dump: String::new(),
                    }
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = self.machine.lifecycle.stop_evt.read();
                    }
                    TOKEN_INPUT_SPACE => {
                        let _ = self.machine.serial_input_space.read();
                        self.push_pending_input();
                    }
                    TOKEN_LISTENER => self.accept_clients(),
                    fd => self.read_input(fd as RawFd),
                }
            }
        }
    }
}
