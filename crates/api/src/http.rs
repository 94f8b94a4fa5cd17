//! Minimal HTTP/1.1 framing over Unix stream sockets: enough for a JSON API, server-sent events
//! and an upgraded raw console stream. One request per connection keeps both sides simple.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A byte stream the API runs over: a Unix socket, or TCP when the daemon listens on TCP.
pub trait Stream: Read + Write + Send + 'static {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    fn shutdown_both(&self);
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Stream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

const MAX_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;
/// Largest request/response body accepted (definitions are a few KiB).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// Decoded path without the query.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line<R: BufRead>(r: &mut R) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_LINE {
        return Err(bad("HTTP line too long"));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| bad("HTTP line is not UTF-8"))
}

fn read_headers<R: BufRead>(r: &mut R) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| bad("connection closed inside the headers"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() >= MAX_HEADERS {
            return Err(bad("too many HTTP headers"));
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line '{line}'")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

fn read_body<R: BufRead>(
    r: &mut R,
    headers: &[(String, String)],
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    if let Some(len) = header(headers, "content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        if len > MAX_BODY {
            return Err(bad(format!(
                "body of {len} bytes is larger than {MAX_BODY}"
            )));
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    if header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = read_line(r)?.ok_or_else(|| bad("connection closed inside a chunk"))?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                let _ = read_line(r)?;
                return Ok(body);
            }
            if body.len() + size > MAX_BODY {
                return Err(bad("chunked body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let _ = read_line(r)?;
        }
    }
    let mut body = Vec::new();
    if to_eof {
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    }
    Ok(body)
}

/// Percent-decode a URL component ('+' stays '+').
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

/// Read one request; Ok(None) when the peer closed before sending anything.
pub fn read_request<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let Some(line) = read_line(r)? else {
        return Ok(None);
    };
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().ok_or_else(|| bad("bad request line"))?;
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(bad("bad request line"));
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let query = raw_query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let headers = read_headers(r)?;
    let body = read_body(r, &headers, false)?;
    Ok(Some(Request {
        method,
        path: raw_path.to_string(),
        query,
        headers,
        body,
    }))
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        101 => "Switching Protocols",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Status",
    }
}

/// Write a complete response and flush.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
        reason_phrase(status)
    );
    if status != 204 {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if status != 204 {
        w.write_all(body)?;
    }
    w.flush()
}

/// Read a response (status line, headers, body).
pub fn read_response<R: BufRead>(r: &mut R, method: &str) -> io::Result<Response> {
    let line = read_line(r)?.ok_or_else(|| bad("connection closed before the response"))?;
    let mut parts = line.splitn(3, ' ');
    let _version = parts.next();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line '{line}'")))?;
    let headers = read_headers(r)?;
    let no_body =
        method == "HEAD" || status == 204 || status == 101 || (100..200).contains(&status);
    let body = if no_body {
        Vec::new()
    } else {
        read_body(r, &headers, true)?
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Write a request head and body.
pub fn write_request<W: Write>(
    w: &mut W,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// One request on a fresh connection to a Unix socket, with a timeout for the whole exchange.
pub fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Option<Duration>,
) -> io::Result<Response> {
    let stream = UnixStream::connect(socket)?;
    request_on(
        Box::new(stream),
        method,
        path,
        content_type,
        body,
        &[],
        timeout,
    )
}

/// One request on an open connection (which it consumes), with a timeout for each read/write.
pub fn request_on(
    stream: Box<dyn Stream>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    timeout: Option<Duration>,
) -> io::Result<Response> {
    stream.set_timeouts(timeout, timeout)?;
    let mut writer = stream.try_clone_stream()?;
    let mut headers = vec![("Connection", "close")];
    headers.extend_from_slice(extra_headers);
    write_request(&mut writer, method, path, content_type, body, &headers)?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut wire = Vec::new();
        write_request(
            &mut wire,
            "POST",
            "/v1/domains?all=1&x=a%20b",
            Some("application/json"),
            b"{}",
            &[],
        )
        .unwrap();
        let req = read_request(&mut &wire[..]).unwrap().unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/domains");
        assert_eq!(req.query("x"), Some("a b"));
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn response_round_trip_and_chunked() {
        let mut wire = Vec::new();
        write_response(&mut wire, 404, "application/json", b"{\"a\":1}").unwrap();
        let resp = read_response(&mut &wire[..], "GET").unwrap();
        assert_eq!(resp.status, 404);
        assert_eq!(resp.body, b"{\"a\":1}");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let resp = read_response(&mut &chunked[..], "GET").unwrap();
        assert_eq!(resp.body, b"abcde");
    }

    #[test]
    fn oversized_body_is_refused() {
        let wire = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(read_request(&mut wire.as_bytes()).is_err());
    }

    #[test]
    fn percent_coding() {
        assert_eq!(percent_decode("a%2Fb%"), "a/b%");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
