//! Deadlines and cancellation for calls that wait on a VM: every driver call gets a [`Deadline`],
//! so a VM process that stops answering fails its own operation with a clear timeout error
//! instead of blocking a thread (and whoever waits on it) forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrovirt_api::{ApiError, ErrorCode};

/// Shared flag a job's operation polls; set by `domjobabort`.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// When a call must have finished, what it is (for messages), and its job's cancel token.
#[derive(Debug, Clone)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
    /// e.g. "domain 'web': shutdown".
    what: String,
    cancel: CancelToken,
}

impl Deadline {
    pub fn new(limit: Duration, what: impl Into<String>, cancel: CancelToken) -> Self {
        Deadline {
            at: Instant::now() + limit,
            limit,
            what: what.into(),
            cancel,
        }
    }

    /// A deadline nobody can cancel.
    pub fn after(limit: Duration, what: impl Into<String>) -> Self {
        Self::new(limit, what, CancelToken::default())
    }

    /// The same call with at most `limit` left (one polite step before a forceful one).
    pub fn within(&self, limit: Duration) -> Deadline {
        let mut d = self.clone();
        let at = Instant::now() + limit;
        if at < d.at {
            d.at = at;
            d.limit = limit;
        }
        d
    }

    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        Instant::now() >= self.at
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// Ok while time is left and nobody cancelled the job.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.cancelled() {
            return Err(self.cancelled_error());
        }
        if self.expired() {
            return Err(self.timeout("it did not finish in time"));
        }
        Ok(())
    }

    /// "domain 'web': shutdown timed out after 10 s: DETAIL".
    pub fn timeout(&self, detail: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Timeout,
            format!(
                "{} timed out after {}: {detail}",
                self.what,
                human(self.limit)
            ),
        )
    }

    pub fn cancelled_error(&self) -> ApiError {
        ApiError::new(
            ErrorCode::OperationInvalid,
            format!("{} was cancelled (domjobabort)", self.what),
        )
    }

    /// The socket timeout for the next read or write: what is left, never zero (zero means
    /// "no timeout" to the socket API).
    pub fn io_timeout(&self) -> Option<Duration> {
        Some(self.remaining().max(Duration::from_millis(1)))
    }
}

/// "10 s", or "250 ms" below a second.
pub fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_cancel_then_expiry_with_the_operation_named() {
        let cancel = CancelToken::default();
        let d = Deadline::new(Duration::from_secs(60), "domain 'a': start", cancel.clone());
        assert!(d.check().is_ok());
        cancel.cancel();
        let e = d.check().unwrap_err();
        assert!(e.message.contains("domain 'a': start was cancelled"), "{e}");
        let d = Deadline::after(Duration::ZERO, "domain 'b': shutdown");
        let e = d.check().unwrap_err();
        assert_eq!(e.code, ErrorCode::Timeout);
        assert!(
            e.message.starts_with("domain 'b': shutdown timed out"),
            "{e}"
        );
        assert!(d.io_timeout().unwrap() > Duration::ZERO);
        let short = Deadline::after(Duration::from_secs(60), "x").within(Duration::from_secs(2));
        assert!(short.remaining() <= Duration::from_secs(2));
    }
}
