//! ferrovirtd: one per host. Serves the /v1 API on a Unix socket; VMs it starts outlive it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use ferrovirtd::http::listen::TcpAuth;
use ferrovirtd::http::Limits as HttpLimits;
use ferrovirtd::manager::{Limits, Manager, Setup};
use ferrovirtd::runtime::Paths;

const USAGE: &str = "usage: ferrovirtd [--socket PATH] [--state-dir DIR] [--run-dir DIR]

  --socket PATH     API socket (default RUN_DIR/ferrovirtd.sock, i.e. /run/ferrovirt/ferrovirtd.sock)
  --state-dir DIR   database, console logs and disk images (default /var/lib/ferrovirt)
  --run-dir DIR     VM sockets and pidfiles (default /run/ferrovirt)
  --listen-tcp ADDR also serve the API on TCP (e.g. 127.0.0.1:16509); needs --token-file.
                    Without --tls-cert it is plain HTTP: keep it on loopback or a trusted network.
  --token-file FILE bearer token for the TCP listener (16+ characters, file mode 0600)
  --tls-cert FILE   serve the TCP listener in TLS with this PEM certificate (chain)
  --tls-key FILE    and this PEM private key (file mode 0600)
  --max-connections N  open API connections at most (default 512); one more gets a 503
  --read-timeout SECS  time a client has to send a request's headers, then its body (default 10)
  --allow-remote-vnc  let a domain's VNC listen beyond loopback (only with a VNC password);
                    without it every VNC display listens on 127.0.0.1/::1 only
  --op-timeout SECS how long a VM may take to answer one operation (shutdown, suspend, resume,
                    reset) before it fails with a timeout error (default 10)

Environment: FERROVIRT_QEMU (qemu binary), FERROVIRT_VMM (ferrovmm binary),
FERROVIRT_NO_DEFAULT_NETWORK=1 (a fresh state dir gets no `default` network; see docs/network.md).";

/// The optional TCP listener: address, token file, TLS certificate and key files.
struct TcpOptions {
    addr: String,
    token_file: PathBuf,
    tls: Option<(PathBuf, PathBuf)>,
}

/// Command line: paths, the optional TCP listener, the manager's and the HTTP limits, and
/// whether VNC may listen beyond loopback.
fn parse_args() -> Result<(Paths, Option<TcpOptions>, Limits, HttpLimits, bool), String> {
    let mut http_limits = HttpLimits::default();
    let mut socket = None;
    let mut state_dir = PathBuf::from("/var/lib/ferrovirt");
    let mut run_dir = PathBuf::from("/run/ferrovirt");
    let mut tcp = None;
    let mut token_file = None;
    let mut tls_cert = None;
    let mut tls_key = None;
    let mut limits = Limits::default();
    let mut allow_remote_vnc = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--state-dir" => state_dir = PathBuf::from(value("--state-dir")?),
            "--run-dir" => run_dir = PathBuf::from(value("--run-dir")?),
            "--listen-tcp" => tcp = Some(value("--listen-tcp")?),
            "--token-file" => token_file = Some(PathBuf::from(value("--token-file")?)),
            "--tls-cert" => tls_cert = Some(PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => tls_key = Some(PathBuf::from(value("--tls-key")?)),
            "--max-connections" => {
                http_limits.max_connections = value("--max-connections")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--max-connections needs a positive number")?
            }
            "--read-timeout" => {
                let secs: u64 = value("--read-timeout")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--read-timeout needs a positive number of seconds")?;
                http_limits.read_timeout = Duration::from_secs(secs);
            }
            "--allow-remote-vnc" if inline.is_none() => allow_remote_vnc = true,
            "--op-timeout" => {
                let v = value("--op-timeout")?;
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|s| (1..=3600).contains(s))
                    .ok_or(format!("--op-timeout '{v}' is not 1 to 3600 seconds"))?;
                limits.op = std::time::Duration::from_secs(secs);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                println!("ferrovirtd {}", ferrovirt_api::VERSION);
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    let socket = socket.unwrap_or_else(|| run_dir.join("ferrovirtd.sock"));
    let tls = match (tls_cert, tls_key) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((c, k)),
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    if tls.is_some() && tcp.is_none() {
        return Err("--tls-cert/--tls-key are only used with --listen-tcp".into());
    }
    let tcp = match (tcp, token_file) {
        (None, None) => None,
        (Some(addr), Some(token_file)) => Some(TcpOptions { addr, token_file, tls }),
        (Some(_), None) => return Err("--listen-tcp needs --token-file: the TCP listener only serves requests with a bearer token".into()),
        (None, Some(_)) => return Err("--token-file is only used with --listen-tcp".into()),
    };
    Ok((
        Paths {
            state_dir,
            run_dir,
            socket,
        },
        tcp,
        limits,
        http_limits,
        allow_remote_vnc,
    ))
}

/// Secrets must not be readable by other users.
fn check_private(path: &PathBuf, what: &str) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{what} {} is readable by other users: chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

/// The TCP listener's token: long enough, and not readable by other users.
fn read_token(path: &PathBuf) -> Result<String, String> {
    check_private(path, "token file")?;
    let token =
        fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = token.trim().to_string();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "token file {} must hold one token of at least 16 printable characters without spaces",
            path.display()
        ));
    }
    Ok(token)
}

