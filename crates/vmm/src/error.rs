//! The error type of ferrovmm: every failure carries one line for the user
//! and maps to an exit status (2 for bad arguments, 1 for everything else).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The command line asked for something impossible: fix the arguments.
    Usage,
    /// The host or KVM refused or failed.
    Host,
    /// The guest did something the VMM cannot handle.
    Guest,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn usage(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Usage,
            message: message.into(),
        }
    }
    pub fn host(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Host,
            message: message.into(),
        }
    }
    pub fn guest(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Guest,
            message: message.into(),
        }
    }

    /// Exit status for this error: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            ErrorKind::Host | ErrorKind::Guest => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to a KVM ioctl failure.
pub fn kvm_err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> Error + '_ {
    move |e| Error::host(format!("{what} failed: {e}"))
}
