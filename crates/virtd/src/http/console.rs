//! The serial console over an upgraded connection: `POST .../console` with `Upgrade: console`
//! gives a raw byte stream both ways (`ferrovirt console`); `GET .../console` with
//! `Upgrade: websocket` gives binary WebSocket messages both ways (browsers, web UIs).

use std::sync::Arc;

use bytes::Bytes;
use ferrovirt_api::{ApiError, ErrorCode};
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONNECTION, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::auth::{offered_protocols, CONSOLE_PROTOCOL};
use super::listen::Shared;
use super::service::{closing, empty, error, Body};
use crate::console::Attached;

/// Largest WebSocket message (and frame) accepted from a client: keystrokes and pastes.
const MAX_WS_MESSAGE: usize = 64 * 1024;

/// Does header `name` list `token` (comma-separated, any case)?
fn has_token(headers: &HeaderMap, name: hyper::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// A refused upgrade: the client wanted the connection for a stream, so end it.
fn refused(e: &ApiError) -> Response<Body> {
    closing(error(e))
}

fn bad_upgrade(message: &str) -> Response<Body> {
    refused(&ApiError::new(ErrorCode::InvalidArgument, message))
}

/// Attach to the domain's console hub (on the blocking pool: it takes the manager's lock).
async fn attach(shared: &Arc<Shared>, name: &str, replay: bool) -> Result<Attached, ApiError> {
    let mgr = shared.mgr.clone();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let hub = mgr.console(&name)?;
        hub.attach(replay).map_err(ApiError::wrong_state)
    })
    .await
    .map_err(|_| ApiError::internal("attaching the console failed"))?
}

/// `POST /v1/domains/{name}/console` with `Upgrade: console`.
pub async fn raw(
    req: &mut hyper::Request<Incoming>,
    name: &str,
    replay: bool,
    shared: &Arc<Shared>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    if !req.headers().contains_key(UPGRADE) {
        return bad_upgrade(
            "the console is a stream: send `Upgrade: console` and `Connection: Upgrade`",
        );
    }
    let attached = match attach(shared, name, replay).await {
        Ok(a) => a,
        Err(e) => return refused(&e),
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(conn) = upgrade.await {
            pump_raw(TokioIo::new(conn), attached).await;
        }
        drop(permit);
    });
    let mut resp = empty(StatusCode::SWITCHING_PROTOCOLS);
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("console"));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    resp
}

/// Raw bytes both ways until the client closes its side or the VM's console ends.
async fn pump_raw<S: AsyncRead + AsyncWrite>(conn: S, attached: Attached) {
    let Attached {
        replay,
        mut output,
        input,
    } = attached;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let to_client = async {
        if wr.write_all(&replay).await.is_err() {
            return;
        }
        while let Some(chunk) = output.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    let from_client = async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if input.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = from_client => {}
    }
}

/// `GET /v1/domains/{name}/console` with `Upgrade: websocket` (RFC 6455).
pub async fn websocket(
    req: &mut hyper::Request<Incoming>,
    name: &str,
    replay: bool,
    shared: &Arc<Shared>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    let h = req.headers();
    if !has_token(h, UPGRADE, "websocket") || !has_token(h, CONNECTION, "upgrade") {
        return bad_upgrade(
            "GET on the console is a WebSocket: send `Upgrade: websocket` (or POST with `Upgrade: console` for a raw stream)",
        );
    }
    if h.get("sec-websocket-version").map(|v| v.as_bytes()) != Some(b"13") {
        return bad_upgrade("only WebSocket version 13 is supported");
    }
    let Some(key) = h.get("sec-websocket-key") else {
        return bad_upgrade("the WebSocket handshake needs Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());
    // A client that offers subprotocols (a browser passing the token in one) must get one of
    // them back, or it drops the connection: ours, never the token.
    let offered = offered_protocols(h).count() > 0;
    if offered && !offered_protocols(h).any(|p| p == CONSOLE_PROTOCOL) {
        return bad_upgrade(&format!(
            "the console's WebSocket subprotocol is `{CONSOLE_PROTOCOL}`: offer it (with `ferrovirt.bearer.BASE64URL_TOKEN` on TCP)"
        ));
    }
    let attached = match attach(shared, name, replay).await {
        Ok(a) => a,
        Err(e) => return refused(&e),
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(conn) = upgrade.await {
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_WS_MESSAGE))
                .max_frame_size(Some(MAX_WS_MESSAGE));
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(conn), Role::Server, Some(config))
                    .await;
            pump_ws(ws, attached).await;
        }
        drop(permit);
    });
    let mut resp = empty(StatusCode::SWITCHING_PROTOCOLS);
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    if offered {
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(CONSOLE_PROTOCOL),
        );
    }
    resp
}

/// Binary messages both ways (text messages from the client are typed too) until either side
/// closes.
async fn pump_ws<S: AsyncRead + AsyncWrite + Unpin>(ws: WebSocketStream<S>, attached: Attached) {
    let Attached {
        replay,
        mut output,
        input,
    } = attached;
    let (mut sink, mut stream) = ws.split();
    let to_client = async {
        if !replay.is_empty() && sink.send(Message::Binary(replay.into())).await.is_err() {
            return;
        }
        while let Some(chunk) = output.recv().await {
            if sink.send(Message::Binary(chunk)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    let from_client = async {
        while let Some(Ok(msg)) = stream.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::from(t),
                Message::Close(_) => return,
                _ => continue,
            };
            if input.send(data).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = from_client => {}
    }
}