/// One daemon per state dir: an exclusive lock held for the process's life.
fn lock_state_dir(paths: &Paths) -> Result<fs::File, String> {
    fs::create_dir_all(&paths.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", paths.state_dir.display()))?;
    let path = paths.state_dir.join("ferrovirtd.lock");
    let file =
        fs::File::create(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a valid, open file descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "another ferrovirtd is using state dir {}",
            paths.state_dir.display()
        ));
    }
    Ok(file)
}

fn bind(paths: &Paths) -> Result<UnixListener, String> {
    if let Some(dir) = paths.socket.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if paths.socket.exists() {
        if UnixStream::connect(&paths.socket).is_ok() {
            return Err(format!(
                "another daemon is listening on {}",
                paths.socket.display()
            ));
        }
        let _ = fs::remove_file(&paths.socket);
    }
    let listener = UnixListener::bind(&paths.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", paths.socket.display()))?;
    fs::set_permissions(&paths.socket, fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", paths.socket.display()))?;
    Ok(listener)
}

/// Connections need file descriptors: raise the soft limit to the hard one, and keep the
/// connection limit well inside it (VMs' sockets, logs and the database need some too).
fn fit_to_fd_limit(limits: &mut HttpLimits) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return;
        }
        if rl.rlim_cur < rl.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                rl = raised;
            }
        }
    }
    let usable = (rl.rlim_cur as usize).saturating_sub(256) / 2;
    if limits.max_connections > usable.max(16) {
        eprintln!(
            "ferrovirtd: --max-connections {} does not fit the file descriptor limit {}; using {}",
            limits.max_connections,
            rl.rlim_cur,
            usable.max(16)
        );
        limits.max_connections = usable.max(16);
    }
}

fn main() -> ExitCode {
    // Before any thread starts (see memory.rs).
    ferrovirtd::memory::limit_arenas();
    // Everything the daemon and its VMs create is private (state 0700/0600, see files.rs).
    ferrovirtd::files::restrict_umask();
    let run = || -> Result<(), String> {
        let (paths, tcp, limits, mut http_limits, allow_remote_vnc) = parse_args()?;
        fit_to_fd_limit(&mut http_limits);
        let tcp = match tcp {
            Some(o) => {
                let token = read_token(&o.token_file)?;
                let tls = match &o.tls {
                    Some((cert, key)) => {
                        check_private(key, "TLS key file")?;
                        Some(ferrovirt_api::tls::server_config(cert, key)?)
                    }
                    None => None,
                };
                Some((o.addr, TcpAuth { token, tls }))
            }
            None => None,
        };
        let _lock = lock_state_dir(&paths)?;
        let setup = Setup {
            limits,
            allow_remote_vnc,
            ..Setup::probe()
        };
        let mgr = Manager::open(paths.clone(), setup)?;
        let listener = bind(&paths)?;
        let tcp = match tcp {
            Some((addr, auth)) => {
                let tcp_listener = std::net::TcpListener::bind(&addr)
                    .map_err(|e| format!("cannot listen on TCP {addr}: {e}"))?;
                let bound = tcp_listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or(addr);
                let scheme = if auth.tls.is_some() { "tls" } else { "tcp" };
                eprintln!(
                    "ferrovirtd: also listening on {scheme}://{bound} (bearer token required)"
                );
                Some((tcp_listener, auth))
            }
            None => None,
        };
        eprintln!(
            "ferrovirtd {} listening on {} (state {}, default driver {}: {})",
            ferrovirt_api::VERSION,
            paths.socket.display(),
            paths.state_dir.display(),
            mgr.default_type.as_str(),
            mgr.default_reason
        );
        // Two workers for the connections; blocking work (driver calls, the database) runs on
        // the blocking pool, whose threads end soon after a burst (then the idle trimmer gives
        // their memory back, see memory.rs).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(64)
            .thread_keep_alive(Duration::from_secs(2))
            .thread_name("api")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        runtime
            .block_on(ferrovirtd::http::listen::serve(
                mgr,
                http_limits,
                listener,
                tcp,
            ))
            .map_err(|e| format!("serving the API: {e}"))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovirtd: {e}");
            ExitCode::FAILURE
        }
    }
}
