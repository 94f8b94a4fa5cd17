//! Typed client for the ferrovirtd /v1 API over its Unix socket, TCP or TLS: hyper's HTTP/1.1
//! client, driven by a current-thread tokio runtime per call so callers stay synchronous.

use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::runtime::Runtime;

use crate::error::{ApiError, ErrorBody};
use crate::http::{self, percent_encode, Io};
use crate::job::JobInfo;
use crate::msg::{
    AutostartRequest, DefineResponse, DisplayInfo, DomainResponse, MemoryRequest, VcpusRequest,
    VersionInfo, VolumeCreateRequest, VolumeInfo,
};
use crate::op::DomainOp;
use crate::save::{ManagedSaveRequest, RestoreRequest, SaveRequest, StartState};
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

    fn connect_error(&self, error: std::io::Error) -> ClientError {
        ClientError::Connect {
            target: self.target(),
            error,
        }
    }

    /// Open a connection (with the TLS handshake, so a certificate problem is a connect error).
    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let connected: std::io::Result<Box<dyn Io>> = async {
            Ok(match &self.target {
                Target::Unix(p) => {
                    Box::new(tokio::net::UnixStream::connect(p).await?) as Box<dyn Io>
                }
                Target::Tcp { addr, .. } => Box::new(tokio::net::TcpStream::connect(addr).await?),
                Target::Tls { addr, config, .. } => {
                    let host = addr
                        .rsplit_once(':')
                        .map(|(h, _)| h)
                        .unwrap_or(addr)
                        .trim_matches(['[', ']']);
                    let name =
                        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidInput,
                                format!("server name '{host}': {e}"),
                            )
                        })?;
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| {
                            std::io::Error::new(e.kind(), format!("TLS handshake with {host}: {e}"))
                        })?;
                    Box::new(tls)
                }
            })
        }
        .await;
        connected.map_err(|e| self.connect_error(e))
    }

    fn runtime(&self) -> Result<Runtime, ClientError> {
        http::runtime().map_err(|e| self.connect_error(e))
    }

    /// Send a request that expects a streamed or upgraded answer; a status >= 400 becomes the
    /// API error it carries.
    async fn open(
        &self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        upgrades: bool,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let auth = self.auth_header();
        let mut headers = extra.to_vec();
        if let Some(a) = auth.as_deref() {
            headers.push(("Authorization", a));
        }
        let req = http::build_request(method, path, None, b"", &headers)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let io = self.connect().await?;
        let proto = |e: std::io::Error| ClientError::Protocol(e.to_string());
        let mut sender = http::handshake(io, upgrades).await.map_err(proto)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if resp.status().as_u16() >= 400 {
            let resp = http::read_response(resp).await.map_err(proto)?;
            return Err(api_error(&resp));
        }
        Ok(resp)
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
        let auth = self.auth_header();
        let mut headers = vec![("Connection", "close")];
        if let Some(a) = auth.as_deref() {
            headers.push(("Authorization", a));
        }
        let req = http::build_request(method, path, ct, body, &headers)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = self.runtime()?.block_on(async {
            let io = match tokio::time::timeout(self.timeout, self.connect()).await {
                Ok(io) => io?,
                Err(_) => {
                    return Err(self.connect_error(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting timed out",
                    )))
                }
            };
            http::with_timeout(Some(self.timeout), http::exchange(io, req))
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))
        })?;
        if resp.status >= 400 {
            return Err(api_error(&resp));
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

    /// `save`: stop the domain, its memory and device state to `file` (an absolute path).
    pub fn save(
        &self,
        name: &str,
        file: &str,
        start: Option<StartState>,
    ) -> Result<DomainInfo, ClientError> {
        let body = serde_json::to_string(&SaveRequest {
            file: file.to_string(),
            start,
        })
        .unwrap_or_default();
        let r: DomainResponse =
            self.json("POST", &format!("{}/save", Self::dom(name)), Some(body))?;
        Ok(r.domain)
    }

    /// `restore`: start the domain named in the save file `file` (an absolute path) from it.
    pub fn restore(
        &self,
        file: &str,
        start: Option<StartState>,
    ) -> Result<DomainInfo, ClientError> {
        let body = serde_json::to_string(&RestoreRequest {
            file: file.to_string(),
            start,
        })
        .unwrap_or_default();
        let r: DomainResponse = self.json("POST", "/v1/restore", Some(body))?;
        Ok(r.domain)
    }

    /// `managedsave`: save to the daemon's own file; the next start resumes from it.
    pub fn managed_save(
        &self,
        name: &str,
        start: Option<StartState>,
    ) -> Result<DomainInfo, ClientError> {
        let body = serde_json::to_string(&ManagedSaveRequest { start }).unwrap_or_default();
        let r: DomainResponse = self.json(
            "POST",
            &format!("{}/managed-save", Self::dom(name)),
            Some(body),
        )?;
        Ok(r.domain)
    }

    /// `managedsave-remove`: forget the managed save (the next start boots afresh).
    pub fn managed_save_remove(&self, name: &str) -> Result<DomainInfo, ClientError> {
        let r: DomainResponse =
            self.json("DELETE", &format!("{}/managed-save", Self::dom(name)), None)?;
        Ok(r.domain)
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
        /// An event line longer than this is not from ferrovirtd.
        const MAX_LINE: usize = 1024 * 1024;
        let rt = self.runtime()?;
        let resp = rt.block_on(self.open(
            "GET",
            "/v1/events",
            &[("Accept", "text/event-stream")],
            false,
        ))?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(ClientError::Protocol(format!(
                "events: HTTP {}",
                resp.status()
            )));
        }
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let frame = match rt.block_on(body.frame()) {
                None => return Ok(()),
                Some(f) => f.map_err(|e| ClientError::Protocol(e.to_string()))?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                if let Some(data) = line.trim_end().strip_prefix("data: ") {
                    if let Ok(ev) = serde_json::from_str::<Event>(data) {
                        if !on_event(ev) {
                            return Ok(());
                        }
                    }
                }
            }
            if pending.len() > MAX_LINE {
                return Err(ClientError::Protocol("events: line too long".into()));
            }
        }
    }

    /// Attach to the serial console: the returned connection carries raw guest bytes both ways.
    /// `replay` asks for the recent log first.
    pub fn console(&self, name: &str, replay: bool) -> Result<ConsoleConn, ClientError> {
        let rt = self.runtime()?;
        let path = format!(
            "{}/console{}",
            Self::dom(name),
            if replay { "?replay=true" } else { "" }
        );
        let upgraded = rt.block_on(async {
            let resp = self
                .open(
                    "POST",
                    &path,
                    &[("Upgrade", "console"), ("Connection", "Upgrade")],
                    true,
                )
                .await?;
            if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                return Err(ClientError::Protocol(format!(
                    "console: HTTP {}",
                    resp.status()
                )));
            }
            hyper::upgrade::on(resp)
                .await
                .map_err(|e| ClientError::Protocol(format!("console upgrade: {e}")))
        })?;
        let (reader, writer) = tokio::io::split(TokioIo::new(upgraded));
        let rt = Arc::new(rt);
        Ok(ConsoleConn {
            reader,
            read_timeout: None,
            writer: ConsoleWriter {
                rt: rt.clone(),
                half: Arc::new(Mutex::new(writer)),
            },
            rt,
        })
    }
}

