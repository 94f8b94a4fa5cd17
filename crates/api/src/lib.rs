//! ferrovirt-api: the types shared by ferrovirtd and the ferrovirt CLI.
//!
//! * [`def`]: domain definitions in the native TOML format (documented in docs/api/definition.md)
//! * [`engine`]: which program runs a domain (ferrovmm, QEMU with kvm or tcg) and why
//! * [`xml`]: libvirt domain XML import/export for the elements ferrovirt supports
//! * [`xml_limits`]: the one way XML input is parsed: depth, element and attribute limits
//! * [`state`]: domain states with reasons, summaries and lifecycle events
//! * [`error`]: API errors with stable codes
//! * [`http`]: hyper's HTTP/1.1 client for synchronous callers (CLI, the daemon's VMM client)
//! * [`client`]: a typed client for the ferrovirtd /v1 API (Unix socket, TCP, TLS)
//! * [`tls`]: rustls configurations for the TCP listener and its clients
//! * [`size`]: memory sizes with libvirt's units, in KiB
//! * [`host`]: detection of the host's virtualization support (default driver)
//! * [`op`]: the typed domain operations; [`job`]: a domain's running job
//! * [`snapshot`]: domain snapshots (requests, metadata, libvirt's `<domainsnapshot>` XML)
//! * [`save`]: save, restore and managed save requests

pub mod client;
pub mod def;
pub mod engine;
pub mod error;
pub mod host;
pub mod http;
pub mod job;
pub mod msg;
pub mod netmark;
pub mod network;
pub mod op;
pub mod save;
pub mod size;
pub mod snapshot;
pub mod state;
pub mod tls;
pub mod xml;
pub mod xml_limits;

pub use def::{Action, DomainDef, VirtType};
pub use error::{ApiError, ErrorCode};
pub use job::{JobInfo, JobKind, JobProgress, JobStatus};
pub use op::DomainOp;
pub use state::{DomainInfo, DomainState, Event, StateReason};

/// Version string reported by `ferrovirt version` and `GET /v1/version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Default path of the daemon's API socket.
pub const DEFAULT_SOCKET: &str = "/run/ferrovirt/ferrovirtd.sock";
