//! The control API: HTTP/1.1 + JSON on a Unix socket, served by hyper on its own thread
//! (a current-thread tokio runtime).
//!
//! Resources: `GET /vm`, `PUT /vm/{pause,resume,power-button,reset,stop}`, `GET /vm/counters`,
//! `PUT /vm/snapshot` (the one resource with a body).
//! The OpenAPI description is docs/ferrovmm-api.yaml.
//!
//! Nothing a client sends can take the VM down: headers are bounded in size and count and must
//! arrive within a deadline, no resource takes a body (one announced larger than
//! [`MAX_REQUEST_BODY`] gets 413 before a byte of it is read; chunked bodies are read through a
//! cap), connections are limited in number (503 beyond) and in lifetime.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrovmm_api::control::{ErrorBody, VmInfo, VmState, MAX_REQUEST_BODY};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::lifecycle::StopReason;
use crate::vm::Machine;

/// Connections served at once; one more gets a 503 and is closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Request line plus headers.
pub const MAX_HEADER_BYTES: usize = 8 << 10;
pub const MAX_HEADERS: usize = 32;
/// A client must send its request headers within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// And a body (there should be none) within this one.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, however it behaves; time spent carrying out its requests
/// (a snapshot of a large VM on a slow disk) does not count.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The whole answer to a connection beyond [`MAX_CONNECTIONS`].
fn busy_response() -> Vec<u8> {
    let body = serde_json::to_string(&ErrorBody::new(
        "busy",
        format!("more than {MAX_CONNECTIONS} API connections; try again shortly"),
    ))
    .unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A response ready to send: status and optional JSON body.
struct Reply {
    status: StatusCode,
    body: Option<String>,
    /// Ends the VM once this answer is out and the connection closed (the process exits soon
    /// after a stop, so stopping first could lose the answer).
    then_stop: Option<StopReason>,
}

impl Reply {
    fn json<T: Serialize>(status: StatusCode, value: &T) -> Self {
        Reply {
            status,
            body: Some(serde_json::to_string(value).unwrap_or_else(|_| "{}".into())),
            then_stop: None,
        }
    }
    fn no_content() -> Self {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            then_stop: None,
        }
    }
    fn stop_after(reason: StopReason) -> Self {
        Reply {
            then_stop: Some(reason),
            ..Reply::no_content()
        }
    }
    fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Reply::json(status, &ErrorBody::new(code, message))
    }

    fn into_response(self, close: bool, pending_stop: &PendingStop) -> Response<Full<Bytes>> {
        let close = close || self.then_stop.is_some();
        if let Some(reason) = self.then_stop {
            *pending_stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        }
        let mut resp = Response::new(Full::new(Bytes::from(
            self.body.clone().unwrap_or_default(),
        )));
        *resp.status_mut() = self.status;
        if self.body.is_some() {
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if close {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Binds the API socket (replacing a stale one, mode 0600) and serves it on a thread.
pub fn serve(path: &Path, machine: Arc<Machine>) -> Result<()> {
    // Bind ourselves so a stale socket file and permission problems get a clear error.
    let listener = crate::console::bind_socket(path, "--api-socket")?;
    let bad = |e: std::io::Error| Error::host(format!("--api-socket {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bad)?;
    listener.set_nonblocking(true).map_err(bad)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        // Requests run on these (pause waits for every vCPU): one per connection at most.
        .max_blocking_threads(MAX_CONNECTIONS)
        .thread_stack_size(256 << 10)
        // Blocking-pool threads inherit the API thread's seccomp filter; a violation names them.
        .thread_name("api-worker")
        .on_thread_start(crate::seccomp::name_this_thread)
        .build()
        .map_err(|e| Error::host(format!("cannot start the API runtime: {e}")))?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::UnixListener::from_std(listener).map_err(bad)?
    };
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 << 10)
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Api);
            runtime.block_on(accept_loop(listener, machine))
        })
        .map_err(|e| Error::host(format!("cannot start the API thread: {e}")))?;
    Ok(())
}

