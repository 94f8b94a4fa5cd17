//! Live migration between two ferrovmm processes over a Unix socket or TCP.
//!
//! Wire format: an 8-byte magic and a version, then messages `[u32 kind][u64 len][payload]`,
//! every length checked against a limit before anything is allocated:
//! - CONFIG (source to destination): the `LaunchConfig` as JSON;
//! - PAGES: repeated `[u64 guest-physical address][4096 bytes]`;
//! - STATE: a snapshot state container (`snapshot::encode`), CRC'd;
//! - READY (destination to source): the machine is built (or `{"error": ...}`);
//! - GO (source to destination): the source has stopped for good; run the guest.
//!
//! The source sends all non-zero RAM, then rounds of the pages KVM's dirty log says the
//! guest wrote since, until what is left fits the downtime limit; then it pauses the
//! vCPUs, sends the last pages and the state, waits for READY and sends GO. Until GO is
//! written, any failure or the timeout leaves the VM running on the source; after GO,
//! only the destination runs it (never both).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::lifecycle::StopReason;
use crate::memory::{self, GuestMemoryMmap, PAGE_SIZE};
use crate::vm::{Machine, MemorySource, Origin};

const MAGIC: &[u8; 8] = b"FERROMIG";
const VERSION: u32 = 1;
const KIND_CONFIG: u32 = 1;
const KIND_PAGES: u32 = 2;
const KIND_STATE: u32 = 3;
const KIND_READY: u32 = 4;
const KIND_GO: u32 = 5;
/// Pages per PAGES message.
const PAGES_PER_MESSAGE: usize = 256;
const PAGE_RECORD: usize = 8 + PAGE_SIZE;
const MAX_CONFIG: u64 = 1 << 20;
/// Pre-copy gives up converging after this many rounds and stops the guest anyway.
const MAX_ROUNDS: u32 = 30;

/// Where the destination listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Address::Unix(PathBuf::from(p))),
            Some(("tcp", hp))
                if hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Address::Tcp(hp.to_string()))
            }
            _ => Err(format!(
                "'{s}' is not a migration address (unix:PATH or tcp:HOST:PORT)"
            )),
        }
    }
}

/// One connection, whichever transport.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Conn::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Conn::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

fn send(conn: &mut Conn, kind: u32, payload: &[u8]) -> std::result::Result<(), String> {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&kind.to_le_bytes());
    head[4..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    conn.write_all(&head)
        .and_then(|_| conn.write_all(payload))
        .map_err(|e| format!("sending to the destination: {e}"))
}

/// Reads one message, refusing one longer than the limit for its kind.
fn receive_msg(conn: &mut Conn) -> std::result::Result<(u32, Vec<u8>), String> {
    let mut head = [0u8; 12];
    conn.read_exact(&mut head)
        .map_err(|e| format!("the peer closed the connection or stalled: {e}"))?;
    let kind = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[4..]);
    let len = u64::from_le_bytes(len);
    let limit = match kind {
        KIND_CONFIG | KIND_READY | KIND_GO => MAX_CONFIG,
        KIND_PAGES => (PAGES_PER_MESSAGE * PAGE_RECORD) as u64,
        KIND_STATE => crate::snapshot::MAX_PAYLOAD + 64,
        _ => return Err(format!("unknown message kind {kind}")),
    };
    if len > limit {
        return Err(format!(
            "a message of {len} bytes (kind {kind}); the limit is {limit}"
        ));
    }
    let mut payload = vec![0u8; len as usize];
    conn.read_exact(&mut payload)
        .map_err(|e| format!("the peer closed the connection mid-message: {e}"))?;
    Ok((kind, payload))
}

// ---------------------------------------------------------------------------
// Source side.

/// `PUT /vm/migrate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub destination: String,
    /// The longest pause the guest should see; pre-copy runs until the rest fits.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// The whole migration must be done by then, or it is abandoned (VM keeps running here).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_downtime() -> u64 {
    300
}
fn default_timeout() -> u64 {
    60
}

/// `GET /vm/migration`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MigrationStatus {
    /// active, completed or failed.
    pub state: &'static str,
    pub destination: String,
    pub round: u32,
    pub bytes_sent: u64,
    /// Pages the guest dirtied during the last round.
    pub dirty_pages: u64,
    /// MiB per second the guest dirtied memory at in the last round.
    pub dirty_rate_mib_s: f64,
    /// What sending the rest now would take, at the measured bandwidth.
    pub expected_downtime_ms: f64,
    /// How long the guest was paused (once completed).
    pub downtime_ms: Option<f64>,
    pub error: Option<String>,
}

