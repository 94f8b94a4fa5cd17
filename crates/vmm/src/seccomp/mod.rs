//! Per-thread seccomp filters (as Firecracker and Cloud Hypervisor do): every thread of a running
//! VM installs the allow-list of its kind as it starts (`apply`), so a guest that takes over a
//! vCPU or a device thread can make only the calls that thread needs.
//!
//! Nothing happens until `init` (called by ferrovmm's `main`) chose a mode: the library's users
//! (tests, fuzz targets that run devices in their own process) keep their threads unfiltered.
//! With `on`, a forbidden call raises SIGSYS; the handler (`report`) writes an exit record naming
//! the call and the thread, and ends the process. With `log`, the kernel logs the call (dmesg,
//! audit type 1326) and lets it through.

mod filters;
pub mod names;
mod report;

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use ferrovmm_api::SeccompMode;
use seccompiler::{BpfProgram, SeccompAction};

pub use filters::ThreadKind;
pub use report::name_this_thread;

/// 0 = not initialised (off), else `SeccompMode as u8 + 1`.
static MODE: AtomicU8 = AtomicU8::new(0);

fn mode() -> SeccompMode {
    match MODE.load(Ordering::SeqCst) {
        2 => SeccompMode::Log,
        3 => SeccompMode::On,
        _ => SeccompMode::Off,
    }
}

/// Chooses the mode for every thread that calls `apply` from now on. With `on`, installs the
/// SIGSYS handler and prepares the exit record it writes (beside `exit_file`).
pub fn init(mode: SeccompMode, exit_file: Option<&Path>) -> std::io::Result<()> {
    fix_malloc_arenas();
    if mode == SeccompMode::On {
        report::install(exit_file)?;
    }
    let code = match mode {
        SeccompMode::Off => 1,
        SeccompMode::Log => 2,
        SeccompMode::On => 3,
    };
    MODE.store(code, Ordering::SeqCst);
    Ok(())
}

/// glibc sizes its malloc arenas the first time a thread needs a new one, by reading
/// /sys/devices/system/cpu/online: in a filtered thread (a disk's I/O worker) that is a forbidden
/// openat. Setting the limit up front means glibc never looks (its default: 8 per CPU).
fn fix_malloc_arenas() {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = (8 * cpus).min(i32::MAX as usize) as libc::c_int;
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// Removes what `init` prepared for a violation that did not happen (the process is ending
/// the ordinary way).
pub fn finish() {
    report::discard();
}

/// The filter of one kind of thread in the given mode (`None` when off).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, String> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => SeccompAction::Trap,
    };
    filters::build(kind, mismatch).map(Some)
}

/// Installs the calling thread's filter for its kind. A thread that cannot be confined must not
/// run the guest: the failure ends the process with an exit record.
pub fn apply(kind: ThreadKind) {
    let mode = mode();
    if mode == SeccompMode::Off {
        return;
    }
    report::name_this_thread();
    let installed = program(kind, mode).and_then(|p| match p {
        Some(p) => seccompiler::apply_filter(&p).map_err(|e| e.to_string()),
        None => Ok(()),
    });
    if let Err(e) = installed {
        report::fail_to_confine(kind, &e);
    }
    if mode == SeccompMode::On {
        probe(kind);
    }
}

/// Debug builds only: `FERROVMM_SECCOMP_PROBE=KIND` makes the first thread of that kind attempt
/// a syscall no filter allows (ptrace), so tests can see a violation handled end to end.
fn probe(kind: ThreadKind) {
    if !cfg!(debug_assertions) {
        return;
    }
    if std::env::var("FERROVMM_SECCOMP_PROBE").ok().as_deref() != Some(kind.as_str()) {
        return;
    }
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if FIRED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: PTRACE_TRACEME takes no pointers; under the filter it never reaches the kernel.
    unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
}

#[cfg(test)]
mod tests;
