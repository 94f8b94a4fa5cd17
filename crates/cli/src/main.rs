//! ferrovirt: the command-line client (virsh, virt-install and qemu-img verbs).

mod console;
mod hostval;
mod install;
mod leftovers;
mod net;
mod output;
mod save;
mod sizes;
mod snapshot;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferrovirt_api::client::{Client, ClientError, DefFormat};
use ferrovirt_api::state::EventKind;
use ferrovirt_api::DomainOp;

#[derive(Parser)]
#[command(
    name = "ferrovirt",
    version,
    about = "Manage ferrovirt virtual machines, networks and disk images"
)]
struct Cli {
    /// ferrovirtd API socket, or tcp://HOST:PORT / tls://HOST:PORT (with FERROVIRT_TOKEN, and FERROVIRT_CA_CERT for TLS)
    #[arg(short = 'c', long = "connect", global = true, env = "FERROVIRT_SOCKET", default_value = ferrovirt_api::DEFAULT_SOCKET)]
    connect: String,
    /// Machine-readable JSON output
    #[arg(long, global = true)]
    json: bool,
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
    /// List domains (active only unless --all)
    List {
        #[arg(long)]
        all: bool,
        /// List inactive domains only
        #[arg(long)]
        inactive: bool,
        /// Show inactive domains with a managed save as "saved"
        #[arg(long)]
        managed_save: bool,
        /// Only domains with a managed save
        #[arg(long)]
        with_managed_save: bool,
        /// Only domains without a managed save
        #[arg(long)]
        without_managed_save: bool,
    },
    /// Define a persistent domain from a TOML, JSON or libvirt XML file
    Define { file: PathBuf },
    /// Remove a domain's definition
    Undefine {
        domain: String,
        /// Also forget the domain's snapshots' metadata (needed when it has snapshots)
        #[arg(long)]
        snapshots_metadata: bool,
    },
    /// Create and start a transient domain from a file
    Create {
        file: PathBuf,
        /// Attach to the console after starting
        #[arg(long)]
        console: bool,
    },
    /// Start a defined domain
    Start {
        domain: String,
        /// Attach to the console after starting
        #[arg(long)]
        console: bool,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Ask the guest to power off (ACPI power button)
    Shutdown {
        domain: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Stop the domain at once (pull the plug)
    Destroy {
        domain: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Ask the guest to reboot
    Reboot {
        domain: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Hard reset (press the reset button)
    Reset {
        domain: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Pause the domain's vCPUs
    Suspend {
        domain: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Resume a paused domain
    Resume {
        domain: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Show the job running on a domain (operation, elapsed time, progress)
    Domjobinfo { domain: String },
    /// Cancel the job running on a domain (when it can be cancelled)
    Domjobabort { domain: String },
    /// Show information about a domain
    Dominfo { domain: String },
    /// Show the domain's state
    Domstate {
        domain: String,
        #[arg(long)]
        reason: bool,
    },
    /// Print the domain's libvirt XML (or --toml for the native format)
    Dumpxml {
        domain: String,
        #[arg(long)]
        toml: bool,
    },
    /// Start the domain when ferrovirtd starts (--disable to undo)
    Autostart {
        domain: String,
        #[arg(long)]
        disable: bool,
    },
    /// Attach to the domain's serial console (Ctrl-] detaches)
    Console { domain: String },
    /// Print lifecycle events (one, or all with --loop)
    Event {
        /// Only events of this domain
        #[arg(long)]
        domain: Option<String>,
        /// Only this event kind (defined, undefined, started, suspended, resumed, stopped, shutdown, crashed)
        #[arg(long)]
        event: Option<String>,
        /// Keep printing events until interrupted
        #[arg(long = "loop")]
        looping: bool,
        /// Give up after SECONDS
        #[arg(long)]
        timeout: Option<u64>,
        /// Accepted for virsh compatibility: all events are printed
        #[arg(long)]
        all: bool,
    },
    /// Change the memory size (KiB, or with suffix M/G) in the persistent definition
    Setmem {
        domain: String,
        size: String,
        #[arg(long)]
        config: bool,
        #[arg(long)]
        live: bool,
        #[arg(long)]
        current: bool,
    },
    /// Change the vCPU count in the persistent definition
    Setvcpus {
        domain: String,
        count: u32,
        #[arg(long)]
        config: bool,
        #[arg(long)]
        live: bool,
        #[arg(long)]
        current: bool,
    },
    /// Show the URI of the domain's graphical display
    Domdisplay { domain: String },
    /// Show client and daemon versions and the default driver
    Version,
    /// Check the host's virtualization support
    HostValidate,
    /// Create a VM with virt-install's options
    Install(Box<install::InstallArgs>),
    #[command(flatten)]
    Net(net::NetCommand),
    #[command(flatten)]
    Snapshot(snapshot::SnapshotCommand),
    #[command(flatten)]
    Save(save::SaveCommand),
}

/// `--wait SECONDS` of the domain operations.
#[derive(clap::Args)]
struct WaitArg {
    /// When another job runs on the domain, wait up to SECONDS for it to end (the daemon caps it)
    #[arg(long = "wait", value_name = "SECONDS")]
    secs: Option<u64>,
}

/// Why a command failed; each maps to one clear line on stderr and exit status 1.
pub enum Failure {
    Client(ClientError),
    Usage(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

fn read_file(path: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn run(cli: Cli) -> Result<(), Failure> {
    let token = std::env::var("FERROVIRT_TOKEN").ok();
    let ca = std::env::var_os("FERROVIRT_CA_CERT").map(PathBuf::from);
    let client =
        Client::from_uri(&cli.connect, token.as_deref(), ca.as_deref()).map_err(Failure::Usage)?;
    let json = cli.json;
    let done = |info: &ferrovirt_api::DomainInfo, msg: String| {
        if json {
            print_json(info);
        } else {
            println!("{msg}\n");
        }
    };
    match cli.command {
        Command::Img { .. } => unreachable!("handled before connecting"),
        Command::List { all, inactive, managed_save, with_managed_save, without_managed_save } => {
            let mut doms = client.list(all || inactive)?;
            if inactive {
                doms.retain(|d| !d.state.is_active());
            }
            if with_managed_save || without_managed_save {
                doms.retain(|d| d.managed_save == with_managed_save);
            }
            output::sort_like_virsh(&mut doms);
            if json {
                print_json(&doms);
            } else {
                print!("{}", output::list_table(&doms, managed_save));
            }
        }
        Command::Define { file } => {
            let text = read_file(&file)?;
            let resp = client.define(&text, DefFormat::sniff(&text), false)?;
            output::warnings(&resp.warnings);
            done(&resp.domain, format!("Domain '{}' defined from {}", resp.domain.name, file.display()));
        }
        Command::Create { file, console } => {
            let text = read_file(&file)?;
            let resp = client.define(&text, DefFormat::sniff(&text), true)?;
            output::warnings(&resp.warnings);
            done(&resp.domain, format!("Domain '{}' created from {}", resp.domain.name, file.display()));
            if console {
                console::attach(&client, &resp.domain.name, true)?;
            }
        }
        Command::Undefine { domain, snapshots_metadata } => {
            if snapshots_metadata {
                client.undefine_with_snapshots(&domain)?;
            } else {
                client.undefine(&domain)?;
            }
            if json {
                println!("{{}}");
            } else {
                println!("Domain '{domain}' has been undefined\n");
            }
        }
        Command::Start { domain, console, wait } => {
            let info = client.action_wait(&domain, DomainOp::Start, wait.secs)?;
            done(&info, output::started(&domain, &info));
            if console {
                console::attach(&client, &domain, true)?;
            }
        }
        Command::Shutdown { domain, wait } => {
            let info = client.action_wait(&domain, DomainOp::Shutdown, wait.secs)?;
            done(&info, format!("Domain '{domain}' is being shutdown"));
        }
        Command::Destroy { domain, wait } => {
            let info = client.action_wait(&domain, DomainOp::Destroy, wait.secs)?;
            done(&info, format!("Domain '{domain}' destroyed"));
        }
        Command::Reboot { domain, wait } => {
            let info = client.action_wait(&domain, DomainOp::Reboot, wait.secs)?;
            done(&info, format!("Domain '{domain}' is being rebooted"));
        }
        Command::Reset { domain, wait } => {
            let info = client.action_wait(&domain, DomainOp::Reset, wait.secs)?;
            done(&info, format!("Domain '{domain}' was reset"));
        }
        Command::Suspend { domain, wait } => {
            let info = client.action_wait(&domain, DomainOp::Suspend, wait.secs)?;
            done(&info, format!("Domain '{domain}' suspended"));
        }
        Command::Resume { domain, wait } => {
            let info = client.action_wait(&domain, DomainOp::Resume, wait.secs)?;
            done(&info, format!("Domain '{domain}' resumed"));
        }
        Command::Domjobinfo { domain } => {
            let job = client.job(&domain)?;
            if json {
                print_json(&job);
            } else {
                print!("{}", output::jobinfo(&job));
            }
        }
        Command::Domjobabort { domain } => {
            let job = client.abort_job(&domain)?;
            if json {
                print_json(&job);
            } else {
                let name = job.job.map(|j| j.name).unwrap_or_default();
                println!("Job '{name}' of domain '{domain}' is being cancelled\n");
            }
        }
        Command::Dominfo { domain } => {
            let info = client.get(&domain)?;
            if json {
                print_json(&info);
            } else {
                print!("{}", output::dominfo(&info));
            }
        }
        Command::Domstate { domain, reason } => {
            let info = client.get(&domain)?;
            if json {
                print_json(&serde_json::json!({"state": info.state, "reason": info.reason}));
            } else if reason {
                println!("{} ({})\n", info.state.display(), info.reason.as_str());
            } else {
                println!("{}\n", info.state.display());
            }
        }
        Command::Dumpxml { domain, toml } => {
            let text = if toml { client.definition_toml(&domain)? } else { client.xml(&domain)? };
            print!("{text}");
        }
        Command::Autostart { domain, disable } => {
            let info = client.set_autostart(&domain, !disable)?;
            let verb = if disable { "unmarked" } else { "marked" };
            done(&info, format!("Domain '{domain}' {verb} as autostarted"));
        }
        Command::Console { domain } => console::attach(&client, &domain, false)?,
        Command::Event { domain, event, looping, timeout, all: _ } => {
            let kind = match event.as_deref() {
                None => None,
                Some(k) => Some(output::parse_event_kind(k).ok_or_else(|| {
                    Failure::Usage(format!(
                        "event '{k}' is not one of defined, undefined, started, suspended, resumed, stopped, shutdown, crashed"
                    ))
                })?),
            };
            run_events(&client, domain, kind, looping, timeout, json)?;
        }
        Command::Setmem { domain, size, config, live, current: _ } => {
            let kib = sizes::parse_memory_kib(&size).map_err(Failure::Usage)?;
            let info = client.set_memory(&domain, kib, config && !live)?;
            done(&info, format!("Domain '{domain}' memory set to {kib} KiB in its configuration"));
        }
        Command::Setvcpus { domain, count, config, live, current: _ } => {
            let info = client.set_vcpus(&domain, count, config && !live)?;
            done(&info, format!("Domain '{domain}' vCPUs set to {count} in its configuration"));
        }
        Command::Domdisplay { domain } => match client.display(&domain)?.uri {
            Some(uri) if json => print_json(&serde_json::json!({ "uri": uri })),
            Some(uri) => println!("{uri}\n"),
            None => return Err(Failure::Usage(format!("no graphical display found for domain '{domain}' (define it with --graphics vnc, qemu driver)"))),
        },
        Command::Version => {
            let v = client.version();
            if json {
                print_json(&serde_json::json!({ "client": ferrovirt_api::VERSION, "daemon": v.as_ref().ok() }));
            } else {
                println!("Compiled against library: ferrovirt {}", ferrovirt_api::VERSION);
                println!("Using API: ferrovirt v1");
                let v = v?;
                println!("Running daemon: ferrovirtd {}", v.daemon);
                println!("Default driver: {} ({})", v.default_driver, v.default_reason);
                println!();
            }
        }
        Command::HostValidate => {
            let mut checks = hostval::run();
            // The daemon says which networks it runs; what carries our mark and none of them owns
            // is left over (see leftovers.rs).
            let nets = client.net_list(true).map_err(|e| e.to_string());
            checks.push(hostval::leftovers(
                nets.as_deref().map_err(String::as_str),
                &cli.connect,
            ));
            if json {
                print_json(&checks);
            } else {
                hostval::print(&checks);
            }
            if checks.iter().any(|c| c.result == hostval::Verdict::Fail) {
                std::process::exit(1);
            }
        }
        Command::Install(args) => install::run(&client, &args, json)?,
        Command::Net(cmd) => net::run(&client, cmd, json)?,
        Command::Snapshot(cmd) => snapshot::run(&client, cmd, json)?,
        Command::Save(cmd) => save::run(&client, cmd, json)?,
    }
    Ok(())
}

fn run_events(
    client: &Client,
    domain: Option<String>,
    kind: Option<EventKind>,
    looping: bool,
    timeout: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    if let Some(secs) = timeout {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(secs));
            println!("event loop timed out");
            std::process::exit(0);
        });
    }
    let mut count = 0u64;
    client.events(|ev| {
        if domain.as_ref().is_some_and(|d| *d != ev.domain) || kind.is_some_and(|k| k != ev.kind) {
            return true;
        }
        count += 1;
        if json {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
        } else {
            println!("{}", output::event_line(&ev));
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        looping
    })?;
    if !json {
        println!("events received: {count}\n");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Img { args } = cli.command {
        return ExitCode::from(ferrovirt_disk::img_cli::run(args).clamp(0, 255) as u8);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Client(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::FAILURE
        }
    }
}