/// The migration of this VM, shared by the API and the migration thread.
#[derive(Default)]
pub struct Tracker {
    status: Mutex<Option<MigrationStatus>>,
}

impl Tracker {
    pub fn status(&self) -> Option<MigrationStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        if let Some(s) = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            f(s);
        }
    }
}

/// Starts migrating `machine` on its own thread; refuses a second one or a bad request.
pub fn start(machine: Arc<Machine>, req: MigrateRequest) -> std::result::Result<(), String> {
    let address: Address = req.destination.parse()?;
    if req.timeout_s == 0 || req.timeout_s > 24 * 3600 {
        return Err("timeout_s must be 1 to 86400".into());
    }
    {
        let mut st = machine
            .migration
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if st.as_ref().is_some_and(|s| s.state == "active") {
            return Err("a migration is already running".into());
        }
        *st = Some(MigrationStatus {
            state: "active",
            destination: req.destination.clone(),
            ..Default::default()
        });
    }
    let m = machine.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Migration);
            let started = Instant::now();
            let result = migrate(&m, &address, &req);
            m.migration.update(|s| match &result {
                Ok(downtime) => {
                    s.state = "completed";
                    s.downtime_ms = Some(*downtime);
                }
                Err(e) => {
                    s.state = "failed";
                    s.error = Some(e.clone());
                }
            });
            match result {
                Ok(_) => {
                    log::info!("migrated in {:?}", started.elapsed());
                    m.lifecycle.request_stop(StopReason::Migrated);
                }
                Err(e) => log::warn!("migration to {} failed: {e}", req.destination),
            }
        })
        .map_err(|e| format!("cannot start the migration thread: {e}"))?;
    Ok(())
}

fn connect(address: &Address, timeout: Duration) -> std::result::Result<Conn, String> {
    let conn = match address {
        Address::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
        Address::Tcp(hp) => {
            use std::net::ToSocketAddrs;
            let addr = hp
                .to_socket_addrs()
                .map_err(|e| format!("{hp}: {e}"))?
                .next()
                .ok_or_else(|| format!("{hp}: no address"))?;
            TcpStream::connect_timeout(&addr, timeout).map(|s| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            })
        }
    }
    .map_err(|e| format!("cannot connect to the destination: {e}"))?;
    conn.set_timeout(timeout)
        .map_err(|e| format!("socket timeout: {e}"))?;
    Ok(conn)
}

/// Sends the given pages of each region; returns the bytes sent.
fn send_pages(
    conn: &mut Conn,
    mem: &GuestMemoryMmap,
    pages: &[Vec<usize>],
) -> std::result::Result<u64, String> {
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(PAGES_PER_MESSAGE * PAGE_RECORD);
    let mut page = vec![0u8; PAGE_SIZE];
    for (region, list) in mem.iter().zip(pages) {
        for &p in list {
            let gpa = region.start_addr().0 + (p * PAGE_SIZE) as u64;
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| format!("reading guest page {gpa:#x}: {e}"))?;
            buf.extend_from_slice(&gpa.to_le_bytes());
            buf.extend_from_slice(&page);
            if buf.len() == PAGES_PER_MESSAGE * PAGE_RECORD {
                send(conn, KIND_PAGES, &buf)?;
                sent += buf.len() as u64;
                buf.clear();
            }
        }
    }
    if !buf.is_empty() {
        send(conn, KIND_PAGES, &buf)?;
        sent += buf.len() as u64;
    }
    Ok(sent)
}

