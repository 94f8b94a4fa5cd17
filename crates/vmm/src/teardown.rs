//! Fast exit: hand the VM's kernel-side teardown to a short-lived child.
//!
//! Destroying a KVM VM (the last close of its fd) can take tens of milliseconds,
//! much more on a busy or nested host, and the process is not reaped until it is
//! done. The guest has already stopped when we get here, so a fork()ed child
//! keeps the KVM file descriptors while this process exits at once; the child
//! waits for us to be gone (or 10 s at most), then exits and the kernel frees the VM.

use std::os::fd::RawFd;

/// How long the child waits for the parent before giving up.
const MAX_WAIT_MS: libc::c_int = 10_000;

/// Splits the open descriptors into KVM objects (kept by the child) and the rest.
/// Done in one pass after the pipe exists, so a descriptor number that a vCPU thread
/// frees meanwhile can never turn out to be the pipe's write end.
fn classify(keep_also: RawFd) -> (bool, Vec<RawFd>) {
    let mut any_kvm = false;
    let mut close = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return (false, close);
    };
    for entry in dir.filter_map(|e| e.ok()) {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd == keep_also {
            continue;
        }
        let is_kvm = std::fs::read_link(entry.path())
            .ok()
            .and_then(|t| t.to_str().map(|t| t.starts_with("anon_inode:kvm")))
            .unwrap_or(false);
        if is_kvm {
            any_kvm = true;
        } else {
            close.push(fd);
        }
    }
    (any_kvm, close)
}

/// Forks the teardown child; the caller should exit right after.
pub fn hand_off() {
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    // Collected before fork: the child may only make async-signal-safe calls.
    let (any_kvm, to_close) = classify(pipe[0]);
    if !any_kvm {
        // SAFETY: closing the descriptors we just created.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        return;
    }
    // SAFETY: the child only calls close, setsid, poll and _exit, which are
    // async-signal-safe, on values computed before the fork.
    match unsafe { libc::fork() } {
        0 => unsafe {
            for fd in &to_close {
                libc::close(*fd);
            }
            libc::setsid();
            // Returns when the parent has exited (its write end closes) or after the timeout.
            let mut pfd = libc::pollfd {
                fd: pipe[0],
                events: libc::POLLIN,
                revents: 0,
            };
            libc::poll(&mut pfd, 1, MAX_WAIT_MS);
            libc::_exit(0);
        },
        pid if pid > 0 => {
            // SAFETY: closing our copy of the read end; the write end closes when we exit.
            unsafe { libc::close(pipe[0]) };
        }
        _ => {
            // fork failed: exit the slow way.
            // SAFETY: closing descriptors we created above.
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
        }
    }
}
