//! virsh's save verbs: save, restore, managedsave, managedsave-remove.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use ferrovirt_api::client::Client;
use ferrovirt_api::save::StartState;

use crate::{print_json, Failure};

#[derive(Subcommand)]
pub enum SaveCommand {
    /// Save a running or paused domain's memory and device state to FILE and stop it
    Save {
        domain: String,
        /// The file to write (it must not exist)
        file: PathBuf,
        /// Restore it running (default: the state it has now)
        #[arg(long)]
        running: bool,
        /// Restore it paused
        #[arg(long)]
        paused: bool,
    },
    /// Start the domain a save file holds, from where it was saved
    Restore {
        file: PathBuf,
        /// Leave it running (default: as recorded in the file)
        #[arg(long)]
        running: bool,
        /// Leave it paused
        #[arg(long)]
        paused: bool,
    },
    /// Save a domain's state to the daemon's own file and stop it; the next start resumes it
    Managedsave {
        domain: String,
        #[arg(long)]
        running: bool,
        #[arg(long)]
        paused: bool,
    },
    /// Remove a domain's managed save (the next start boots afresh)
    ManagedsaveRemove { domain: String },
}

/// The daemon does not share our working directory: send it an absolute path.
fn absolute(file: &Path) -> Result<String, Failure> {
    let path = std::path::absolute(file)
        .map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::Usage(format!("{}: the path is not UTF-8", path.display())))
}

fn start(running: bool, paused: bool) -> Result<Option<StartState>, Failure> {
    StartState::from_flags(running, paused).map_err(Failure::Usage)
}

pub fn run(client: &Client, cmd: SaveCommand, json: bool) -> Result<(), Failure> {
    let (info, message) = match cmd {
        SaveCommand::Save {
            domain,
            file,
            running,
            paused,
        } => {
            let path = absolute(&file)?;
            let info = client.save(&domain, &path, start(running, paused)?)?;
            (info, format!("Domain '{domain}' saved to {path}"))
        }
        SaveCommand::Restore {
            file,
            running,
            paused,
        } => {
            let path = absolute(&file)?;
            let info = client.restore(&path, start(running, paused)?)?;
            let message = format!("Domain '{}' restored from {path}", info.name);
            (info, message)
        }
        SaveCommand::Managedsave {
            domain,
            running,
            paused,
        } => {
            let info = client.managed_save(&domain, start(running, paused)?)?;
            (info, format!("Domain '{domain}' state saved by ferrovirtd"))
        }
        SaveCommand::ManagedsaveRemove { domain } => {
            let info = client.managed_save_remove(&domain)?;
            (
                info,
                format!("Removed managedsave image for domain '{domain}'"),
            )
        }
    };
    if json {
        print_json(&info);
    } else {
        println!("{message}\n");
    }
    Ok(())
}
