//! One request: on TCP the bearer token is checked from the headers before anything else; then
//! the route's body limit is checked against Content-Length and enforced while reading (chunked
//! included), within the read timeout; then the route runs on the blocking pool. A panic while
//! answering is logged and answered with a 500; the daemon keeps serving.

use std::any::Any;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use ferrovirt_api::error::ErrorBody;
use ferrovirt_api::{ApiError, ErrorCode};
use futures_util::FutureExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use super::listen::{Shared, TcpAuth};
use crate::server::{self, Reply};

/// Every response's body: whole, or a stream (events).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Answer one request; never panics out (a panicking handler becomes a 500).
pub async fn handle(
    req: hyper::Request<Incoming>,
    shared: Arc<Shared>,
    auth: Option<Arc<TcpAuth>>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    guarded(answer(req, &shared, auth.as_deref(), permit)).await
}

/// `fut`'s response, or a 500 if it panics.
async fn guarded(fut: impl std::future::Future<Output = Response<Body>>) -> Response<Body> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => internal_error(panic.as_ref()),
    }
}

/// Run a route on the blocking pool (it may wait on locks, the database, a driver); a panic in
/// it becomes a 500.
async fn run_blocking(
    route: impl FnOnce() -> Result<Reply, ApiError> + Send + 'static,
) -> Response<Body> {
    match tokio::task::spawn_blocking(route).await {
        Ok(Ok(reply)) => match reply {
            Reply::Json(status, body) => full(status, "application/json", body),
            Reply::Text(ct, body) => full(200, ct, body),
            Reply::Empty => empty(StatusCode::NO_CONTENT),
        },
        Ok(Err(e)) => error(&e),
        Err(join) if join.is_panic() => internal_error(join.into_panic().as_ref()),
        Err(_) => error(&ApiError::internal("the request was cancelled")),
    }
}

/// Log a handler's panic and say so to the client.
fn internal_error(panic: &(dyn Any + Send)) -> Response<Body> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    eprintln!("ferrovirtd: BUG: a request handler panicked: {what}");
    error(&ApiError::internal(
        "ferrovirtd hit a bug answering this request (details in its log); it keeps serving",
    ))
}

async fn answer(
    mut req: hyper::Request<Incoming>,
    shared: &Arc<Shared>,
    auth: Option<&TcpAuth>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    if let Some(auth) = auth {
        if !super::auth::authorized(req.headers(), &auth.token) {
            return closing(error(&ApiError::new(
                ErrorCode::Unauthorized,
                "missing or wrong bearer token (set FERROVIRT_TOKEN; a browser's WebSocket passes it as the subprotocol ferrovirt.bearer.BASE64URL_TOKEN)",
            )));
        }
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = server::parse_query(req.uri().query().unwrap_or(""));
    let replay = matches!(
        query
            .iter()
            .find(|(k, _)| k == "replay")
            .map(|(_, v)| v.as_str()),
        Some("true" | "1" | "yes" | "")
    );
    let segments = server::segments(&path);
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method.as_str(), seg.as_slice()) {
        ("GET", ["v1", "events"]) => return super::events::stream(&shared.mgr),
        ("POST", ["v1", "domains", name, "console"]) => {
            return super::console::raw(&mut req, name, replay, shared, permit).await
        }
        ("GET", ["v1", "domains", name, "console"]) => {
            return super::console::websocket(&mut req, name, replay, shared, permit).await
        }
        _ => {}
    }
    let limit = server::body_limit(&method, &seg);
    if req.body().size_hint().lower() > limit as u64 {
        return closing(error(&too_large(limit)));
    }
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let read_timeout = shared.limits.read_timeout;
    let body = Limited::new(req.into_body(), limit).collect();
    let body = match tokio::time::timeout(read_timeout, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return closing(error(&too_large(limit)))
        }
        Ok(Err(e)) => {
            return closing(error(&ApiError::malformed(format!(
                "bad request body: {e}"
            ))))
        }
        Err(_) => {
            return closing(error(&ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s",
                    read_timeout.as_secs()
                ),
            )))
        }
    };
    let request = server::Request {
        method,
        path,
        query,
        headers,
        body,
    };
    let mgr = shared.mgr.clone();
    run_blocking(move || server::route(&request, &mgr)).await
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the request body is larger than this route's limit of {} KiB",
            limit / 1024
        ),
    )
}

/// Ask hyper to close the connection after this answer (the body was not read, or not all).
pub fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

pub fn error_json(e: &ApiError) -> String {
    serde_json::to_string(&ErrorBody { error: e.clone() }).unwrap_or_default()
}

pub fn error(e: &ApiError) -> Response<Body> {
    full(e.code.http_status(), "application/json", error_json(e))
}

pub fn full(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().boxed_unsync());
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_text(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_next_request_is_served() {
        let resp = run_blocking(|| panic!("boom in a route")).await;
        assert_eq!(resp.status(), 500);
        assert!(body_text(resp).await.contains("\"internal\""));
        let resp = guarded(async { panic!("boom in the async part") }).await;
        assert_eq!(resp.status(), 500);
        let resp = run_blocking(|| Ok(Reply::Json(200, "[]".into()))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(body_text(resp).await, "[]");
    }

    #[test]
    fn new_error_codes_have_their_statuses() {
        for (code, status) in [
            (ErrorCode::PayloadTooLarge, 413),
            (ErrorCode::TooManyConnections, 503),
            (ErrorCode::RequestTimeout, 408),
        ] {
            assert_eq!(error(&ApiError::new(code, "x")).status().as_u16(), status);
        }
    }
}

#[cfg(test)]
mod blocking_client_tests {
    /// Drivers call ferrovmm's API with a synchronous client (its own small runtime) from route
    /// handlers on the blocking pool: that must work there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_synchronous_client_call_works_on_the_blocking_pool() {
        let r = tokio::task::spawn_blocking(|| {
            ferrovirt_api::http::unix_request(
                std::path::Path::new("/nonexistent/api.sock"),
                "GET",
                "/vm",
                None,
                b"",
                Some(std::time::Duration::from_secs(1)),
            )
        })
        .await;
        assert!(r.expect("no panic on the blocking pool").is_err());
    }
}
