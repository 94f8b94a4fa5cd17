//! Accept loops for the Unix socket and the TCP/TLS listener: a connection limit shared by both
//! (one more gets a short 503), back-off instead of a spin when accept fails (EMFILE ...), and
//! hyper's HTTP/1.1 connection with the header limits and timeout.

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::stall::StallGuard;
use super::{service, Limits, MAX_HEADER_BYTES, READ_BUFFER, WRITE_STALL};
use crate::manager::Manager;
use crate::memory::{self, Activity};

/// What every connection's requests are served with.
pub struct Shared {
    pub mgr: Arc<Manager>,
    pub limits: Limits,
    /// Requests in flight and served, for the idle trimmer.
    pub activity: Arc<Activity>,
}

/// The TCP listener's settings: its bearer token, and TLS if configured.
pub struct TcpAuth {
    pub token: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Connections refused with a 503 at the same time; beyond, they are just closed.
const MAX_REFUSING: usize = 32;

struct Gate {
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
}

/// Serve on the Unix socket, and on TCP when given, until the process ends.
pub async fn serve(
    mgr: Arc<Manager>,
    limits: Limits,
    unix: std::os::unix::net::UnixListener,
    tcp: Option<(std::net::TcpListener, TcpAuth)>,
) -> io::Result<()> {
    let activity = Arc::new(Activity::default());
    tokio::spawn(memory::trim_when_idle(
        activity.clone(),
        memory::TRIM_PERIOD,
        memory::trim,
    ));
    let shared = Arc::new(Shared {
        mgr,
        limits,
        activity,
    });
    let gate = Arc::new(Gate {
        open: Arc::new(Semaphore::new(limits.max_connections)),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
    });
    unix.set_nonblocking(true)?;
    let unix = UnixListener::from_std(unix)?;
    if let Some((listener, auth)) = tcp {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        tokio::spawn(accept_tcp(
            listener,
            Arc::new(auth),
            shared.clone(),
            gate.clone(),
        ));
    }
    loop {
        let stream = match unix.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                back_off(&e).await;
                continue;
            }
        };
        if let Some(permit) = admit(&gate, stream) {
            let (stream, permit) = permit;
            tokio::spawn(serve_connection(stream, shared.clone(), None, permit));
        }
    }
}

async fn accept_tcp(
    listener: TcpListener,
    auth: Arc<TcpAuth>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
) {
    let tls = auth.tls.clone().map(TlsAcceptor::from);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                back_off(&e).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some((stream, permit)) = (match &tls {
            Some(_) => gate
                .open
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|p| (stream, p)),
            // In TLS there is no plaintext 503 to send before the handshake: close instead.
            None => admit(&gate, stream),
        }) else {
            continue;
        };
        let shared = shared.clone();
        let auth = auth.clone();
        match &tls {
            None => {
                tokio::spawn(serve_connection(stream, shared, Some(auth), permit));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let deadline = shared.limits.read_timeout;
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(deadline, acceptor.accept(stream)).await
                    {
                        serve_connection(tls, shared, Some(auth), permit).await;
                    }
                });
            }
        }
    }
}

/// A connection within the limit gets its permit; one beyond it a 503 (in a bounded number of
/// small tasks) and is closed.
fn admit<S>(gate: &Gate, stream: S) -> Option<(S, OwnedSemaphorePermit)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match gate.open.clone().try_acquire_owned() {
        Ok(permit) => Some((stream, permit)),
        Err(_) => {
            if let Ok(slot) = gate.refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), refuse(stream)).await;
                    drop(slot);
                });
            }
            None
        }
    }
}

const BUSY: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: ";

/// Answer 503, then read (and drop) what the client sends until it closes, so the answer is not
/// lost to a reset.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let body = super::service::error_json(&ferrovirt_api::ApiError::new(
        ferrovirt_api::ErrorCode::TooManyConnections,
        "ferrovirtd has too many open connections; try again shortly",
    ));
    let answer = format!("{BUSY}{}\r\n\r\n{body}", body.len());
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n.min(left),
        }
    }
}

/// accept() failed: out of file descriptors or memory, or the peer left early. Wait a moment
/// instead of retrying at once (which would spin while the condition lasts).
async fn back_off(e: &io::Error) {
    /// When the last such message was logged (seconds since the epoch): at most one per minute.
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let pause = match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if now >= LOGGED.load(Ordering::Relaxed) + 60 {
                LOGGED.store(now, Ordering::Relaxed);
                eprintln!("ferrovirtd: accept: {e}; pausing new connections for 100 ms at a time");
            }
            Duration::from_millis(100)
        }
        _ => Duration::from_millis(1),
    };
    tokio::time::sleep(pause).await;
}

/// One HTTP/1.1 connection (keep-alive allowed; idle connections end at the header timeout).
async fn serve_connection<I>(
    io: I,
    shared: Arc<Shared>,
    auth: Option<Arc<TcpAuth>>,
    permit: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Shared with upgraded console streams, which outlive this function.
    let permit = Arc::new(permit);
    let read_timeout = shared.limits.read_timeout;
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let auth = auth.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(service::handle(req, shared, auth, permit).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size(READ_BUFFER)
        .max_header_size(MAX_HEADER_BYTES)
        // `printf 'GET ...' | nc -U SOCKET` closes its side after the request: still answer.
        .half_close(true)
        .serve_connection(TokioIo::new(StallGuard::new(io, WRITE_STALL)), svc)
        .with_upgrades();
    let _ = conn.await;
}