/// The API error a failed response carries.
fn api_error(resp: &http::Response) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(&resp.body) {
        Ok(b) => ClientError::Api(b.error),
        Err(_) => ClientError::Protocol(format!(
            "HTTP {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )),
    }
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// An attached console: `Read` gives the guest's output, `Write` (or a [`ConsoleWriter`] from
/// [`ConsoleConn::writer`], usable from another thread) types into it.
pub struct ConsoleConn {
    rt: Arc<Runtime>,
    reader: ReadHalf<Upgraded>,
    read_timeout: Option<Duration>,
    writer: ConsoleWriter,
}

impl ConsoleConn {
    /// A read waits at most this long, then fails with `TimedOut` (None: wait for data).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    pub fn writer(&self) -> ConsoleWriter {
        self.writer.clone()
    }
}

impl Read for ConsoleConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timeout = self.read_timeout;
        let reader = &mut self.reader;
        self.rt
            .block_on(http::with_timeout(timeout, reader.read(buf)))
    }
}

impl Write for ConsoleConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// The sending side of an attached console.
#[derive(Clone)]
pub struct ConsoleWriter {
    rt: Arc<Runtime>,
    half: Arc<Mutex<WriteHalf<Upgraded>>>,
}

impl ConsoleWriter {
    /// End the input: the daemon then closes the console connection.
    pub fn close(&self) {
        if let Ok(mut half) = self.half.lock() {
            let _ = self.rt.block_on(half.shutdown());
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut half = self
            .half
            .lock()
            .map_err(|_| std::io::Error::other("console writer poisoned"))?;
        self.rt.block_on(async {
            half.write_all(buf).await?;
            half.flush().await
        })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
