//! A small QMP (QEMU Machine Protocol) client: line-delimited JSON over a Unix socket.
//!
//! Every command runs under a [`Deadline`]: the connect does not block when QEMU stopped
//! accepting (a stopped process with a full listen backlog), and every read and write is bounded,
//! so a QEMU that does not answer fails the call with a timeout error naming the operation.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ferrovirt_api::ApiError;
use serde_json::{json, Value};

use crate::deadline::Deadline;

/// A QMP line longer than this is refused (QEMU's answers to our commands are small).
const MAX_LINE: u64 = 1 << 20;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Why a connect attempt failed.
enum ConnectError {
    /// Nobody listens yet (QEMU still starting, or gone): retry for a short while.
    NotThere(std::io::Error),
    /// The listener exists but accepts nobody: retry until the deadline.
    Backlog,
    Other(std::io::Error),
}

/// One non-blocking connect (std's UnixStream::connect blocks while the backlog is full).
fn try_connect(path: &Path) -> Result<UnixStream, ConnectError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(ConnectError::Other(std::io::Error::other(
            "socket path too long",
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(ConnectError::Other(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket we own; OwnedFd closes it on every path.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => ConnectError::Backlog,
            Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => ConnectError::NotThere(e),
            _ => ConnectError::Other(e),
        });
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false).map_err(ConnectError::Other)?;
    Ok(stream)
}

/// One sendmsg(2) of `bytes` with `fd` attached as SCM_RIGHTS (QMP reads the descriptor with
/// the command it came with).
fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: BorrowedFd) -> std::io::Result<()> {
    let raw: libc::c_int = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is valid, the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one header and one int; the
    // header pointer is non-null for that size and the data is written within it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, raw);
    }
    // SAFETY: the socket is open, msg and everything it points to outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptor went with the first bytes; the rest of a short write follows plainly.
    let mut w = sock;
    w.write_all(&bytes[n as usize..])
}

impl Qmp {
    /// Connect (retrying up to `appear` while QEMU creates the socket, and until the deadline
    /// while it does not accept) and negotiate capabilities.
    pub fn connect(path: &Path, appear: Duration, deadline: &Deadline) -> Result<Qmp, ApiError> {
        let appear = deadline.within(appear);
        let stream = loop {
            match try_connect(path) {
                Ok(s) => break s,
                Err(ConnectError::Backlog) if deadline.expired() => {
                    return Err(deadline.timeout(
                        "QEMU does not accept connections on its QMP socket (is the VM process stopped?)",
                    ))
                }
                Err(ConnectError::NotThere(e)) if appear.expired() => {
                    return Err(ApiError::driver(format!(
                        "QMP socket {}: {e}",
                        path.display()
                    )))
                }
                Err(ConnectError::Other(e)) => {
                    return Err(ApiError::driver(format!(
                        "QMP socket {}: {e}",
                        path.display()
                    )))
                }
                Err(_) => {
                    deadline.check()?;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let writer = stream
            .try_clone()
            .map_err(|e| ApiError::driver(e.to_string()))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp
            .read_value(deadline)?
            .ok_or_else(|| ApiError::driver("QMP closed before its greeting"))?;
        if greeting.get("QMP").is_none() {
            return Err(ApiError::driver(format!(
                "unexpected QMP greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None, deadline)?;
        Ok(qmp)
    }

    fn read_value(&mut self, deadline: &Deadline) -> Result<Option<Value>, ApiError> {
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(deadline.io_timeout());
        let mut line = String::new();
        match (&mut self.reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => {
                Err(ApiError::driver("QMP line too long"))
            }
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| ApiError::driver(format!("bad QMP line: {e}"))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(deadline
                    .timeout("QEMU did not answer on its QMP socket (is the VM process stopped?)"))
            }
            Err(e) => Err(ApiError::driver(format!("QMP read: {e}"))),
        }
    }

    /// Run a command and return its "return" value; events arriving meanwhile are skipped.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: &Deadline,
    ) -> Result<Value, ApiError> {
        let line = Self::line(command, arguments);
        let _ = self.writer.set_write_timeout(deadline.io_timeout());
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Self::write_error(e, deadline))?;
        self.reply(command, deadline)
    }

    /// `getfd`: hand QEMU the descriptor `fd` under `name` (it travels with the command as
    /// SCM_RIGHTS), e.g. for a migration to or from a file the daemon opened.
    pub fn send_fd(
        &mut self,
        fd: BorrowedFd,
        name: &str,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        let line = Self::line("getfd", Some(json!({ "fdname": name })));
        let _ = self.writer.set_write_timeout(deadline.io_timeout());
        send_with_fd(&self.writer, line.as_bytes(), fd)
            .map_err(|e| Self::write_error(e, deadline))?;
        self.reply("getfd", deadline).map(|_| ())
    }

    fn line(command: &str, arguments: Option<Value>) -> String {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        line
    }

    fn write_error(e: std::io::Error, deadline: &Deadline) -> ApiError {
        if deadline.expired() {
            deadline.timeout("QEMU does not read its QMP socket")
        } else {
            ApiError::driver(format!("QMP write: {e}"))
        }
    }

    /// The answer to `command`: its "return" value or its error.
    fn reply(&mut self, command: &str, deadline: &Deadline) -> Result<Value, ApiError> {
        loop {
            let v = self
                .read_value(deadline)?
                .ok_or_else(|| ApiError::driver(format!("QMP closed during '{command}'")))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(ApiError::driver(format!(
                    "QMP '{command}': {}",
                    err.get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                )));
            }
        }
    }

    /// Block until the next event; None when QEMU closed the socket (it exited).
    pub fn next_event(&mut self) -> Option<Value> {
        let _ = self.reader.get_ref().set_read_timeout(None);
        loop {
            let mut line = String::new();
            match (&mut self.reader).take(MAX_LINE).read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.get("event").is_some() => return Some(v),
                    _ => continue,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A listener nobody accepts on stands for a stopped QEMU: connect and read are bounded.
    #[test]
    fn a_silent_peer_times_out_with_the_operation_named() {
        let dir = std::env::temp_dir().join(format!("fv-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("q.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = UnixListener::bind(&path).unwrap();
        let deadline = Deadline::after(Duration::from_millis(300), "domain 'x': shutdown");
        let e = match Qmp::connect(&path, Duration::from_millis(100), &deadline) {
            Err(e) => e,
            Ok(_) => panic!("connected to a peer that never greets"),
        };
        assert_eq!(e.code, ferrovirt_api::ErrorCode::Timeout, "{e}");
        assert!(e.message.contains("domain 'x': shutdown timed out"), "{e}");
        // A full backlog: connects beyond it are refused at once (EAGAIN), then time out.
        let mut held = Vec::new();
        for _ in 0..512 {
            match try_connect(&path) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        let deadline = Deadline::after(Duration::from_millis(200), "domain 'x': reset");
        let e = match Qmp::connect(&path, Duration::from_millis(100), &deadline) {
            Err(e) => e,
            Ok(_) => panic!("connected past a full backlog"),
        };
        assert_eq!(e.code, ferrovirt_api::ErrorCode::Timeout, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
