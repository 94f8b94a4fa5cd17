//! The allow-list of each kind of thread. Found by running the test suite (vmm, fuzz and the
//! daemon's kvm tests) with `--seccomp log` and reading what the kernel logged, then kept to
//! what those runs needed. ioctl is limited by its request's type byte: KVM's (0xAE) on the
//! threads that touch KVM, the terminal's (`T`, TCGETS/FIONBIO) where stdio or sockets are set up.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of threads of a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the machine runs: the console event loop, the exit record, teardown.
    Main,
    /// One per vCPU: KVM_RUN and the port/MMIO devices it reaches.
    Vcpu,
    /// The virtio device event loop (queues, TAP, rng, console).
    Device,
    /// A virtio-blk I/O worker.
    BlockIo,
    /// The control API (and its blocking pool, which takes snapshots and starts migrations).
    Api,
    /// An outgoing live migration.
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::BlockIo,
        ThreadKind::Api,
        ThreadKind::Migration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::BlockIo => "block-io",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
        }
    }
}

/// Every thread: memory, locks, time, signals, logging to stderr, ending.
const COMMON: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What the SIGSYS handler itself calls (see `report`), on top of COMMON's write and exit.
const REPORT: &[c_long] = &[libc::SYS_pwrite64, libc::SYS_fsync, libc::SYS_rename];

/// Waiting on and signalling eventfds, epoll.
const EVENTS: &[c_long] = &[
    libc::SYS_read,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Reading and writing disk images.
const DISK_IO: &[c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
    libc::SYS_fstat,
    // The image's locks (ferrovirt-disk's OFD locks, e.g. when a guest's flush reaches them).
    libc::SYS_fcntl,
];

/// Serving Unix sockets (the API, the serial console's clients).
const SOCKETS: &[c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_writev,
    libc::SYS_readv,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fcntl,
];

/// Starting threads (the API's blocking pool, the migration thread, which stacks its own filter).
const THREADS: &[c_long] = &[
    libc::SYS_seccomp,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
];

/// Writing files: snapshots (API), the exit record and socket cleanup (main).
const FILES: &[c_long] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_ftruncate,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
];

/// Opening a file: the thread that ends a disk's life (a vCPU after a guest's poweroff, an I/O
/// worker after an API stop) opens one, seen in the Linux tests and not yet pinned to its
/// caller; inside the jail only the VM's own files are there to open.
const OPEN: &[c_long] = &[libc::SYS_openat];

/// Kicking vCPUs out of KVM_RUN (pause, snapshot, migration).
const KICKS: &[c_long] = &[libc::SYS_tgkill];

/// Outgoing connections (live migration to unix: or tcp:).
const CONNECT: &[c_long] = &[libc::SYS_socket, libc::SYS_connect, libc::SYS_mincore];

/// The main thread's exit: the teardown child (fork, setsid, poll on a pipe) and its look at
/// the open descriptors.
const TEARDOWN: &[c_long] = &[
    libc::SYS_pipe2,
    libc::SYS_clone,
    libc::SYS_setsid,
    libc::SYS_set_robust_list,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_wait4,
];

/// The type byte of an ioctl request (`_IOC_TYPE`).
const IOCTL_TYPE_MASK: u64 = 0xff00;
const KVMIO: u64 = 0xae00;
/// Terminal and socket ioctls (TCGETS, TCSETS, FIONBIO, FIONREAD).
const TTY: u64 = 0x5400;

fn syscalls(kind: ThreadKind) -> Vec<&'static [c_long]> {
    let mut lists = vec![COMMON, REPORT];
    lists.extend_from_slice(match kind {
        // A guest's driver activates a disk from a vCPU (MMIO) or the device thread, and the
        // disk's I/O workers are started then, inheriting that thread's filter under their own
        // (stacked filters allow only what both allow): so both may start threads and need what
        // a worker does with the image.
        ThreadKind::Vcpu => &[EVENTS, SOCKETS, THREADS, DISK_IO, OPEN][..],
        ThreadKind::Device => &[EVENTS, DISK_IO, SOCKETS, THREADS, OPEN][..],
        ThreadKind::BlockIo => &[EVENTS, DISK_IO, OPEN][..],
        ThreadKind::Api => &[EVENTS, DISK_IO, SOCKETS, THREADS, FILES, CONNECT, KICKS][..],
        ThreadKind::Migration => &[EVENTS, DISK_IO, SOCKETS, FILES, CONNECT, KICKS][..],
        ThreadKind::Main => &[EVENTS, DISK_IO, SOCKETS, FILES, TEARDOWN][..],
    });
    lists
}

/// The ioctl request types a kind of thread may use.
fn ioctl_types(kind: ThreadKind) -> &'static [u64] {
    match kind {
        ThreadKind::Vcpu | ThreadKind::Api | ThreadKind::Migration => &[KVMIO, TTY],
        ThreadKind::Main => &[TTY],
        ThreadKind::Device | ThreadKind::BlockIo => &[],
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Compiles the filter of `kind`; calls outside it get `mismatch`.
pub(super) fn build(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for list in syscalls(kind) {
        for &nr in list {
            rules.insert(nr, Vec::new());
        }
    }
    let types = ioctl_types(kind);
    if !types.is_empty() {
        let per_type = types
            .iter()
            .map(|&t| {
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(IOCTL_TYPE_MASK),
                    t,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, per_type);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}
