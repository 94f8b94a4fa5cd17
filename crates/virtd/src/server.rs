//! The /v1 HTTP/JSON API on the daemon's Unix socket (see docs/api/openapi.yaml).
//! One thread per connection, one request per connection.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use ferrovirt_api::error::ErrorBody;
use ferrovirt_api::http::{self, percent_decode, Request, Stream};
use ferrovirt_api::msg::{
    AutostartRequest, DomainResponse, MemoryRequest, VcpusRequest, VersionInfo, VolumeCreateRequest,
};
use ferrovirt_api::{xml, ApiError, DomainDef, DomainOp, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::manager::Manager;

/// What a handler produces.
enum Reply {
    Json(u16, String),
    Text(&'static str, String),
    Empty,
    /// The connection was taken over (events, console).
    Taken,
}

fn json<T: Serialize>(status: u16, value: &T) -> Reply {
    Reply::Json(
        status,
        serde_json::to_string(value).unwrap_or_else(|_| "{}".into()),
    )
}

/// Serve the API on the Unix socket (access is controlled by the socket's mode).
pub fn serve_unix(listener: UnixListener, mgr: Arc<Manager>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let mgr = mgr.clone();
        let _ = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || handle(Box::new(stream), &mgr, None));
    }
}

/// Serve the API on TCP (in TLS when configured): every request must carry
/// `Authorization: Bearer TOKEN`.
pub fn serve_tcp(
    listener: TcpListener,
    mgr: Arc<Manager>,
    token: Arc<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let stream: Box<dyn Stream> = match &tls {
            None => Box::new(stream),
            Some(config) => match ferrovirt_api::tls::accept(config.clone(), stream) {
                Ok(plain) => Box::new(plain),
                Err(_) => continue,
            },
        };
        let mgr = mgr.clone();
        let token = token.clone();
        let _ = std::thread::Builder::new()
            .name("api-tcp".into())
            .spawn(move || handle(stream, &mgr, Some(token.as_str())));
    }
}

/// Compare without leaking, through timing, how much of the token matched.
fn token_matches(given: Option<&str>, token: &str) -> bool {
    let Some(given) = given.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn handle(stream: Box<dyn Stream>, mgr: &Manager, token: Option<&str>) {
    let _ = stream.set_timeouts(Some(Duration::from_secs(30)), None);
    let Ok(mut out) = stream.try_clone_stream() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let req = match http::read_request(&mut reader) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let _ = write_error(
                &mut out,
                &ApiError::malformed(format!("bad HTTP request: {e}")),
            );
            return;
        }
    };
    let _ = out.set_timeouts(None, None);
    if let Some(token) = token {
        if !token_matches(req.header("authorization"), token) {
            let e = ApiError::new(
                ErrorCode::Unauthorized,
                "missing or wrong bearer token (set FERROVIRT_TOKEN)",
            );
            let _ = write_error(&mut out, &e);
            return;
        }
    }
    let reply = route(&req, mgr, out.as_ref())
        .unwrap_or_else(|e| Reply::Json(e.code.http_status(), error_json(&e)));
    let _ = match reply {
        Reply::Json(status, body) => {
            http::write_response(&mut out, status, "application/json", body.as_bytes())
        }
        Reply::Text(ct, body) => http::write_response(&mut out, 200, ct, body.as_bytes()),
        Reply::Empty => http::write_response(&mut out, 204, "", b""),
        Reply::Taken => Ok(()),
    };
}

fn error_json(e: &ApiError) -> String {
    serde_json::to_string(&ErrorBody { error: e.clone() }).unwrap_or_default()
}

fn write_error(out: &mut Box<dyn Stream>, e: &ApiError) -> std::io::Result<()> {
    http::write_response(
        out,
        e.code.http_status(),
        "application/json",
        error_json(e).as_bytes(),
    )
}

fn body<T: DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::malformed(format!("invalid JSON body: {e}")))
}

fn flag(req: &Request, name: &str) -> bool {
    matches!(req.query(name), Some("true" | "1" | "yes" | ""))
}

/// `?wait=SECONDS`: how long an operation may wait for a busy domain (the manager caps it).
fn wait_param(req: &Request) -> Result<Option<Duration>, ApiError> {
    match req.query("wait") {
        None => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .map(|n| Some(Duration::from_secs(n)))
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("wait '{s}' is not a number of seconds"),
                )
            }),
    }
}

/// Parse a definition in JSON, libvirt XML or TOML (by Content-Type, else by its first character).
fn parse_definition(req: &Request) -> Result<(DomainDef, Vec<String>), ApiError> {
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| ApiError::malformed("the definition is not UTF-8 text"))?;
    if text.trim().is_empty() {
        return Err(ApiError::malformed(
            "the request body is empty: send a domain definition (JSON, TOML or libvirt XML)",
        ));
    }
    let ct = req.header("content-type").unwrap_or("");
    let kind = if ct.contains("xml") {
        'x'
    } else if ct.contains("toml") {
        't'
    } else if ct.contains("json") {
        'j'
    } else {
        match text.trim_start().as_bytes().first() {
            Some(b'<') => 'x',
            Some(b'{') => 'j',
            _ => 't',
        }
    };
    match kind {
        'x' => xml::parse(text).map(|p| (p.def, p.warnings)),
        't' => DomainDef::from_toml(text).map(|d| (d, Vec::new())),
        _ => serde_json::from_str(text)
            .map(|d| (d, Vec::new()))
            .map_err(|e| ApiError::malformed(format!("invalid JSON definition: {e}"))),
    }
}

