//! Fast exit: hand the VM's kernel-side teardown to a short-lived child.
//!
//! Destroying a KVM VM (the last close of its fd) can take tens of milliseconds,
//! much more on a busy or nested host, and the process is not reaped until it is
//! done. The guest has already stopped when we get here, so a fork()ed child
//! keeps the KVM file descriptors while this process exits at once; the child
//! waits for us to be gone, then exits and the kernel frees the VM.

use std::os::fd::RawFd;

/// File descriptors that refer to KVM objects (VM, vCPUs).
fn kvm_fds() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            target.to_str()?.starts_with("anon_inode:kvm").then_some(fd)
        })
        .collect()
}

/// Every open descriptor but `keep`.
fn other_fds(keep: &[RawFd]) -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|fd| !keep.contains(fd))
        .collect()
}

/// Forks the teardown child; the caller should exit right after.
pub fn hand_off() {
    let keep = kvm_fds();
    if keep.is_empty() {
        return;
    }
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let mut keep_in_child = keep.clone();
    keep_in_child.push(pipe[0]);
    // Collected before fork: the child may only make async-signal-safe calls.
    let to_close = other_fds(&keep_in_child);
    // SAFETY: the child only calls close, read, setsid and _exit, which are
    // async-signal-safe, on values computed before the fork.
    match unsafe { libc::fork() } {
        0 => unsafe {
            for fd in &to_close {
                libc::close(*fd);
            }
            libc::setsid();
            // Blocks until the parent has exited and its write end is closed.
            let mut b = 0u8;
            libc::read(pipe[0], (&mut b as *mut u8).cast(), 1);
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