fn connection_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_BYTES)
        // A client may shut down its sending side once its request is out.
        .half_close(true);
    b
}

async fn accept_loop(listener: tokio::net::UnixListener, machine: Arc<Machine>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let builder = Arc::new(connection_builder());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait for some to be freed instead of spinning.
                log::warn!("API socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // One non-blocking write of a short answer, then close: a flood costs no memory.
            let _ = stream.try_write(&busy_response());
            continue;
        };
        let machine = machine.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let pending_stop = PendingStop::default();
            let working = Arc::new(AtomicUsize::new(0));
            let service = {
                let (machine, pending_stop, working) =
                    (machine.clone(), pending_stop.clone(), working.clone());
                hyper::service::service_fn(move |req| {
                    let (machine, pending_stop, working) =
                        (machine.clone(), pending_stop.clone(), working.clone());
                    async move {
                        Ok::<_, Infallible>(handle(machine, req, &pending_stop, &working).await)
                    }
                })
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let mut deadline = tokio::time::Instant::now() + CONNECTION_LIFETIME;
            loop {
                match tokio::time::timeout_at(deadline, conn.as_mut()).await {
                    Ok(done) => {
                        if let Err(e) = done {
                            log::debug!("API connection: {e}");
                        }
                        break;
                    }
                    Err(_) if working.load(Ordering::SeqCst) == 0 => {
                        log::debug!("API connection closed after {CONNECTION_LIFETIME:?}");
                        break;
                    }
                    Err(_) => deadline = tokio::time::Instant::now() + CONNECTION_LIFETIME,
                }
            }
            let stop = pending_stop
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(reason) = stop {
                machine.lifecycle.request_stop(reason);
            }
            drop(slot);
        });
    }
}

/// A stop asked for on a connection, carried out when the connection is done.
type PendingStop = Arc<std::sync::Mutex<Option<StopReason>>>;

/// Counts a request being carried out on its connection while it lives.
struct Working(Arc<AtomicUsize>);

impl Working {
    fn start(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Working(counter.clone())
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    machine: Arc<Machine>,
    req: Request<Incoming>,
    pending_stop: &PendingStop,
    working: &Arc<AtomicUsize>,
) -> Response<Full<Bytes>> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY) {
        return body_too_large().into_response(true, pending_stop);
    }
    let (parts, body) = req.into_parts();
    // Read what there is (chunked included) through the cap, within a deadline.
    let read = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, MAX_REQUEST_BODY as usize).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return body_too_large().into_response(true, pending_stop)
        }
        Ok(Err(_)) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the request body is malformed",
            )
            .into_response(true, pending_stop)
        }
        Err(_) => {
            return Reply::error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            )
            .into_response(true, pending_stop)
        }
    };
    // Off the connection thread: a pause that waits for a busy vCPU must not hold up the
    // other connections (GET /vm, stop).
    let path = parts.uri.path().to_string();
    let _working = Working::start(working);
    let reply = tokio::task::spawn_blocking(move || route(&machine, &parts.method, &path, &body))
        .await
        .unwrap_or_else(|_| {
            Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request could not be carried out",
            )
        });
    reply.into_response(false, pending_stop)
}

/// `PUT /vm/snapshot {"path": DIR}`: writes DIR/state and DIR/memory of a paused VM.
fn snapshot(machine: &Machine, body: &[u8]) -> Reply {
    use crate::snapshot::SnapshotError;
    let req: ferrovmm_api::SnapshotRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("PUT /vm/snapshot takes {{\"path\": DIR}}: {e}"),
            )
        }
    };
    match crate::snapshot::take(machine, &req.path) {
        Ok(report) => Reply::json(StatusCode::OK, &report),
        Err(e @ SnapshotError::Running) => {
            Reply::error(StatusCode::CONFLICT, "vm_running", e.to_string())
        }
        Err(SnapshotError::Invalid(m)) => Reply::error(StatusCode::BAD_REQUEST, "bad_request", m),
        Err(SnapshotError::Host(m)) => {
            Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "snapshot_failed", m)
        }
    }
}

