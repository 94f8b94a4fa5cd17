//! The /v1 API's routes (see docs/api/openapi.yaml): a request with its body already read
//! (within the route's limit, see [`body_limit`]) in, a reply out. They run on the blocking
//! pool; crate::http serves them (and the streaming routes: events, console).

use std::time::Duration;

use bytes::Bytes;
use ferrovirt_api::http::percent_decode;
use ferrovirt_api::msg::{
    AutostartRequest, DomainResponse, MemoryRequest, VcpusRequest, VersionInfo, VolumeCreateRequest,
};
use ferrovirt_api::save::{ManagedSaveRequest, RestoreRequest, SaveRequest};
use ferrovirt_api::{xml, ApiError, DomainDef, DomainOp, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::manager::Manager;

/// Body limit of actions and settings (their JSON bodies are tiny).
pub const ACTION_BODY: usize = 64 * 1024;
/// Body limit of definitions (domain and network XML/TOML/JSON, cloud-init data).
pub const DEFINITION_BODY: usize = 1024 * 1024;

/// The largest body the route `method` `seg` accepts; checked before any of it is read.
pub fn body_limit(method: &str, seg: &[&str]) -> usize {
    match (method, seg) {
        ("POST", ["v1", "domains"])
        | ("POST", ["v1", "domains", _, "snapshots"])
        | ("POST", ["v1", "networks"])
        | ("POST", ["v1", "pools", "default", "cloud-init"]) => DEFINITION_BODY,
        _ => ACTION_BODY,
    }
}

/// A request as the routes see it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// The path without the query, still percent-encoded.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The decoded query pairs of a URI's query string.
pub fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The decoded segments of a path.
pub fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect()
}

/// What a route produces.
pub enum Reply {
    Json(u16, String),
    Text(&'static str, String),
    Empty,
}

pub(crate) fn json<T: Serialize>(status: u16, value: &T) -> Reply {
    Reply::Json(
        status,
        serde_json::to_string(value).unwrap_or_else(|_| "{}".into()),
    )
}

/// Compare without leaking, through timing, how much of the token matched.
pub fn token_matches(given: Option<&str>, token: &str) -> bool {
    let Some(given) = given.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn body<T: DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::malformed(format!("invalid JSON body: {e}")))
}

pub(crate) fn flag(req: &Request, name: &str) -> bool {
    matches!(req.query(name), Some("true" | "1" | "yes" | ""))
}

/// `?wait=SECONDS`: how long an operation may wait for a busy domain (the manager caps it).
pub(crate) fn wait_param(req: &Request) -> Result<Option<Duration>, ApiError> {
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

/// Answer one request. Blocking: runs on the blocking pool, never on the async workers.
pub fn route(req: &Request, mgr: &Manager) -> Result<Reply, ApiError> {
    let segments = segments(&req.path);
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
            mgr.undefine_opts(name, flag(req, "snapshots_metadata"))?;
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
        (_, ["v1", "domains", _, "snapshots" | "snapshot-current", ..]) => {
            crate::snapshot::api::route(req, mgr, &seg)
        }
        ("GET", ["v1", "domains", name, "job"]) => Ok(json(200, &mgr.job_info(name)?)),
        ("DELETE", ["v1", "domains", name, "job"]) => Ok(json(200, &mgr.abort_job(name)?)),
        ("POST", ["v1", "domains", name, "save"]) => {
            let r: SaveRequest = body(req)?;
            let domain = mgr.save(name, &r.file, r.start)?;
            Ok(json(200, &DomainResponse { domain }))
        }
        ("POST", ["v1", "domains", name, "managed-save"]) => {
            // An empty body asks for the defaults.
            let r: ManagedSaveRequest = if req.body.is_empty() {
                ManagedSaveRequest::default()
            } else {
                body(req)?
            };
            let domain = mgr.managed_save(name, r.start)?;
            Ok(json(200, &DomainResponse { domain }))
        }
        ("DELETE", ["v1", "domains", name, "managed-save"]) => {
            let domain = mgr.managed_save_remove(name)?;
            Ok(json(200, &DomainResponse { domain }))
        }
        ("POST", ["v1", "restore"]) => {
            let r: RestoreRequest = body(req)?;
            let domain = mgr.restore(&r.file, r.start)?;
            Ok(json(200, &DomainResponse { domain }))
        }
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
