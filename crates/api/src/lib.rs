//! ferrovirt-api: the types shared by ferrovirtd and the ferrovirt CLI.
//!
//! * [`def`]: domain definitions in the native TOML format (documented in docs/api/definition.md)
//! * [`xml`]: libvirt domain XML import/export for the elements ferrovirt supports
//! * [`state`]: domain states with reasons, summaries and lifecycle events
//! * [`error`]: API errors with stable codes
//! * [`http`]: hyper's HTTP/1.1 client for synchronous callers (CLI, the daemon's VMM client)
//! * [`client`]: a typed client for the ferrovirtd /v1 API (Unix socket, TCP, TLS)
//! * [`tls`]: rustls configurations for the TCP listener and its clients
//! * [`host`]: detection of the host's virtualization support (default driver)

pub mod client;
pub mod def;
pub mod error;
pub mod host;
pub mod http;
pub mod msg;
pub mod network;
pub mod state;
pub mod tls;
pub mod xml;

pub use def::{Action, DomainDef, VirtType};
pub use error::{ApiError, ErrorCode};
pub use state::{DomainInfo, DomainState, Event, StateReason};

/// Version string reported by `ferrovirt version` and `GET /v1/version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Default path of the daemon's API socket.
pub const DEFAULT_SOCKET: &str = "/run/ferrovirt/ferrovirtd.sock";
