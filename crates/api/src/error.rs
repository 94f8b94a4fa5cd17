//! API errors: a stable machine-readable code plus a human message that says what to do.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable error codes. Scripts match on these strings; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body could not be parsed (malformed JSON, XML or TOML).
    MalformedBody,
    /// The definition parsed but is not valid (memory 0, bad name, missing file ...).
    InvalidDefinition,
    /// A request parameter is wrong (unknown query value, bad size ...).
    InvalidArgument,
    /// A domain with this name (or UUID) already exists.
    DomainExists,
    /// No domain with this name or UUID.
    NoDomain,
    /// No network with this name.
    NoNetwork,
    /// The operation is not valid in the domain's current state (start a running domain ...).
    OperationInvalid,
    /// The driver or feature does not support this yet.
    NotSupported,
    /// The hypervisor driver failed (VMM would not start, control socket error ...).
    DriverError,
    /// A storage volume already exists or could not be created.
    StorageError,
    /// Unknown path or method.
    NotFound,
    /// A bug or an unexpected host failure (database I/O ...).
    Internal,
    /// TCP listener: missing or wrong bearer token.
    Unauthorized,
    /// The request body is larger than the route's limit.
    PayloadTooLarge,
    /// The daemon has as many open connections as it allows; try again shortly.
    TooManyConnections,
    /// The request (headers or body) did not arrive in time.
    RequestTimeout,
    /// Another job runs on the domain (retry, or ask to wait with `?wait=SECONDS`).
    DomainBusy,
    /// The VM did not answer within the operation's deadline.
    Timeout,
    /// No snapshot with this name on the domain (or the domain has no current snapshot).
    NoSnapshot,
}

impl ErrorCode {
    /// The HTTP status the daemon answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::MalformedBody
            | ErrorCode::InvalidDefinition
            | ErrorCode::InvalidArgument => 400,
            ErrorCode::NoDomain
            | ErrorCode::NoNetwork
            | ErrorCode::NotFound
            | ErrorCode::NoSnapshot => 404,
            ErrorCode::DomainExists
            | ErrorCode::OperationInvalid
            | ErrorCode::StorageError
            | ErrorCode::DomainBusy => 409,
            ErrorCode::Timeout => 504,
            ErrorCode::NotSupported => 501,
            ErrorCode::DriverError | ErrorCode::Internal => 500,
            ErrorCode::Unauthorized => 401,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::TooManyConnections => 503,
            ErrorCode::RequestTimeout => 408,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedBody => "malformed_body",
            ErrorCode::InvalidDefinition => "invalid_definition",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::DomainExists => "domain_exists",
            ErrorCode::NoDomain => "no_domain",
            ErrorCode::NoNetwork => "no_network",
            ErrorCode::OperationInvalid => "operation_invalid",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::DriverError => "driver_error",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::DomainBusy => "domain_busy",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NoSnapshot => "no_snapshot",
        }
    }
}

/// An error as carried in API responses: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MalformedBody, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidDefinition, message)
    }
    pub fn no_domain(name: &str) -> Self {
        Self::new(
            ErrorCode::NoDomain,
            format!("domain '{name}' not found (see `ferrovirt list --all`)"),
        )
    }
    pub fn wrong_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::OperationInvalid, message)
    }
    pub fn driver(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::DriverError, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotSupported, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.message, self.code.as_str())
    }
}

impl std::error::Error for ApiError {}

/// Wire envelope for errors.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}
