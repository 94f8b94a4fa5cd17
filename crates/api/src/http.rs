//! HTTP on the maintained stack for our synchronous callers (the CLI, the daemon's drivers):
//! hyper's HTTP/1.1 client on a small current-thread tokio runtime, over a Unix socket, TCP or
//! TLS. Also percent-coding for URL path segments.

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Runtime;

/// Largest response body a client reads (definitions and lists are a few KiB).
pub const MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A byte stream a request can run over (Unix socket, TCP, TLS).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The runtime a synchronous caller drives its I/O with: one thread, its own.
pub fn runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

pub(crate) fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Build a request; `extra_headers` come first (Authorization, Upgrade ...).
pub fn build_request(
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> io::Result<hyper::Request<Full<Bytes>>> {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    for (k, v) in extra_headers {
        b = b.header(*k, *v);
    }
    if let Some(ct) = content_type {
        b = b.header(hyper::header::CONTENT_TYPE, ct);
    }
    b.body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// HTTP/1.1 handshake on `io`; the connection's driver runs as a task of the current runtime.
pub async fn handshake(
    io: impl Io,
    upgrades: bool,
) -> io::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(other)?;
    if upgrades {
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
    } else {
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    Ok(sender)
}

/// Status and headers of `resp`, and its body read to the end (at most [`MAX_RESPONSE_BODY`]).
pub async fn read_response(resp: hyper::Response<Incoming>) -> io::Result<Response> {
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BODY)
        .collect()
        .await
        .map_err(other)?
        .to_bytes()
        .to_vec();
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    })
}

/// One request on `io`, whole answer read.
pub async fn exchange(io: impl Io, req: hyper::Request<Full<Bytes>>) -> io::Result<Response> {
    let mut sender = handshake(io, false).await?;
    let resp = sender.send_request(req).await.map_err(other)?;
    read_response(resp).await
}

/// Run `fut` with an optional deadline for all of it.
pub async fn with_timeout<T>(
    timeout: Option<Duration>,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete answer within {} s", t.as_secs_f64()),
            ))
        }),
    }
}

/// One request on a fresh connection to a Unix socket (e.g. ferrovmm's control API), with a
/// deadline for the whole exchange: connect, send, read the answer.
pub fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Option<Duration>,
) -> io::Result<Response> {
    let req = build_request(method, path, content_type, body, &[("Connection", "close")])?;
    runtime()?.block_on(with_timeout(timeout, async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        exchange(stream, req).await
    }))
}

/// Percent-decode a URL component ('+' stays '+'); invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encode a path segment or query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding() {
        assert_eq!(percent_decode("a%2Fb%"), "a/b%");
        assert_eq!(percent_decode("%41%4"), "A%4");
        assert_eq!(percent_decode("%e2%82%ac%ff"), "€\u{fffd}");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn unix_request_reads_a_whole_answer_and_times_out_on_silence() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("fv-http-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: a chunked answer. Second: read the request, never answer.
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .unwrap();
            let (mut s2, _) = listener.accept().unwrap();
            let _ = s2.read(&mut buf);
            let _ = s2.read(&mut buf); // until the client gives up
        });
        let r = unix_request(&sock, "GET", "/vm", None, b"", Some(Duration::from_secs(5))).unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"abcde"[..]));
        let e = unix_request(
            &sock,
            "PUT",
            "/vm/pause",
            None,
            b"",
            Some(Duration::from_millis(200)),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
