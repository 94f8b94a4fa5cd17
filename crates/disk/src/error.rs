//! The one error type of the library: each variant says what was wrong and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{path}: not a valid {format} image: {reason}")]
    InvalidImage {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: unsupported image feature: {feature}")]
    Unsupported { path: PathBuf, feature: String },
    #[error("{path}: image is corrupt: {reason}; run `ferrovirt img check -r all {path}` to repair it, or open it read-only")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: image is opened read-only; writes are refused")]
    ReadOnly { path: PathBuf },
    #[error("{path}: image is in use: {reason}; stop that process (e.g. the VM using it) first")]
    InUse { path: PathBuf, reason: String },
    #[error("request out of range: offset {offset} length {len} is beyond the disk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("backing chain of {path}: {reason}")]
    BackingChain { path: PathBuf, reason: String },
}

impl DiskError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DiskError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid_qcow2(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DiskError::InvalidImage {
            path: path.into(),
            format: "qcow2",
            reason: reason.into(),
        }
    }
}

impl From<ferrovmm_api::UnknownFormat> for DiskError {
    fn from(e: ferrovmm_api::UnknownFormat) -> Self {
        DiskError::InvalidArgument(e.to_string())
    }
}
