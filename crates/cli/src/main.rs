//! ferrovirt: the command-line client (virsh, virt-install and qemu-img verbs).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrovirt", version, about = "Manage ferrovirt virtual machines, networks and disk images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Disk image tools with qemu-img's verbs (create, info, check, convert, commit, rebase, resize, map)
    #[command(disable_help_flag = true)]
    Img {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Img { args } => ExitCode::from(ferrovirt_disk::img_cli::run(args).clamp(0, 255) as u8),
    }
}
