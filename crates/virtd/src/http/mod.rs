//! Serving the /v1 API with hyper (HTTP/1.1) on tokio, on the Unix socket and the optional
//! TCP/TLS listener. Everything a client controls is bounded here: connections, header size and
//! count, body size per route, and the time to send headers and body; a panic while answering a
//! request becomes a 500 for that request only.

mod auth;
mod console;
mod events;
pub mod listen;
mod service;
mod stall;

use std::time::Duration;

/// The limits in force (command line: --max-connections, --read-timeout).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections (all listeners together, console and event streams included); one more
    /// gets a 503 and is closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and then its body (each).
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// Request line plus headers, in bytes (hyper answers 431 beyond, as it does beyond its
/// default of 100 headers).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper's read buffer per connection (bounds what one connection holds before parsing).
pub const READ_BUFFER: usize = 64 * 1024;
/// A write that makes no progress this long ends its connection (a client that stops reading).
pub const WRITE_STALL: Duration = Duration::from_secs(30);