/// Runs the migration; on success returns the guest's downtime in ms. On failure the
/// VM is left as it was found (running, or paused if it was paused).
fn migrate(
    machine: &Machine,
    address: &Address,
    req: &MigrateRequest,
) -> std::result::Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(req.timeout_s);
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut conn = connect(address, left())?;
    let was_paused = machine.vcpus.pause.is_paused();
    let config = serde_json::to_vec(&machine.config).map_err(|e| e.to_string())?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    conn.write_all(&hello)
        .map_err(|e| format!("sending to the destination: {e}"))?;
    send(&mut conn, KIND_CONFIG, &config)?;

    // Devices stay quiet for the whole migration: their writes to guest memory are
    // not in KVM's dirty log, so they must not happen while RAM is copied.
    machine.devices.pause_io();
    memory::set_dirty_logging(&machine.vm, &machine.mem, true).map_err(|e| {
        machine.devices.resume_io();
        e.to_string()
    })?;
    let mut paused_here = false;
    let result = (|| {
        // Round 0: everything the guest ever wrote. The log is cleared first, so
        // round 1 sends what changed during round 0.
        memory::take_dirty_pages(&machine.vm, &machine.mem).map_err(|e| e.to_string())?;
        let all: Vec<Vec<usize>> = machine.mem.iter().map(memory::nonzero_pages).collect();
        let round_start = Instant::now();
        let mut bytes = send_pages(&mut conn, &machine.mem, &all)?;
        let mut bandwidth = bytes as f64 / round_start.elapsed().as_secs_f64().max(1e-6);
        machine.migration.update(|s| s.bytes_sent = bytes);
        let mut round = 0;
        let mut round_time = round_start.elapsed();
        loop {
            conn.set_timeout(left()).map_err(|e| e.to_string())?;
            if left().is_zero() {
                return Err(format!("timed out after {} s", req.timeout_s));
            }
            let dirty =
                memory::take_dirty_pages(&machine.vm, &machine.mem).map_err(|e| e.to_string())?;
            let count: usize = dirty.iter().map(Vec::len).sum();
            let dirty_bytes = (count * PAGE_RECORD) as f64;
            let expected_ms = dirty_bytes / bandwidth * 1000.0;
            round += 1;
            let rate =
                (count * PAGE_SIZE) as f64 / (1 << 20) as f64 / round_time.as_secs_f64().max(1e-6);
            machine.migration.update(|s| {
                s.round = round;
                s.dirty_pages = count as u64;
                s.dirty_rate_mib_s = rate;
                s.expected_downtime_ms = expected_ms;
            });
            if expected_ms <= req.downtime_ms as f64 || round >= MAX_ROUNDS {
                // Stop and copy.
                let paused_at = Instant::now();
                machine.vcpus.pause();
                paused_here = !was_paused;
                let mut last = memory::take_dirty_pages(&machine.vm, &machine.mem)
                    .map_err(|e| e.to_string())?;
                for (l, d) in last.iter_mut().zip(dirty) {
                    l.extend(d);
                    l.sort_unstable();
                    l.dedup();
                }
                bytes += send_pages(&mut conn, &machine.mem, &last)?;
                let state = machine.save_state()?;
                let container = crate::snapshot::encode(&crate::snapshot::Payload {
                    ferrovmm_version: env!("CARGO_PKG_VERSION").to_string(),
                    launch: machine.config.clone(),
                    memory_bytes: memory::total_bytes(&machine.mem),
                    machine: state,
                })?;
                send(&mut conn, KIND_STATE, &container)?;
                bytes += container.len() as u64;
                machine.migration.update(|s| s.bytes_sent = bytes);
                let (kind, payload) = receive_msg(&mut conn)?;
                if kind != KIND_READY {
                    return Err(format!("the destination answered with message kind {kind}"));
                }
                let ready: Ready = serde_json::from_slice(&payload)
                    .map_err(|e| format!("the destination's answer: {e}"))?;
                if let Some(e) = ready.error {
                    return Err(format!("the destination refused the VM: {e}"));
                }
                // The point of no return: once GO is written, the guest runs there.
                send(&mut conn, KIND_GO, b"{}")?;
                let _ = conn.flush();
                return Ok(paused_at.elapsed().as_secs_f64() * 1000.0);
            }
            let start = Instant::now();
            let sent = send_pages(&mut conn, &machine.mem, &dirty)?;
            round_time = start.elapsed();
            bandwidth = sent as f64 / round_time.as_secs_f64().max(1e-6);
            bytes += sent;
            machine.migration.update(|s| s.bytes_sent = bytes);
        }
    })();
    if result.is_err() {
        let _ = memory::set_dirty_logging(&machine.vm, &machine.mem, false);
        machine.devices.resume_io();
        if paused_here {
            machine.vcpus.resume();
        }
    }
    result
}

#[derive(Serialize, Deserialize)]
struct Ready {
    error: Option<String>,
}

// ---------------------------------------------------------------------------
// Destination side.

fn accept(address: &Address) -> Result<Conn> {
    match address {
        Address::Unix(p) => {
            let listener = crate::console::bind_socket(p, "--incoming")?;
            let (s, _) = listener
                .accept()
                .map_err(|e| Error::host(format!("--incoming: {e}")))?;
            let _ = std::fs::remove_file(p);
            Ok(Conn::Unix(s))
        }
        Address::Tcp(hp) => {
            let listener = std::net::TcpListener::bind(hp)
                .map_err(|e| Error::usage(format!("--incoming tcp:{hp}: {e}")))?;
            let (s, _) = listener
                .accept()
                .map_err(|e| Error::host(format!("--incoming: {e}")))?;
            let _ = s.set_nodelay(true);
            Ok(Conn::Tcp(s))
        }
    }
}

