//! Typed client for the ferrovirtd /v1 API over its Unix socket.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorBody};
use crate::http::{self, percent_encode, Stream};
use crate::job::JobInfo;
use crate::msg::{
    AutostartRequest, DefineResponse, DisplayInfo, DomainResponse, MemoryRequest, VcpusRequest,
    VersionInfo, VolumeCreateRequest, VolumeInfo,
};
use crate::op::DomainOp;
use crate::state::{DomainInfo, Event};

#[derive(Debug)]
pub enum ClientError {
    /// The daemon could not be reached.
    Connect {
        target: String,
        error: std::io::Error,
    },
    /// The daemon answered with an error.
    Api(ApiError),
    /// The answer was not understood.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { target, error } => write!(
                f,
                "cannot talk to ferrovirtd at {target}: {error} (is the daemon running? start it with `ferrovirtd --socket {target}`, or pass -c SOCKET / set FERROVIRT_SOCKET)"
            ),
            ClientError::Api(e) => write!(f, "{e}"),
            ClientError::Protocol(m) => write!(f, "unexpected answer from ferrovirtd: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Body formats accepted by define/create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefFormat {
    Json,
    Toml,
    Xml,
}

impl DefFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            DefFormat::Json => "application/json",
            DefFormat::Toml => "application/toml",
            DefFormat::Xml => "application/xml",
        }
    }
    /// Guess from file contents: XML starts with '<', JSON with '{', anything else is TOML.
    pub fn sniff(text: &str) -> Self {
        match text.trim_start().as_bytes().first() {
            Some(b'<') => DefFormat::Xml,
            Some(b'{') => DefFormat::Json,
            _ => DefFormat::Toml,
        }
    }
}

/// Where the daemon listens.
#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    /// host:port with its bearer token.
    Tcp {
        addr: String,
        token: String,
    },
    /// TLS to host:port, trusting the given roots, with the bearer token.
    Tls {
        addr: String,
        token: String,
        config: std::sync::Arc<rustls::ClientConfig>,
    },
}

pub struct Client {
    target: Target,
    timeout: Duration,
}