/// `PUT /vm/migrate {"destination", "downtime_ms", "timeout_s"}`: starts a live
/// migration on its own thread; `GET /vm/migration` follows it.
fn migrate(machine: &Arc<Machine>, body: &[u8]) -> Reply {
    let req: crate::migration::MigrateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("PUT /vm/migrate takes {{\"destination\": \"unix:PATH|tcp:HOST:PORT\", \"downtime_ms\": N, \"timeout_s\": N}}: {e}"),
            )
        }
    };
    match crate::migration::start(machine.clone(), req) {
        Ok(()) => Reply::json(StatusCode::ACCEPTED, &machine.migration.status()),
        Err(e) if e.contains("already running") => {
            Reply::error(StatusCode::CONFLICT, "migration_running", e)
        }
        Err(e) => Reply::error(StatusCode::BAD_REQUEST, "bad_request", e),
    }
}

fn body_too_large() -> Reply {
    Reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("no request body over {MAX_REQUEST_BODY} bytes is read"),
    )
}

fn route(machine: &Arc<Machine>, method: &Method, path: &str, body: &[u8]) -> Reply {
    let allowed = match path {
        "/vm" | "/vm/counters" | "/vm/migration" => Method::GET,
        "/vm/migrate" => Method::PUT,
        "/vm/pause" | "/vm/resume" | "/vm/power-button" | "/vm/reset" | "/vm/stop" => Method::PUT,
        "/vm/snapshot" => Method::PUT,
        _ => {
            return Reply::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no resource {path}; see GET /vm"),
            )
        }
    };
    if *method != allowed {
        return Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} takes {allowed}, not {method}"),
        );
    }
    if path == "/vm/snapshot" {
        return snapshot(machine, body);
    }
    if path == "/vm/migrate" {
        return migrate(machine, body);
    }
    if !body.is_empty() {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "unexpected_body",
            format!("{method} {path} takes no request body"),
        );
    }
    match path {
        "/vm" => {
            let state = if machine.vcpus.pause.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            };
            Reply::json(
                StatusCode::OK,
                &VmInfo {
                    state,
                    uptime_ms: u64::try_from(machine.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    config: machine.config.clone(),
                    console_clients: machine.serial_clients.as_ref().map_or(0, |c| {
                        c.lock().unwrap_or_else(|p| p.into_inner()).len() as u32
                    }),
                },
            )
        }
        "/vm/migration" => match machine.migration.status() {
            Some(status) => Reply::json(StatusCode::OK, &status),
            None => Reply::error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no migration was started; see PUT /vm/migrate",
            ),
        },
        "/vm/counters" => Reply::json(
            StatusCode::OK,
            &serde_json::json!({ "exits": machine.counters.snapshot() }),
        ),
        "/vm/pause" => {
            machine.vcpus.pause();
            Reply::no_content()
        }
        "/vm/resume" => {
            machine.resume();
            Reply::no_content()
        }
        "/vm/power-button" => {
            if machine.vcpus.pause.is_paused() {
                return Reply::error(
                    StatusCode::CONFLICT,
                    "vm_paused",
                    "the VM is paused; resume it before pressing the power button",
                );
            }
            machine
                .acpi_pm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .press_power_button();
            Reply::no_content()
        }
        "/vm/reset" => {
            // Like the reset button: the VM ends with "guest reset" and whoever
            // manages it decides whether it starts again.
            Reply::stop_after(StopReason::Reset)
        }
        "/vm/stop" => Reply::stop_after(StopReason::Stopped),
        _ => Reply::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no resource {path}"),
        ),
    }
}
