//! The control API: HTTP/1.1 + JSON on a Unix socket, served on its own thread.
//!
//! Resources: `GET /vm`, `PUT /vm/{pause,resume,power-button,reset,stop}`, `GET /vm/counters`.
//! The OpenAPI description is docs/ferrovmm-api.yaml.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tiny_http::{Header, Method, Request, Response, Server};

use ferrovmm_api::control::{VmInfo, VmState};

use crate::error::{Error, Result};
use crate::lifecycle::StopReason;
use crate::vm::Machine;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

/// A response ready to send: status and optional JSON body.
struct Reply {
    status: u16,
    body: Option<String>,
}

impl Reply {
    fn json<T: Serialize>(status: u16, value: &T) -> Self {
        Reply {
            status,
            body: Some(serde_json::to_string(value).unwrap_or_else(|_| "{}".into())),
        }
    }
    fn no_content() -> Self {
        Reply {
            status: 204,
            body: None,
        }
    }
    fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Reply::json(
            status,
            &ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.into(),
                },
            },
        )
    }
}

/// Binds the API socket (replacing a stale one) and serves it on a thread.
pub fn serve(path: &Path, machine: Arc<Machine>) -> Result<()> {
    // Bind ourselves so a stale socket file and permission problems get a clear error.
    let listener = crate::console::bind_socket(path, "--api-socket")?;
    let server = Server::from_listener(listener, None)
        .map_err(|e| Error::host(format!("--api-socket {}: {e}", path.display())))?;
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 << 10)
        .spawn(move || {
            for request in server.incoming_requests() {
                let reply = route(&machine, &request);
                respond(request, reply);
            }
        })
        .map_err(|e| Error::host(format!("cannot start the API thread: {e}")))?;
    Ok(())
}

fn respond(request: Request, reply: Reply) {
    let result = match reply.body {
        Some(body) => {
            let header = Header::from_bytes("Content-Type", "application/json")
                .expect("static header is valid");
            request.respond(
                Response::from_string(body)
                    .with_status_code(reply.status)
                    .with_header(header),
            )
        }
        None => request.respond(Response::empty(reply.status)),
    };
    if let Err(e) = result {
        log::debug!("API client went away: {e}");
    }
}

fn route(machine: &Machine, request: &Request) -> Reply {
    let path = request.url().split('?').next().unwrap_or("");
    let method = request.method();
    let allowed = match path {
        "/vm" | "/vm/counters" => Method::Get,
        "/vm/pause" | "/vm/resume" | "/vm/power-button" | "/vm/reset" | "/vm/stop" => Method::Put,
        _ => return Reply::error(404, "not_found", format!("no resource {path}; see GET /vm")),
    };
    if *method != allowed {
        return Reply::error(
            405,
            "method_not_allowed",
            format!("{path} takes {allowed}, not {method}"),
        );
    }
    // No resource takes a body; refusing one early also bounds what a client can make us read.
    if request.body_length().unwrap_or(0) > 0 {
        return Reply::error(
            400,
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
                200,
                &VmInfo {
                    state,
                    uptime_ms: u64::try_from(machine.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    config: machine.config.clone(),
                },
            )
        }
        "/vm/counters" => Reply::json(
            200,
            &serde_json::json!({ "exits": machine.counters.snapshot() }),
        ),
        "/vm/pause" => {
            machine.vcpus.pause();
            Reply::no_content()
        }
        "/vm/resume" => {
            machine.vcpus.resume();
            Reply::no_content()
        }
        "/vm/power-button" => {
            if machine.vcpus.pause.is_paused() {
                return Reply::error(
                    409,
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
            machine.lifecycle.request_stop(StopReason::Reset);
            Reply::no_content()
        }
        "/vm/stop" => {
            machine.lifecycle.request_stop(StopReason::Stopped);
            Reply::no_content()
        }
        _ => Reply::error(404, "not_found", format!("no resource {path}")),
    }
}