fn route(req: &Request, mgr: &Manager, conn: &dyn Stream) -> Result<Reply, ApiError> {
    let segments: Vec<String> = req
        .path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method.as_str();
    match (method, seg.as_slice()) {
        ("GET", ["v1", "version"]) => {
            let drivers = mgr.driver_names();
            Ok(json(
                200,
                &VersionInfo {
                    daemon: ferrovirt_api::VERSION.into(),
                    api: "v1".into(),
                    default_driver: mgr.default_type.as_str().into(),
                    default_reason: mgr.default_reason.clone(),
                    drivers,
                    images_dir: mgr.paths.images().to_string_lossy().into_owned(),
                },
            ))
        }
        ("GET", ["v1", "domains"]) => Ok(json(200, &mgr.list(flag(req, "all")))),
        ("POST", ["v1", "domains"]) => {
            let (def, warnings) = parse_definition(req)?;
            let dry_run = flag(req, "dry_run");
            let status = if dry_run { 200 } else { 201 };
            Ok(json(
                status,
                &mgr.define(def, warnings, flag(req, "create"), dry_run)?,
            ))
        }
        ("GET", ["v1", "domains", name]) => Ok(json(200, &mgr.domain(name)?)),
        ("DELETE", ["v1", "domains", name]) => {
            mgr.undefine(name)?;
            Ok(Reply::Empty)
        }
        ("GET", ["v1", "domains", name, "xml"]) => {
            let def = mgr.definition(name)?;
            Ok(Reply::Text(
                "application/xml",
                xml::emit(&def, mgr.default_type),
            ))
        }
        ("GET", ["v1", "domains", name, "definition"]) => {
            let def = mgr.definition(name)?;
            match req.query("format") {
                Some("toml") => Ok(Reply::Text("application/toml", def.to_toml())),
                None | Some("json") => Ok(json(200, &def)),
                Some(other) => Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("format '{other}' is not json or toml"),
                )),
            }
        }
        ("GET", ["v1", "domains", name, "display"]) => Ok(json(200, &mgr.display(name)?)),
        ("PUT", ["v1", "domains", name, "autostart"]) => {
            let r: AutostartRequest = body(req)?;
            Ok(json(
                200,
                &DomainResponse {
                    domain: mgr.set_autostart(name, r.autostart)?,
                },
            ))
        }
        ("PUT", ["v1", "domains", name, "memory"]) => {
            let r: MemoryRequest = body(req)?;
            let domain = mgr.update_config(name, r.config, |d| d.memory_kib = r.memory_kib)?;
            Ok(json(200, &DomainResponse { domain }))
        }
        ("PUT", ["v1", "domains", name, "vcpus"]) => {
            let r: VcpusRequest = body(req)?;
            let domain = mgr.update_config(name, r.config, |d| d.vcpus = r.vcpus)?;
            Ok(json(200, &DomainResponse { domain }))
        }
        ("POST", ["v1", "domains", name, "console"]) => {
            let hub = mgr.console(name)?;
            let mut out = conn
                .try_clone_stream()
                .map_err(|e| ApiError::internal(e.to_string()))?;
            out.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: console\r\nConnection: Upgrade\r\n\r\n")
                .map_err(|e| ApiError::internal(e.to_string()))?;
            hub.attach(out, flag(req, "replay"));
            Ok(Reply::Taken)
        }
        ("GET", ["v1", "domains", name, "job"]) => Ok(json(200, &mgr.job_info(name)?)),
        ("DELETE", ["v1", "domains", name, "job"]) => Ok(json(200, &mgr.abort_job(name)?)),
        ("POST", ["v1", "domains", name, verb]) => {
            let op = DomainOp::from_verb(verb).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("unknown domain operation '{verb}'"),
                )
            })?;
            let domain = mgr.action(name, op, wait_param(req)?)?;
            Ok(json(200, &DomainResponse { domain }))
        }
        ("GET", ["v1", "events"]) => {
            stream_events(mgr, conn);
            Ok(Reply::Taken)
        }
        (_, ["v1", "networks", ..]) | ("GET", ["v1", "domains", _, "interfaces" | "addresses"]) => {
            Ok(match crate::network::api::route(req, mgr, &seg)? {
                (204, _, _) => Reply::Empty,
                (200, ct, body) if ct != "application/json" => Reply::Text(ct, body),
                (status, _, body) => Reply::Json(status, body),
            })
        }
        ("POST", ["v1", "pools", "default", "volumes"]) => {
            let r: VolumeCreateRequest = body(req)?;
            Ok(json(201, &mgr.create_volume(&r)?))
        }
        ("POST", ["v1", "pools", "default", "cloud-init"]) => {
            let r: ferrovirt_api::msg::CloudInitRequest = body(req)?;
            Ok(json(201, &mgr.create_cloud_init(&r)?))
        }
        ("DELETE", ["v1", "pools", "default", "volumes", name]) => {
            mgr.delete_volume(name)?;
            Ok(Reply::Empty)
        }
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no API route {method} {}", req.path),
        )),
    }
}

/// Server-sent events: one `event: lifecycle` per domain event, a comment every 15 s as keep-alive.
fn stream_events(mgr: &Manager, conn: &dyn Stream) {
    let rx = mgr.events.subscribe();
    let Ok(mut out) = conn.try_clone_stream() else {
        return;
    };
    let _ = out.set_timeouts(None, Some(Duration::from_secs(10)));
    if out
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n: ferrovirtd events\n\n")
        .is_err()
    {
        return;
    }
    loop {
        let chunk = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(ev) => format!(
                "event: lifecycle\ndata: {}\n\n",
                serde_json::to_string(&ev).unwrap_or_default()
            ),
            Err(RecvTimeoutError::Timeout) => ": keep-alive\n\n".to_string(),
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if out
            .write_all(chunk.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}
