//! One thread per vCPU: runs KVM_RUN and routes exits to the buses.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::counters::ExitCounters;
use crate::cpu::regs;
use crate::devices::bus::Bus;
use crate::kvm_state::VcpuState;
use crate::lifecycle::{Lifecycle, StopReason};
use ferrovmm_api::CrashCause;

/// Real-time signal used to kick a vCPU out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal; KVM_RUN then returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_signal)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Pause requests from the API and the vCPUs' acknowledgements.
#[derive(Default)]
pub struct PauseControl {
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: u32,
    /// Bumped to ask every parked vCPU for its KVM state.
    save_generation: u64,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

impl PauseControl {
    /// Called by a vCPU before entering the guest: parks while a pause is requested,
    /// and saves its KVM state there when asked (only its own thread holds its fd).
    fn checkpoint(&self, vcpu: &mut Vcpu) {
        let lifecycle = vcpu.lifecycle.clone();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.requested {
            return;
        }
        st.parked += 1;
        let mut seen = st.save_generation;
        self.changed.notify_all();
        while st.requested && !lifecycle.is_stopping() {
            if st.save_generation != seen {
                seen = st.save_generation;
                drop(st);
                vcpu.complete_pending_io();
                let state = VcpuState::save(&vcpu.fd, &vcpu.msr_indices)
                    .map_err(|e| format!("vcpu{}: {e}", vcpu.index));
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(slot) = st.saved.get_mut(vcpu.index as usize) {
                    *slot = Some(state);
                }
                self.changed.notify_all();
                continue;
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.parked -= 1;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requested
    }
}

/// The running vCPU threads, for pause, resume and kicks.
pub struct VcpuSet {
    threads: Vec<JoinHandle<()>>,
    pub pause: Arc<PauseControl>,
}

impl VcpuSet {
    fn kick_all(&self) {
        for t in &self.threads {
            // SAFETY: the pthread_t belongs to a thread we spawned and never detach or join,
            // so it stays valid for the life of the process.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&self) {
        {
            let mut st = self.pause.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.requested {
                return;
            }
            st.requested = true;
        }
        let count = self.threads.len() as u32;
        loop {
            // Kick repeatedly: a signal that lands just before KVM_RUN is not seen by it.
            self.kick_all();
            let st = self.pause.state.lock().unwrap_or_else(|p| p.into_inner());
            let (st, _) = self
                .pause
                .changed
                .wait_timeout_while(st, Duration::from_millis(2), |s| s.parked < count)
                .unwrap_or_else(|p| p.into_inner());
            if st.parked >= count {
                return;
            }
        }
    }

    /// The KVM state of every vCPU; the VM must be paused.
    pub fn save_states(&self, lifecycle: &Lifecycle) -> Result<Vec<VcpuState>, String> {
        let count = self.threads.len();
        let mut st = self.pause.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.requested {
            return Err("the vCPUs are not paused".into());
        }
        // Threads of a just-restored VM may still be on their way to parking.
        while (st.parked as usize) < count {
            if lifecycle.is_stopping() {
                return Err("the VM stopped while its state was being saved".into());
            }
            st = self
                .pause
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.save_generation += 1;
        st.saved = (0..count).map(|_| None).collect();
        self.pause.changed.notify_all();
        while st.saved.iter().any(|s| s.is_none()) {
            if lifecycle.is_stopping() {
                return Err("the VM stopped while its state was being saved".into());
            }
            st = self
                .pause
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::take(&mut st.saved)
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Err("vCPU state missing".into())))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    pub fn resume(&self) {
        let mut st = self.pause.state.lock().unwrap_or_else(|p| p.into_inner());
        st.requested = false;
        self.pause.changed.notify_all();
    }
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u32,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub lifecycle: Arc<Lifecycle>,
    pub counters: Arc<ExitCounters>,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST), read once per VM.
    pub msr_indices: Arc<Vec<u32>>,
}

/// Starts one thread per vCPU; with `paused` they park before entering the guest
/// until `resume` (a restored VM waits for `PUT /vm/resume`).
pub fn start(vcpus: Vec<Vcpu>, paused: bool) -> std::io::Result<VcpuSet> {
    let pause = Arc::new(PauseControl::default());
    pause
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .requested = paused;
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let pause = pause.clone();
        let name = format!("vcpu{}", vcpu.index);
        threads.push(
            std::thread::Builder::new()
                .name(name)
                .stack_size(256 << 10)
                .spawn(move || {
                    crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
                    vcpu.run(&pause)
                })?,
        );
    }
    Ok(VcpuSet { threads, pause })
}

enum Flow {
    Continue,
    Stop(StopReason),
}

impl Vcpu {
    fn run(mut self, pause: &PauseControl) {
        loop {
            if self.lifecycle.is_stopping() {
                return;
            }
            pause.checkpoint(&mut self);
            // A VM stopped while paused must not enter the guest again: the vCPU leaves
            // its checkpoint because of the stop, and one more KVM_RUN would run guest code
            // past its saved state (a serial byte the restored VM then prints again).
            if self.lifecycle.is_stopping() {
                return;
            }
            let flow = self.run_once();
            if let Flow::Stop(reason) = flow {
                self.lifecycle.request_stop(reason);
                return;
            }
        }
    }

    fn run_once(&mut self) -> Flow {
        let c = &self.counters;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ExitCounters::bump(&c.io_out);
                if !self.pio.write(u64::from(port), data) {
                    ExitCounters::bump(&c.unhandled_io);
                    log::debug!(
                        "vcpu{}: out to port {port:#x} with no device: {data:x?}",
                        self.index
                    );
                }
                Flow::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ExitCounters::bump(&c.io_in);
                if !self.pio.read(u64::from(port), data) {
                    ExitCounters::bump(&c.unhandled_io);
                    log::debug!("vcpu{}: in from port {port:#x} with no device", self.index);
                }
                Flow::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ExitCounters::bump(&c.mmio_read);
                if !self.mmio.read(addr, data) {
                    ExitCounters::bump(&c.unhandled_io);
                    log::debug!("vcpu{}: MMIO read at {addr:#x} with no device", self.index);
                }
                Flow::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ExitCounters::bump(&c.mmio_write);
                if !self.mmio.write(addr, data) {
                    ExitCounters::bump(&c.unhandled_io);
                    log::debug!(
                        "vcpu{}: MMIO write at {addr:#x} with no device: {data:x?}",
                        self.index
                    );
                }
                Flow::Continue
            }
            Ok(VcpuExit::Hlt) => {
                ExitCounters::bump(&c.hlt);
                Flow::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: a real PC resets.
                ExitCounters::bump(&c.shutdown);
                Flow::Stop(StopReason::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                ExitCounters::bump(&c.system_event);
                match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Flow::Stop(StopReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => Flow::Stop(StopReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Flow::Stop(
                        self.fatal(CrashCause::GuestPanic, "guest crash reported by KVM"),
                    ),
                    other => Flow::Stop(self.fatal(
                        CrashCause::UnhandledExit,
                        &format!("unknown KVM system event {other}"),
                    )),
                }
            }
            Ok(VcpuExit::InternalError) => {
                ExitCounters::bump(&c.other);
                let run = self.fd.get_kvm_run();
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member
                // of the exit union; it is plain integers.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Flow::Stop(self.fatal(
                    CrashCause::KvmInternalError,
                    &format!("KVM internal error (suberror {suberror})"),
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                ExitCounters::bump(&c.other);
                Flow::Stop(self.fatal(
                    CrashCause::EntryFailed,
                    &format!("KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"),
                ))
            }
            Ok(other) => {
                ExitCounters::bump(&c.other);
                let text = format!("{other:?}");
                Flow::Stop(self.fatal(
                    CrashCause::UnhandledExit,
                    &format!("unhandled vCPU exit {text}"),
                ))
            }
            Err(e) if e.errno() == libc::EINTR => {
                ExitCounters::bump(&c.interrupted);
                self.fd.set_kvm_immediate_exit(0);
                Flow::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Flow::Continue,
            Err(e) => {
                Flow::Stop(self.fatal(CrashCause::VcpuError, &format!("KVM_RUN failed: {e}")))
            }
        }
    }

    /// Lets KVM finish the instruction of the last I/O exit (the RIP advance of an
    /// OUT, the register load of an IN) without running the guest: KVM_RUN with
    /// immediate_exit. Saved state taken without this would replay the I/O.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!("vcpu{}: completing pending I/O: {other:?}", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn fatal(&self, cause: CrashCause, what: &str) -> StopReason {
        StopReason::Crash {
            cause,
            detail: format!("vcpu{}: {what}", self.index),
            dump: regs::dump(&self.fd).trim_end().to_string(),
        }
    }
}
