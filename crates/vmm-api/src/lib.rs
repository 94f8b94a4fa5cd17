//! ferrovmm's typed contract with whoever launches it (ferrovirtd's kvm driver, tests, people):
//!
//! - [`launch`]: the [`LaunchConfig`] a VM is started with, its one argv form
//!   ([`LaunchConfig::to_args`]) and the parsers ferrovmm's command line uses for each value;
//! - [`exit`]: the [`ExitRecord`] ferrovmm leaves in `--exit-file` saying how the VM ended;
//! - [`control`]: the messages of ferrovmm's control API (`GET /vm`, errors);
//! - [`restore`]: `PUT /vm/snapshot`'s request and `ferrovmm --restore`'s command line;
//! - [`DiskFormat`]: the one image-format type of the project (ferrovirt-disk and the
//!   domain definitions use it too).
//!
//! Serde only, so any process can speak the contract without linking a VMM.

pub mod control;
pub mod exit;
mod format;
pub mod jail;
mod kv;
pub mod launch;
pub mod restore;

pub use exit::{CrashCause, ExitReason, ExitRecord, SeccompViolation};
pub use format::{DiskFormat, UnknownFormat};
pub use jail::JailConfig;
pub use launch::{
    ConsoleMode, DiskCache, DiskConfig, LaunchConfig, LaunchError, LogLevel, Mac, NetBackend,
    NetConfig, SeccompMode, SerialMode,
};
pub use restore::{RestoreConfig, SnapshotReply, SnapshotRequest};
