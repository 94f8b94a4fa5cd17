//! What happens on a violation: the SIGSYS handler writes the exit record (crash, cause
//! `seccomp`, which call on which thread) and ends the process.
//!
//! A signal handler may not allocate or take locks, and the thread that trapped may not be
//! allowed to open files: the record's temporary file is created and opened up front, and the
//! handler only formats into a stack buffer, writes, fsyncs, renames it over the exit file and
//! calls `_exit` (calls every filter allows: see `filters::REPORT`).

use std::cell::Cell;
use std::ffi::CString;
use std::fmt::Write as _;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrovmm_api::{ExitReason, ExitRecord};

use super::names;
use super::ThreadKind;

struct Report {
    exit_file: Option<PathBuf>,
    /// The prepared record: its temporary file (open) and the two paths for the rename.
    prepared: Option<(RawFd, CString, CString)>,
}

static REPORT: OnceLock<Report> = OnceLock::new();

thread_local! {
    /// The thread's name, copied where the handler can read it without allocating.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// The temporary file a violation's record is written to before it is renamed into place.
fn temp_path(exit_file: &Path) -> PathBuf {
    let mut name = exit_file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".seccomp.{}", std::process::id()));
    exit_file.with_file_name(name)
}

/// Prepares the record and installs the SIGSYS handler.
pub(super) fn install(exit_file: Option<&Path>) -> std::io::Result<()> {
    let prepared = match exit_file {
        Some(path) => {
            let tmp = temp_path(path);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)?;
            let cstr =
                |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
            Some((file.into_raw_fd(), cstr(&tmp)?, cstr(path)?))
        }
        None => None,
    };
    let _ = REPORT.set(Report {
        exit_file: exit_file.map(Path::to_path_buf),
        prepared,
    });
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is a valid argument; the
    // handler only makes async-signal-safe calls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Removes the prepared temporary file (the process ends without a violation).
pub(super) fn discard() {
    if let Some(Report {
        prepared: Some((_, tmp, _)),
        ..
    }) = REPORT.get()
    {
        // SAFETY: a NUL-terminated path we own.
        unsafe { libc::unlink(tmp.as_ptr()) };
    }
}

/// Remembers the calling thread's name for the handler.
pub fn name_this_thread() {
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let given = current.name().unwrap_or("main").as_bytes();
    let n = given.len().min(15);
    name[..n].copy_from_slice(&given[..n]);
    THREAD_NAME.with(|c| c.set(name));
}

/// A thread whose filter cannot be installed ends the process (with a record) before it runs
/// anything of the guest's.
pub(super) fn fail_to_confine(kind: ThreadKind, why: &str) -> ! {
    let message = format!(
        "cannot install the seccomp filter of the {} thread: {why}",
        kind.as_str()
    );
    eprintln!("ferrovmm: {message}");
    if let Some(Report {
        exit_file: Some(path),
        ..
    }) = REPORT.get()
    {
        let _ = (ExitRecord {
            reason: ExitReason::Error { message },
            status: 1,
        })
        .write_atomic(path);
    }
    discard();
    std::process::exit(1);
}

/// A fixed buffer that `write!` fills without allocating; what does not fit is dropped.
struct Buf {
    bytes: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// A thread name as it may appear inside a JSON string: anything unusual becomes '?'.
struct SafeName([u8; 16]);

impl std::fmt::Display for SafeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            let ok = b.is_ascii_alphanumeric() || b"-_. ".contains(&b);
            f.write_char(if ok { b as char } else { '?' })?;
        }
        Ok(())
    }
}

/// The exit record of a violation, as JSON (the shape of `ExitRecord`).
fn record_json(buf: &mut Buf, nr: u32, thread: [u8; 16]) {
    let name = names::name(nr).unwrap_or("unknown");
    let thread = SafeName(thread);
    let _ = writeln!(
        buf,
        "{{\"reason\":\"crash\",\"cause\":\"seccomp\",\"detail\":\"{thread}: seccomp forbids syscall {name} ({nr})\",\"seccomp\":{{\"syscall\":{nr},\"name\":\"{name}\",\"thread\":\"{thread}\"}},\"status\":1}}"
    );
}

/// The offset of `si_syscall` in a SIGSYS siginfo on x86_64 (after signo, errno, code, padding
/// and the `si_call_addr` pointer).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose si_syscall is an int at this
    // offset; everything below is a plain syscall on memory this function owns or on the
    // prepared (never freed) report.
    unsafe {
        let nr = *(info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>() as u32;
        let thread = THREAD_NAME.with(|c| c.get());
        let mut buf = Buf {
            bytes: [0; 512],
            len: 0,
        };
        let _ = write!(buf, "ferrovmm: ");
        let start = buf.len;
        record_json(&mut buf, nr, thread);
        libc::write(2, buf.bytes.as_ptr().cast(), buf.len);
        if let Some(Report {
            prepared: Some((fd, tmp, path)),
            ..
        }) = REPORT.get()
        {
            let record = &buf.bytes[start..buf.len];
            libc::pwrite(*fd, record.as_ptr().cast(), record.len(), 0);
            libc::fsync(*fd);
            libc::rename(tmp.as_ptr(), path.as_ptr());
        }
        libc::_exit(1);
    }
}

#[cfg(test)]
pub(super) fn record_for_test(nr: u32, thread: &str) -> String {
    let mut name = [0u8; 16];
    name[..thread.len()].copy_from_slice(thread.as_bytes());
    let mut buf = Buf {
        bytes: [0; 512],
        len: 0,
    };
    record_json(&mut buf, nr, name);
    String::from_utf8_lossy(&buf.bytes[..buf.len]).into_owned()
}
