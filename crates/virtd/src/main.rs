//! ferrovirtd: one per host. Serves the /v1 API on a Unix socket; VMs it starts outlive it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;

use ferrovirtd::manager::Manager;
use ferrovirtd::runtime::Paths;

const USAGE: &str = "usage: ferrovirtd [--socket PATH] [--state-dir DIR] [--run-dir DIR]

  --socket PATH     API socket (default RUN_DIR/ferrovirtd.sock, i.e. /run/ferrovirt/ferrovirtd.sock)
  --state-dir DIR   database, console logs and disk images (default /var/lib/ferrovirt)
  --run-dir DIR     VM sockets and pidfiles (default /run/ferrovirt)

Environment: FERROVIRT_QEMU (qemu binary), FERROVIRT_VMM (ferrovmm binary),
FERROVIRT_NO_DEFAULT_NETWORK=1 (a fresh state dir gets no `default` network; see docs/network.md).";

fn parse_args() -> Result<Paths, String> {
    let mut socket = None;
    let mut state_dir = PathBuf::from("/var/lib/ferrovirt");
    let mut run_dir = PathBuf::from("/run/ferrovirt");
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
    Ok(Paths {
        state_dir,
        run_dir,
        socket,
    })
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

fn main() -> ExitCode {
    let run = || -> Result<(), String> {
        let paths = parse_args()?;
        let _lock = lock_state_dir(&paths)?;
        let mgr = Manager::open(paths.clone())?;
        let listener = bind(&paths)?;
        eprintln!(
            "ferrovirtd {} listening on {} (state {}, default driver {}: {})",
            ferrovirt_api::VERSION,
            paths.socket.display(),
            paths.state_dir.display(),
            mgr.default_type.as_str(),
            mgr.default_reason
        );
        ferrovirtd::server::serve(listener, mgr);
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrovirtd: {e}");
            ExitCode::FAILURE
        }
    }
}
