//! ferrovmm: one KVM virtual machine per process.
//!
//! `run` builds the machine from the command line, serves the control API and
//! the console, and returns the exit status when the VM stops.

pub mod acpi;
pub mod announce;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod counters;
pub mod cpu;
pub mod device_manager;
pub mod devices;
pub mod error;
pub mod irq;
pub mod jail;
pub mod kvm_state;
pub mod layout;
pub mod lifecycle;
pub mod logger;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod pci_devices;
pub mod persist;
pub mod restore;
pub mod seccomp;
pub mod snapshot;
pub mod teardown;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::Arc;

pub use config::Args;
pub use error::{Error, Result};
pub use ferrovmm_api::LaunchConfig;

use ferrovmm_api::{ExitReason, ExitRecord};

/// Runs the VM to its end; returns the process exit status.
pub fn run(config: &LaunchConfig) -> Result<i32> {
    config::validate(config)?;
    // A booted machine's vCPUs start running; resuming them again here would undo a
    // `PUT /vm/pause` that came in as soon as the API socket appeared.
    run_machine(config, vm::Origin::Boot, false)
}

/// Builds the machine (booted or restored), serves the API and the console until
/// the VM ends. A restored machine starts paused unless `resume`.
pub fn run_machine(config: &LaunchConfig, origin: vm::Origin, resume: bool) -> Result<i32> {
    let started = start_machine(config, origin)?;
    serve_machine(config, started, resume)
}

/// A built machine with its API served, not yet run by the main thread.
pub struct Started {
    pub machine: Arc<vm::Machine>,
    console_listener: Option<std::os::unix::net::UnixListener>,
}

/// Binds the sockets, builds the machine and serves its API.
pub fn start_machine(config: &LaunchConfig, origin: vm::Origin) -> Result<Started> {
    // Bind sockets before the guest runs, so a bad path fails fast and clients
    // that see the socket can use it at once.
    let console_listener = match &config.serial {
        config::SerialMode::Socket(path) => Some(console::bind_socket(path, "--serial socket")?),
        _ => None,
    };
    let machine = Arc::new(vm::build(config, origin)?);
    if let Some(path) = &config.api_socket {
        api::serve(path, machine.clone())?;
    }
    Ok(Started {
        machine,
        console_listener,
    })
}

/// Runs the console loop of a started machine until the VM ends; returns the exit status.
pub fn serve_machine(config: &LaunchConfig, started: Started, resume: bool) -> Result<i32> {
    let Started {
        machine,
        console_listener,
    } = started;
    if resume {
        machine.resume();
    }
    let stdin = config.serial == config::SerialMode::Stdio;
    seccomp::apply(seccomp::ThreadKind::Main);
    let reason = console::EventLoop::new(&machine, stdin, console_listener)?.run();

    let (line, code) = reason.report();
    record_exit(config.exit_file.as_deref(), reason.exit_reason(), code);
    cleanup(config);
    eprintln!("{line}");
    teardown::hand_off();
    Ok(code)
}

/// Writes the exit record to `--exit-file`, if one was asked for. A failure is only logged:
/// the launcher then finds no record and treats the end as a crash.
pub fn record_exit(path: Option<&std::path::Path>, reason: ExitReason, status: i32) {
    seccomp::finish();
    let Some(path) = path else {
        return;
    };
    if let Err(e) = (ExitRecord { reason, status }).write_atomic(path) {
        log::error!(
            "--exit-file {}: cannot write the exit record: {e}",
            path.display()
        );
    }
}

/// Removes the sockets this process created.
pub fn cleanup(config: &LaunchConfig) {
    if let Some(path) = &config.api_socket {
        let _ = std::fs::remove_file(path);
    }
    if let config::SerialMode::Socket(path) = &config.serial {
        let _ = std::fs::remove_file(path);
    }
}
