//! GET /v1/events: server-sent events, one `event: lifecycle` per domain event and a comment
//! every 15 s as keep-alive. A subscriber that falls behind is dropped by the event bus, which
//! ends its stream.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

use super::service::Body;
use crate::manager::Manager;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn stream(mgr: &Manager) -> Response<Body> {
    let rx = mgr.events.subscribe();
    let hello = Some(Bytes::from_static(b": ferrovirtd events\n\n"));
    let frames = futures_util::stream::unfold((rx, hello), |(mut rx, hello)| async move {
        let chunk = match hello {
            Some(h) => h,
            None => match tokio::time::timeout(KEEP_ALIVE, rx.recv()).await {
                Ok(Some(ev)) => Bytes::from(format!(
                    "event: lifecycle\ndata: {}\n\n",
                    serde_json::to_string(&ev).unwrap_or_default()
                )),
                Ok(None) => return None,
                Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            },
        };
        Some((Ok::<_, Infallible>(Frame::data(chunk)), (rx, None)))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
