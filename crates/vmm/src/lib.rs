//! ferrovmm: one KVM virtual machine per process.
//!
//! `run` builds the machine from the command line, serves the control API and
//! the console, and returns the exit status when the VM stops.

pub mod acpi;
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
pub mod kvm_state;
pub mod layout;
pub mod lifecycle;
pub mod logger;
pub mod memory;
pub mod pci;
pub mod pci_devices;
pub mod persist;
pub mod restore;
pub mod snapshot;
pub mod teardown;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::Arc;

pub use config::Args;
pub use error::{Error, Result};

/// Runs the VM to its end; returns the process exit status.
pub fn run(args: Args) -> Result<i32> {
    config::validate(&args)?;
    run_machine(args, vm::Origin::Boot, true)
}

/// Builds the machine (booted or restored), serves the API and the console until
/// the VM ends. A restored machine starts paused unless `resume`.
pub fn run_machine(args: Args, origin: vm::Origin, resume: bool) -> Result<i32> {
    // Bind sockets before the guest runs, so a bad path fails fast and clients
    // that see the socket can use it at once.
    let console_listener = match &args.serial {
        config::SerialMode::Socket(path) => Some(console::bind_socket(path, "--serial socket")?),
        _ => None,
    };
    let machine = Arc::new(vm::build(&args, origin)?);
    if let Some(path) = &args.api_socket {
        api::serve(path, machine.clone())?;
    }
    if resume {
        machine.vcpus.resume();
    }
    let stdin = args.serial == config::SerialMode::Stdio;
    let reason = console::EventLoop::new(&machine, stdin, console_listener)?.run();

    let (line, code) = reason.report();
    cleanup(&args);
    eprintln!("{line}");
    teardown::hand_off();
    Ok(code)
}

/// Removes the sockets this process created.
pub fn cleanup(args: &Args) {
    if let Some(path) = &args.api_socket {
        let _ = std::fs::remove_file(path);
    }
    if let config::SerialMode::Socket(path) = &args.serial {
        let _ = std::fs::remove_file(path);
    }
}
