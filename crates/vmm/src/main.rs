//! ferrovmm command-line entry point.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::Parser;
use ferrovmm_api::ExitReason;

/// `ps` should show a VM as `ferrovmm --name NAME ...`: when --name is not the first
/// argument, re-execute with it moved to the front (once; management daemons already
/// put it first, so they never pay for this).
fn put_name_first(args: &[OsString]) {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--name" || a.as_bytes().starts_with(b"--name="))
    else {
        return;
    };
    if pos == 1 {
        return;
    }
    let takes_value = args[pos] == "--name";
    let end = if takes_value { pos + 2 } else { pos + 1 };
    if end > args.len() {
        return; // `--name` without a value: let clap report it
    }
    let mut reordered = vec![args[0].clone()];
    reordered.extend_from_slice(&args[pos..end]);
    reordered.extend(args[1..pos].iter().cloned());
    reordered.extend(args[end..].iter().cloned());
    let Ok(cargs) = reordered
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: the argument vector is NUL-terminated and outlives the call; on failure
    // execv returns and we carry on with the original order.
    unsafe { libc::execv(c"/proc/self/exe".as_ptr(), ptrs.as_ptr()) };
}

/// The `--exit-file` of a command line clap refused, found without clap, so even a usage
/// error leaves its record where the launcher looks.
fn exit_file_of(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--exit-file" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.as_bytes().strip_prefix(b"--exit-file=") {
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(v)));
        }
    }
    None
}

/// `ferrovmm --restore DIR ...`: its own flags, the same exit statuses and exit record.
fn restore(raw: &[OsString]) -> ! {
    let args = match ferrovmm::restore::RestoreArgs::try_parse_from(raw) {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            if e.use_stderr() {
                ferrovmm::record_exit(
                    exit_file_of(raw).as_deref(),
                    ExitReason::Error {
                        message: "invalid command line".into(),
                    },
                    code,
                );
            }
            std::process::exit(code);
        }
    };
    ferrovmm::logger::init(ferrovmm::config::log_filter(args.log_level));
    start_seccomp(args.seccomp, args.exit_file.as_deref());
    let (api_socket, exit_file) = (args.api_socket.clone(), args.exit_file.clone());
    match ferrovmm::restore::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferrovmm: {e}");
            ferrovmm::record_exit(
                exit_file.as_deref(),
                ExitReason::Error {
                    message: e.to_string(),
                },
                e.exit_code(),
            );
            if let Some(p) = api_socket {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(e.exit_code());
        }
    }
}

/// Chooses the seccomp mode every thread of the VM applies as it starts.
fn start_seccomp(mode: ferrovmm_api::SeccompMode, exit_file: Option<&std::path::Path>) {
    if let Err(e) = ferrovmm::seccomp::init(mode, exit_file) {
        let message = format!("cannot prepare seccomp: {e}");
        eprintln!("ferrovmm: {message}");
        ferrovmm::record_exit(exit_file, ExitReason::Error { message }, 1);
        std::process::exit(1);
    }
}

fn main() {
    // The workspace's release profile unwinds (ferrovirtd answers a panicking request with a 500
    // and keeps serving); a VMM whose thread panicked is in no state to go on: end it as before.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let raw: Vec<OsString> = std::env::args_os().collect();
    put_name_first(&raw);
    if ferrovmm::restore::requested(&raw) {
        restore(&raw);
    }
    let config = match ferrovmm::config::parse(&raw) {
        Ok(config) => config,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            if e.use_stderr() {
                // clap's first line, e.g. "invalid value 'x' for '--memory <MIB>': ...".
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first).to_string();
                ferrovmm::record_exit(
                    exit_file_of(&raw).as_deref(),
                    ExitReason::Error { message },
                    code,
                );
            }
            std::process::exit(code);
        }
    };
    ferrovmm::logger::init(ferrovmm::config::log_filter(config.log_level));
    // A record left by an earlier run must not pass for this one's (if this run is killed).
    if let Some(path) = &config.exit_file {
        let _ = std::fs::remove_file(path);
    }
    if let Some(jail) = &config.jail {
        if let Err(message) = ferrovmm::jail::enter(jail) {
            eprintln!("ferrovmm: {message}");
            ferrovmm::record_exit(
                config.exit_file.as_deref(),
                ExitReason::Error { message },
                1,
            );
            std::process::exit(1);
        }
    }
    start_seccomp(config.seccomp, config.exit_file.as_deref());
    match ferrovmm::run(&config) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferrovmm: {e}");
            ferrovmm::record_exit(
                config.exit_file.as_deref(),
                ExitReason::Error {
                    message: e.to_string(),
                },
                e.exit_code(),
            );
            ferrovmm::cleanup(&config);
            std::process::exit(e.exit_code());
        }
    }
}