/// Keeps a listening Unix socket from outliving a failed destination.
fn remove_socket(address: &Address) {
    if let Address::Unix(p) = address {
        let _ = std::fs::remove_file(p);
    }
}

/// `ferrovmm --incoming ADDRESS`: receives a VM, builds it and runs it once the source
/// has let go. Any failure before that exits non-zero with the reason.
pub fn receive(r: &crate::restore::RestoreArgs, address: &str) -> Result<i32> {
    let address: Address = address.parse().map_err(Error::usage)?;
    let mut conn = accept(&address);
    remove_socket(&address);
    let conn = conn.as_mut().map_err(|e| Error::host(e.to_string()))?;
    // A source that stalls this long is gone.
    conn.set_timeout(Duration::from_secs(60))
        .map_err(|e| Error::host(e.to_string()))?;
    let fail = |e: String| Error::host(format!("migration failed: {e}"));
    let mut hello = [0u8; 12];
    conn.read_exact(&mut hello)
        .map_err(|e| fail(format!("no greeting from the source: {e}")))?;
    if &hello[..8] != MAGIC {
        return Err(fail("the peer is not a ferrovmm migration source".into()));
    }
    let version = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]);
    if version != VERSION {
        return Err(fail(format!(
            "migration protocol version {version}; this ferrovmm speaks {VERSION}"
        )));
    }
    let (kind, payload) = receive_msg(conn).map_err(fail)?;
    if kind != KIND_CONFIG {
        return Err(fail(format!(
            "expected the configuration, got message kind {kind}"
        )));
    }
    let saved: crate::config::LaunchConfig =
        serde_json::from_slice(&payload).map_err(|e| fail(format!("the configuration: {e}")))?;
    let config = crate::restore::configure(r, &saved)?;
    let mem = memory::create_guest_memory(config.memory_mib << 20)?;
    let payload = loop {
        let (kind, payload) = receive_msg(conn).map_err(fail)?;
        match kind {
            KIND_PAGES => {
                if payload.len() % PAGE_RECORD != 0 {
                    return Err(fail("a page message of a broken length".into()));
                }
                for rec in payload.chunks_exact(PAGE_RECORD) {
                    let mut gpa = [0u8; 8];
                    gpa.copy_from_slice(&rec[..8]);
                    let gpa = u64::from_le_bytes(gpa);
                    if gpa % PAGE_SIZE as u64 != 0 {
                        return Err(fail(format!("page address {gpa:#x} is not page aligned")));
                    }
                    mem.write_slice(&rec[8..], GuestAddress(gpa))
                        .map_err(|_| fail(format!("page {gpa:#x} is outside guest memory")))?;
                }
            }
            KIND_STATE => {
                break crate::snapshot::decode(&payload)
                    .map_err(|e| fail(format!("the VM state: {e}")))?
            }
            other => return Err(fail(format!("unexpected message kind {other}"))),
        }
    };
    let built = (|| {
        crate::restore::check_host_cpu(&payload.machine)?;
        let expected = memory::total_bytes(&mem);
        if payload.memory_bytes != expected {
            return Err(Error::usage(format!(
                "the source has {} bytes of RAM, the configuration {expected}",
                payload.memory_bytes
            )));
        }
        crate::start_machine(
            &config,
            Origin::Restore {
                memory: MemorySource::Ready(mem),
                state: Box::new(payload.machine),
            },
        )
    })();
    let ready = Ready {
        error: built.as_ref().err().map(|e| e.to_string()),
    };
    let answer = serde_json::to_vec(&ready).unwrap_or_default();
    let sent = send(conn, KIND_READY, &answer);
    let started = built?;
    sent.map_err(fail)?;
    match receive_msg(conn) {
        Ok((KIND_GO, _)) => {}
        Ok((kind, _)) => return Err(fail(format!("expected GO, got message kind {kind}"))),
        Err(e) => return Err(fail(format!("the source did not let go of the VM: {e}"))),
    }
    crate::serve_machine(&config, started, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Address>(),
            Ok(Address::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:24001".parse::<Address>(),
            Ok(Address::Tcp("127.0.0.1:24001".into()))
        );
        assert!("tcp:127.0.0.1".parse::<Address>().is_err());
        assert!("udp:x:1".parse::<Address>().is_err());
        assert!("unix:".parse::<Address>().is_err());
    }
}
