//! Image locking compatible with QEMU's: open-file-description read locks on byte
//! 100+p for each permission p an opener holds and on byte 200+p for each permission it
//! does not share. A conflict is seen by testing for someone else's lock on the
//! matching byte. So a VM's disk cannot be opened for writing by a second process
//! (ours or QEMU's), and a backing file in use cannot be written underneath.

use crate::DiskError;
use std::os::unix::io::RawFd;
use std::path::Path;

const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;
const HELD_BASE: i64 = 100;
const UNSHARED_BASE: i64 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockMode {
    /// Reading only; nobody else may write meanwhile.
    Shared,
    /// Reading, writing and resizing; nobody else may write or resize.
    Exclusive,
}

fn perms(mode: LockMode) -> (&'static [i64], &'static [i64]) {
    match mode {
        LockMode::Shared => (&[PERM_CONSISTENT_READ], &[PERM_WRITE]),
        LockMode::Exclusive => (
            &[PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE],
            &[PERM_WRITE, PERM_RESIZE],
        ),
    }
}

fn perm_name(p: i64) -> &'static str {
    match p {
        PERM_CONSISTENT_READ => "read",
        PERM_WRITE => "write",
        _ => "resize",
    }
}

fn flock_at(byte: i64, ty: i32) -> libc::flock {
    libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file description holds a lock on `byte`; None if the file
/// system does not support OFD locks.
fn held_by_other(fd: RawFd, byte: i64) -> Option<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass, nothing else.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return None;
    }
    Some(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn set_read_lock(fd: RawFd, byte: i64) -> std::io::Result<()> {
    let fl = flock_at(byte, libc::F_RDLCK);
    // SAFETY: F_OFD_SETLK only reads the flock struct we pass.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the locks of `mode` without looking for conflicts: for a descriptor that takes
/// over from another opening of the same file in this process (whose locks would be
/// seen as a conflict), while that one still holds them, so there is no unlocked gap.
pub(crate) fn take_over(fd: RawFd, path: &Path, mode: LockMode) -> Result<(), DiskError> {
    let (held, unshared) = perms(mode);
    for byte in held
        .iter()
        .map(|p| HELD_BASE + p)
        .chain(unshared.iter().map(|p| UNSHARED_BASE + p))
    {
        if let Err(e) = set_read_lock(fd, byte) {
            if held_by_other(fd, byte).is_none() {
                return Ok(()); // no OFD locks on this file system
            }
            return Err(DiskError::io(path, e));
        }
    }
    Ok(())
}

/// Drops every lock this open file description holds. Called before the descriptor is
/// closed: a child forked meanwhile shares the description until it execs, and would
/// otherwise keep the image locked after we let it go.
pub(crate) fn unlock_all(fd: RawFd) {
    let fl = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: HELD_BASE,
        l_len: UNSHARED_BASE + 100 - HELD_BASE,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK only reads the flock struct we pass.
    unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
}

/// Takes the locks for `mode`, or says which other opener is in the way. The locks
/// last as long as the descriptor.
pub(crate) fn lock(fd: RawFd, path: &Path, mode: LockMode) -> Result<(), DiskError> {
    let (held, unshared) = perms(mode);
    let in_use = |why: String| DiskError::InUse {
        path: path.to_path_buf(),
        reason: why,
    };
    for &p in held {
        match held_by_other(fd, UNSHARED_BASE + p) {
            None => return Ok(()), // no OFD locks here (e.g. some network file systems)
            Some(true) => {
                return Err(in_use(format!(
                    "another process does not allow others to {} it",
                    perm_name(p)
                )))
            }
            Some(false) => {}
        }
    }
    for &p in unshared {
        if held_by_other(fd, HELD_BASE + p) == Some(true) {
            return Err(in_use(format!(
                "another process has it open to {}",
                perm_name(p)
            )));
        }
    }
    for byte in held
        .iter()
        .map(|p| HELD_BASE + p)
        .chain(unshared.iter().map(|p| UNSHARED_BASE + p))
    {
        set_read_lock(fd, byte).map_err(|e| DiskError::io(path, e))?;
    }
    Ok(())
}
