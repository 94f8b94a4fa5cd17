//! The /v1/networks routes and the domains' interface routes (see docs/api/openapi.yaml).

use crate::server::Request;
use ferrovirt_api::network::{NetAutostartRequest, NetDefineResponse, NetworkDef};
use ferrovirt_api::{ApiError, ErrorCode};
use serde::Serialize;

use crate::manager::Manager;

/// (HTTP status, content type, body); 204 means no body.
pub type NetReply = (u16, &'static str, String);

fn json<T: Serialize>(status: u16, v: &T) -> NetReply {
    (
        status,
        "application/json",
        serde_json::to_string(v).unwrap_or_else(|_| "{}".into()),
    )
}

fn flag(req: &Request, name: &str) -> bool {
    matches!(req.query(name), Some("true" | "1" | "yes" | ""))
}

pub fn route(req: &Request, mgr: &Manager, seg: &[&str]) -> Result<NetReply, ApiError> {
    let nets = &mgr.networks;
    match (req.method.as_str(), seg) {
        ("GET", ["v1", "networks"]) => Ok(json(200, &nets.list(flag(req, "all")))),
        ("POST", ["v1", "networks"]) => {
            let text = std::str::from_utf8(&req.body)
                .map_err(|_| ApiError::malformed("the network definition is not UTF-8 text"))?;
            let (def, warnings) = NetworkDef::parse_any(text)?;
            let network = nets.define(def)?;
            Ok(json(201, &NetDefineResponse { network, warnings }))
        }
        ("GET", ["v1", "networks", name]) => Ok(json(200, &nets.info_of(name)?)),
        ("DELETE", ["v1", "networks", name]) => {
            nets.undefine(name)?;
            Ok((204, "", String::new()))
        }
        ("GET", ["v1", "networks", name, "xml"]) => Ok((
            200,
            "application/xml",
            ferrovirt_api::network::to_xml(&nets.definition(name)?),
        )),
        ("GET", ["v1", "networks", name, "definition"]) => {
            let def = nets.definition(name)?;
            match req.query("format") {
                Some("toml") => Ok((200, "application/toml", def.to_toml())),
                None | Some("json") => Ok(json(200, &def)),
                Some(other) => Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("format '{other}' is not json or toml"),
                )),
            }
        }
        ("GET", ["v1", "networks", name, "leases"]) => Ok(json(200, &nets.leases(name)?)),
        ("PUT", ["v1", "networks", name, "autostart"]) => {
            let r: NetAutostartRequest = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::malformed(format!("invalid JSON body: {e}")))?;
            Ok(json(200, &nets.set_autostart(name, r.autostart)?))
        }
        ("POST", ["v1", "networks", name, "start"]) => Ok(json(200, &nets.start(name)?)),
        ("POST", ["v1", "networks", name, "destroy"]) => Ok(json(200, &nets.destroy(name)?)),
        ("GET", ["v1", "domains", name, "interfaces"]) => {
            let def = mgr.definition(name)?;
            let running = mgr.domain(name)?.state.is_active();
            Ok(json(200, &nets.interfaces(&def, running)))
        }
        ("GET", ["v1", "domains", name, "addresses"]) => {
            let def = mgr.definition(name)?;
            if !mgr.domain(name)?.state.is_active() {
                return Err(ApiError::wrong_state(format!(
                    "domain '{name}' is not running"
                )));
            }
            Ok(json(200, &nets.addresses(&def)))
        }
        (method, _) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no API route {method} {}", req.path),
        )),
    }
}