impl Client {
    /// Long enough for a start that boots firmware; short enough not to hang a script forever.
    const TIMEOUT: Duration = Duration::from_secs(120);

    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            target: Target::Unix(socket.into()),
            timeout: Self::TIMEOUT,
        }
    }

    /// A daemon's TCP listener (`ferrovirtd --listen-tcp`), which needs its bearer token.
    pub fn tcp(addr: &str, token: &str) -> Self {
        Client {
            target: Target::Tcp {
                addr: addr.to_string(),
                token: token.to_string(),
            },
            timeout: Self::TIMEOUT,
        }
    }

    /// TLS to a daemon's TCP listener, trusting the PEM certificates in `ca`.
    pub fn tls(addr: &str, token: &str, ca: &std::path::Path) -> Result<Self, String> {
        let config = crate::tls::client_config(ca)?;
        Ok(Client {
            target: Target::Tls {
                addr: addr.to_string(),
                token: token.to_string(),
                config,
            },
            timeout: Self::TIMEOUT,
        })
    }

    /// From `-c`: a socket path, `tcp://HOST:PORT` or `tls://HOST:PORT`; the network forms need
    /// the bearer token, TLS also the certificate to trust (`ca`).
    pub fn from_uri(
        uri: &str,
        token: Option<&str>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let (tls, addr) = match (uri.strip_prefix("tcp://"), uri.strip_prefix("tls://")) {
            (Some(a), _) => (false, a),
            (_, Some(a)) => (true, a),
            _ => return Ok(Self::new(uri)),
        };
        let addr = addr.trim_end_matches('/');
        let token = match token {
            Some(t) if !t.trim().is_empty() => t.trim(),
            _ => {
                return Err(format!(
                    "connecting to {uri} needs the daemon's bearer token: set FERROVIRT_TOKEN"
                ))
            }
        };
        if !tls {
            return Ok(Self::tcp(addr, token));
        }
        let ca = ca.ok_or_else(|| {
            format!("connecting to {uri} needs the certificate to trust: set FERROVIRT_CA_CERT to a PEM file")
        })?;
        Self::tls(addr, token, ca)
    }

    /// The socket path or tcp:// address, for messages.
    pub fn target(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp { addr, .. } => format!("tcp://{addr}"),
            Target::Tls { addr, .. } => format!("tls://{addr}"),
        }
    }

    fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let connected: std::io::Result<Box<dyn Stream>> = match &self.target {
            Target::Unix(p) => UnixStream::connect(p).map(|s| Box::new(s) as Box<dyn Stream>),
            Target::Tcp { addr, .. } => {
                TcpStream::connect(addr).map(|s| Box::new(s) as Box<dyn Stream>)
            }
            Target::Tls { addr, config, .. } => {
                let host = addr
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(addr)
                    .trim_matches(['[', ']']);
                TcpStream::connect(addr)
                    .and_then(|tcp| crate::tls::connect(config.clone(), host, tcp))
                    .map(|s| Box::new(s) as Box<dyn Stream>)
            }
        };
        connected.map_err(|error| ClientError::Connect {
            target: self.target(),
            error,
        })
    }

    fn auth_header(&self) -> Option<String> {
        match &self.target {
            Target::Tcp { token, .. } | Target::Tls { token, .. } => {
                Some(format!("Bearer {token}"))
            }
            Target::Unix(_) => None,
        }
    }

    pub(crate) fn raw(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: &[u8],
    ) -> Result<http::Response, ClientError> {
        let stream = self.connect()?;
        let auth = self.auth_header();
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let resp = http::request_on(stream, method, path, ct, body, &headers, Some(self.timeout))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if resp.status >= 400 {
            return Err(match serde_json::from_slice::<ErrorBody>(&resp.body) {
                Ok(b) => ClientError::Api(b.error),
                Err(_) => ClientError::Protocol(format!(
                    "HTTP {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                )),
            });
        }
        Ok(resp)
    }

    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T, ClientError> {
        let (ct, bytes) = match &body {
            Some(b) => (Some("application/json"), b.as_bytes()),
            None => (None, &b""[..]),
        };
        let resp = self.raw(method, path, ct, bytes)?;
        serde_json::from_slice(&resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn dom(name: &str) -> String {
        format!("/v1/domains/{}", percent_encode(name))
    }

    pub fn version(&self) -> Result<VersionInfo, ClientError> {
        self.json("GET", "/v1/version", None)
    }

    pub fn list(&self, all: bool) -> Result<Vec<DomainInfo>, ClientError> {
        self.json(
            "GET",
            if all {
                "/v1/domains?all=true"
            } else {
                "/v1/domains"
            },
            None,
        )
    }

    pub fn get(&self, name: &str) -> Result<DomainInfo, ClientError> {
        self.json("GET", &Self::dom(name), None)
    }

    /// Define a persistent domain (`transient = false`) or create and start a transient one.
    pub fn define(
        &self,
        text: &str,
        format: DefFormat,
        transient: bool,
    ) -> Result<DefineResponse, ClientError> {
        self.define_opts(text, format, transient, false)
    }

    /// `dry_run`: the daemon runs every check and stores nothing.
    pub fn define_opts(
        &self,
        text: &str,
        format: DefFormat,
        transient: bool,
        dry_run: bool,
    ) -> Result<DefineResponse, ClientError> {
        let path = match (transient, dry_run) {
            (false, false) => "/v1/domains",
            (true, false) => "/v1/domains?create=true",
            (false, true) => "/v1/domains?dry_run=true",
            (true, true) => "/v1/domains?create=true&dry_run=true",
        };
        let resp = self.raw("POST", path, Some(format.content_type()), text.as_bytes())?;
        serde_json::from_slice(&resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn undefine(&self, name: &str) -> Result<(), ClientError> {
        self.raw("DELETE", &Self::dom(name), None, b"").map(|_| ())
    }

    /// Run an operation on a domain; a busy domain is an error at once (`domain_busy`).
    pub fn action(&self, name: &str, op: DomainOp) -> Result<DomainInfo, ClientError> {
        self.action_wait(name, op, None)
    }

    /// Run an operation; with `wait_secs`, wait up to that long (the daemon caps it) for
    /// another job on the domain to end first.
    pub fn action_wait(
        &self,
        name: &str,
        op: DomainOp,
        wait_secs: Option<u64>,
    ) -> Result<DomainInfo, ClientError> {
        let wait = wait_secs.map(|s| format!("?wait={s}")).unwrap_or_default();
        let r: DomainResponse = self.json(
            "POST",
            &format!("{}/{op}{wait}", Self::dom(name)),
            Some(String::new()),
        )?;
        Ok(r.domain)
    }

    /// The domain's running job (`job: None` when idle).
    pub fn job(&self, name: &str) -> Result<JobInfo, ClientError> {
        self.json("GET", &format!("{}/job", Self::dom(name)), None)
    }

    /// Ask the domain's running job to stop; answers with the job as it was.
    pub fn abort_job(&self, name: &str) -> Result<JobInfo, ClientError> {
        self.json("DELETE", &format!("{}/job", Self::dom(name)), None)
    }

    pub fn xml(&self, name: &str) -> Result<String, ClientError> {
        let resp = self.raw("GET", &format!("{}/xml", Self::dom(name)), None, b"")?;
        String::from_utf8(resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn definition_toml(&self, name: &str) -> Result<String, ClientError> {
        let resp = self.raw(
            "GET",
            &format!("{}/definition?format=toml", Self::dom(name)),
            None,
            b"",
        )?;
        String::from_utf8(resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn set_autostart(&self, name: &str, autostart: bool) -> Result<DomainInfo, ClientError> {
        let body = serde_json::to_string(&AutostartRequest { autostart }).unwrap_or_default();
        let r: DomainResponse =
            self.json("PUT", &format!("{}/autostart", Self::dom(name)), Some(body))?;
        Ok(r.domain)
    }

    pub fn set_memory(
        &self,
        name: &str,
        memory_kib: u64,
        config: bool,
    ) -> Result<DomainInfo, ClientError> {
        let body = serde_json::to_string(&MemoryRequest { memory_kib, config }).unwrap_or_default();
        let r: DomainResponse =
            self.json("PUT", &format!("{}/memory", Self::dom(name)), Some(body))?;
        Ok(r.domain)
    }

    pub fn set_vcpus(
        &self,
        name: &str,
        vcpus: u32,
        config: bool,
    ) -> Result<DomainInfo, ClientError> {
        let body = serde_json::to_string(&VcpusRequest { vcpus, config }).unwrap_or_default();
        let r: DomainResponse =
            self.json("PUT", &format!("{}/vcpus", Self::dom(name)), Some(body))?;
        Ok(r.domain)
    }

    pub fn display(&self, name: &str) -> Result<DisplayInfo, ClientError> {
        self.json("GET", &format!("{}/display", Self::dom(name)), None)
    }

    pub fn create_volume(&self, req: &VolumeCreateRequest) -> Result<VolumeInfo, ClientError> {
        let body = serde_json::to_string(req).unwrap_or_default();
        self.json("POST", "/v1/pools/default/volumes", Some(body))
    }

    pub fn create_cloud_init(
        &self,
        req: &crate::msg::CloudInitRequest,
    ) -> Result<VolumeInfo, ClientError> {
        let body = serde_json::to_string(req).unwrap_or_default();
        self.json("POST", "/v1/pools/default/cloud-init", Some(body))
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        self.raw(
            "DELETE",
            &format!("/v1/pools/default/volumes/{}", percent_encode(name)),
            None,
            b"",
        )
        .map(|_| ())
    }

    pub fn network_exists(&self, name: &str) -> Result<bool, ClientError> {
        match self.raw(
            "GET",
            &format!("/v1/networks/{}", percent_encode(name)),
            None,
            b"",
        ) {
            Ok(_) => Ok(true),
            Err(ClientError::Api(e)) if e.code == crate::ErrorCode::NoNetwork => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Subscribe to lifecycle events; `on_event` returns false to stop.
    pub fn events(&self, mut on_event: impl FnMut(Event) -> bool) -> Result<(), ClientError> {
        let stream = self.connect()?;
        let mut w = stream
            .try_clone_stream()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let auth = self.auth_header();
        let mut headers = vec![("Accept", "text/event-stream")];
        if let Some(a) = auth.as_deref() {
            headers.push(("Authorization", a));
        }
        http::write_request(&mut w, "GET", "/v1/events", None, b"", &headers)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut r = BufReader::new(stream);
        let head = read_head(&mut r)?;
        if head.0 != 200 {
            return Err(ClientError::Protocol(format!("events: HTTP {}", head.0)));
        }
        let mut line = String::new();
        loop {
            line.clear();
            let n = r
                .read_line(&mut line)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                if let Ok(ev) = serde_json::from_str::<Event>(data) {
                    if !on_event(ev) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Attach to the serial console: the returned stream carries raw guest bytes both ways.
    /// `replay` asks for the recent log first.
    pub fn console(
        &self,
        name: &str,
        replay: bool,
    ) -> Result<BufReader<Box<dyn Stream>>, ClientError> {
        let stream = self.connect()?;
        let mut w = stream
            .try_clone_stream()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let auth = self.auth_header();
        let mut headers = vec![("Upgrade", "console"), ("Connection", "Upgrade")];
        if let Some(a) = auth.as_deref() {
            headers.push(("Authorization", a));
        }
        let path = format!(
            "{}/console{}",
            Self::dom(name),
            if replay { "?replay=true" } else { "" }
        );
        http::write_request(&mut w, "POST", &path, None, b"", &headers)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut r = BufReader::new(stream);
        let (status, headers) = read_head(&mut r)?;
        if status != 101 {
            let body = {
                let mut b = Vec::new();
                if let Some(len) = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                {
                    let n: usize = len.1.parse().unwrap_or(0);
                    b.resize(n.min(http::MAX_BODY), 0);
                    let _ = std::io::Read::read_exact(&mut r, &mut b);
                }
                b
            };
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(b) => ClientError::Api(b.error),
                Err(_) => ClientError::Protocol(format!("console: HTTP {status}")),
            });
        }
        let _ = w.flush();
        Ok(r)
    }
}

fn read_head(
    r: &mut BufReader<Box<dyn Stream>>,
) -> Result<(u16, Vec<(String, String)>), ClientError> {
    let mut status_line = String::new();
    r.read_line(&mut status_line)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ClientError::Protocol(format!("bad status line '{}'", status_line.trim()))
        })?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let line = line.trim_end();
        if n == 0 || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}
