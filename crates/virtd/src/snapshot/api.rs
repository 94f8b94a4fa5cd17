//! The /v1/domains/{name}/snapshots routes (see docs/api/openapi.yaml).

use ferrovirt_api::snapshot::{self, EditRequest, RevertRequest, SnapshotRequest};
use ferrovirt_api::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;

use super::delete::DeleteWhat;
use crate::manager::Manager;
use crate::server::{flag, json, wait_param as wait, Reply, Request};

fn body<T: DeserializeOwned + Default>(req: &Request) -> Result<T, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::malformed(format!("invalid JSON body: {e}")))
}

/// A create request from JSON or libvirt's `<domainsnapshot>` XML (by Content-Type, else by
/// its first character).
fn create_request(req: &Request) -> Result<SnapshotRequest, ApiError> {
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| ApiError::malformed("the snapshot request is not UTF-8 text"))?;
    let xml = req.header("content-type").unwrap_or("").contains("xml")
        || text.trim_start().starts_with('<');
    let mut r = if xml {
        snapshot::parse_xml(text)?
    } else {
        body(req)?
    };
    if flag(req, "disk_only") {
        r.disk_only = true;
    }
    Ok(r)
}

/// Routes under /v1/domains/{name}/snapshots and /v1/domains/{name}/snapshot-current.
pub fn route(req: &Request, mgr: &Manager, seg: &[&str]) -> Result<Reply, ApiError> {
    match (req.method.as_str(), seg) {
        ("GET", ["v1", "domains", d, "snapshots"]) => Ok(json(200, &mgr.snapshot_list(d)?)),
        ("POST", ["v1", "domains", d, "snapshots"]) => {
            let r = create_request(req)?;
            Ok(json(201, &mgr.snapshot_create(d, r, wait(req)?)?))
        }
        ("GET", ["v1", "domains", d, "snapshot-current"]) => {
            Ok(json(200, &mgr.snapshot_current(d)?))
        }
        ("GET", ["v1", "domains", d, "snapshots", s]) => Ok(json(200, &mgr.snapshot_get(d, s)?)),
        ("GET", ["v1", "domains", d, "snapshots", s, "xml"]) => {
            Ok(Reply::Text("application/xml", mgr.snapshot_xml(d, s)?))
        }
        ("PUT", ["v1", "domains", d, "snapshots", s]) => {
            let r: EditRequest = body(req)?;
            Ok(json(200, &mgr.snapshot_edit(d, s, r)?))
        }
        ("POST", ["v1", "domains", d, "snapshots", s, "revert"]) => {
            let r: RevertRequest = body(req)?;
            Ok(json(200, &mgr.snapshot_revert(d, s, r, wait(req)?)?))
        }
        ("DELETE", ["v1", "domains", d, "snapshots", s]) => {
            let what = DeleteWhat {
                children: flag(req, "children"),
                children_only: flag(req, "children_only"),
                metadata_only: flag(req, "metadata"),
            };
            mgr.snapshot_delete(d, s, what, wait(req)?)?;
            Ok(Reply::Empty)
        }
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no API route {} {}", req.method, req.path),
        )),
    }
}
