//! virsh's snapshot verbs: snapshot-create-as, snapshot-create, snapshot-list, snapshot-info,
//! snapshot-dumpxml, snapshot-current, snapshot-revert, snapshot-delete, snapshot-parent,
//! snapshot-edit.

use std::path::PathBuf;

use clap::Subcommand;
use ferrovirt_api::client::Client;
use ferrovirt_api::snapshot::{
    DiskSpec, EditRequest, Location, RevertRequest, SnapshotInfo, SnapshotRequest,
};

use crate::net::table;
use crate::{print_json, read_file, Failure};

// The variants are virsh's verbs (snapshot-create-as ...), which clap derives from their names.
#[allow(clippy::enum_variant_names)]
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (full, or --disk-only; external unless --diskspec says internal)
    SnapshotCreateAs {
        domain: String,
        /// Snapshot name (default: the time in seconds)
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Disks only, no memory
        #[arg(long)]
        disk_only: bool,
        /// Accepted: the VM pauses only while its memory is written
        #[arg(long)]
        live: bool,
        /// Accepted: every snapshot is atomic
        #[arg(long)]
        atomic: bool,
        /// Memory file: file=PATH (or snapshot=no)
        #[arg(long)]
        memspec: Option<String>,
        /// Per disk: vda[,snapshot=internal|external|no][,file=PATH] (repeatable)
        #[arg(long)]
        diskspec: Vec<String>,
        /// Keep no metadata
        #[arg(long)]
        no_metadata: bool,
        /// Freeze guest file systems (needs a guest agent)
        #[arg(long)]
        quiesce: bool,
    },
    /// Take a snapshot described by libvirt <domainsnapshot> XML
    SnapshotCreate {
        domain: String,
        xmlfile: PathBuf,
        #[arg(long)]
        disk_only: bool,
        #[arg(long)]
        live: bool,
        #[arg(long)]
        atomic: bool,
    },
    /// List a domain's snapshots
    SnapshotList {
        domain: String,
        /// As a tree of parents and children
        #[arg(long)]
        tree: bool,
        /// With each snapshot's parent
        #[arg(long)]
        parent: bool,
        /// Only the current snapshot
        #[arg(long)]
        current: bool,
        /// Names only
        #[arg(long)]
        name: bool,
    },
    /// Show a snapshot's information
    SnapshotInfo {
        domain: String,
        snapshotname: Option<String>,
        /// The current snapshot
        #[arg(long)]
        current: bool,
    },
    /// Print a snapshot's <domainsnapshot> XML
    SnapshotDumpxml {
        domain: String,
        snapshotname: String,
    },
    /// Show the current snapshot (its XML, or --name)
    SnapshotCurrent {
        domain: String,
        #[arg(long)]
        name: bool,
        /// Make this snapshot the current one
        snapshotname: Option<String>,
    },
    /// Revert the domain to a snapshot
    SnapshotRevert {
        domain: String,
        snapshotname: Option<String>,
        /// Revert to the current snapshot
        #[arg(long)]
        current: bool,
        #[arg(long)]
        running: bool,
        #[arg(long)]
        paused: bool,
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot (its data merges into the images that still need it)
    SnapshotDelete {
        domain: String,
        snapshotname: Option<String>,
        #[arg(long)]
        current: bool,
        /// Its descendants too
        #[arg(long)]
        children: bool,
        /// Only its descendants
        #[arg(long)]
        children_only: bool,
        /// Only the metadata: keep every image and file
        #[arg(long)]
        metadata: bool,
    },
    /// Print a snapshot's parent
    SnapshotParent {
        domain: String,
        snapshotname: Option<String>,
        #[arg(long)]
        current: bool,
    },
    /// Change a snapshot's description (or make it current)
    SnapshotEdit {
        domain: String,
        snapshotname: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Make it the current snapshot
        #[arg(long)]
        current: bool,
    },
}

/// `2026-12-07 20:00:00 +0000` from milliseconds since the epoch (UTC), as virsh lists them.
fn time(ms: u64) -> String {
    format!("{} +0000", crate::net::utc((ms / 1000).max(1)))
}

fn memspec(spec: &str, req: &mut SnapshotRequest) -> Result<(), Failure> {
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("file", f)) => req.memory_file = Some(f.into()),
            Some(("snapshot", s)) => {
                let l = Location::parse(s).map_err(|e| Failure::Usage(e.message))?;
                req.memory = Some(l);
                if l == Location::No {
                    req.disk_only = true;
                }
            }
            None if !part.is_empty() => req.memory_file = Some(part.into()),
            _ => {
                return Err(Failure::Usage(format!(
                    "--memspec '{spec}': '{part}' is not file=PATH or snapshot=…"
                )))
            }
        }
    }
    Ok(())
}

/// The snapshot named, or the current one with --current.
fn which(
    client: &Client,
    domain: &str,
    name: Option<String>,
    current: bool,
) -> Result<String, Failure> {
    match (name, current) {
        (Some(n), _) => Ok(n),
        (None, true) => Ok(client.snapshot_current(domain)?.name),
        (None, false) => Err(Failure::Usage("name a snapshot or pass --current".into())),
    }
}

fn tree_lines(all: &[SnapshotInfo], parent: Option<&str>, indent: &str, out: &mut String) {
    let kids: Vec<&SnapshotInfo> = all
        .iter()
        .filter(|s| s.parent.as_deref() == parent)
        .collect();
    for (i, s) in kids.iter().enumerate() {
        let last = i + 1 == kids.len();
        if parent.is_none() {
            out.push_str(&format!("{}\n", s.name));
            tree_lines(all, Some(&s.name), "  ", out);
        } else {
            out.push_str(&format!("{indent}|\n{indent}+- {}\n", s.name));
            let next = format!("{indent}{}", if last { "    " } else { "|   " });
            tree_lines(all, Some(&s.name), &next, out);
        }
    }
}

fn info_text(s: &SnapshotInfo) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!(
        "Name:           {}\nDomain:         {}\nCurrent:        {}\nState:          {}\nLocation:       {}\nParent:         {}\nChildren:       {}\nDescendants:    {}\nMetadata:       yes\n\n",
        s.name,
        s.domain,
        yes(s.current),
        s.state.as_str(),
        s.location(),
        s.parent.as_deref().unwrap_or("-"),
        s.children.len(),
        s.descendants
    )
}

pub fn run(client: &Client, cmd: SnapshotCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        SnapshotCommand::SnapshotCreateAs {
            domain,
            name,
            description,
            disk_only,
            live,
            atomic,
            memspec: mem,
            diskspec,
            no_metadata,
            quiesce,
        } => {
            let mut req = SnapshotRequest {
                name,
                description,
                disk_only,
                live,
                atomic,
                no_metadata,
                quiesce,
                ..Default::default()
            };
            if let Some(m) = mem {
                memspec(&m, &mut req)?;
            }
            for d in diskspec {
                req.disks.push(DiskSpec::parse(&d).map_err(Failure::Usage)?);
            }
            let r = client.snapshot_create(&domain, &req)?;
            let name = r.snapshot.map(|s| s.name).unwrap_or_default();
            if json {
                print_json(&serde_json::json!({ "snapshot": name }));
            } else {
                println!("Domain snapshot {name} created\n");
            }
        }
        SnapshotCommand::SnapshotCreate {
            domain,
            xmlfile,
            disk_only,
            live: _,
            atomic: _,
        } => {
            let xml = read_file(&xmlfile)?;
            let r = client.snapshot_create_xml(&domain, &xml, disk_only)?;
            let name = r.snapshot.map(|s| s.name).unwrap_or_default();
            if json {
                print_json(&serde_json::json!({ "snapshot": name }));
            } else {
                println!(
                    "Domain snapshot {name} created from '{}'\n",
                    xmlfile.display()
                );
            }
        }
        SnapshotCommand::SnapshotList {
            domain,
            tree,
            parent,
            current,
            name,
        } => {
            let mut all = client.snapshot_list(&domain)?;
            if current {
                all.retain(|s| s.current);
            }
            if json {
                print_json(&all);
            } else if tree {
                let mut out = String::new();
                tree_lines(&all, None, "", &mut out);
                println!("{out}");
            } else if name {
                for s in &all {
                    println!("{}", s.name);
                }
                println!();
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|s| {
                        let mut r =
                            vec![s.name.clone(), time(s.created_ms), s.state.as_str().into()];
                        if parent {
                            r.push(s.parent.clone().unwrap_or_default());
                        }
                        r
                    })
                    .collect();
                let mut head = vec!["Name", "Creation Time", "State"];
                if parent {
                    head.push("Parent");
                }
                print!("{}", table(&head, &rows));
            }
        }
        SnapshotCommand::SnapshotInfo {
            domain,
            snapshotname,
            current,
        } => {
            let name = which(client, &domain, snapshotname, current)?;
            let s = client.snapshot_get(&domain, &name)?;
            if json {
                print_json(&s);
            } else {
                print!("{}", info_text(&s));
            }
        }
        SnapshotCommand::SnapshotDumpxml {
            domain,
            snapshotname,
        } => print!("{}", client.snapshot_xml(&domain, &snapshotname)?),
        SnapshotCommand::SnapshotCurrent {
            domain,
            name,
            snapshotname,
        } => {
            if let Some(snap) = snapshotname {
                let req = EditRequest {
                    description: None,
                    current: true,
                };
                client.snapshot_edit(&domain, &snap, &req)?;
                println!("Snapshot {snap} set as current\n");
                return Ok(());
            }
            let s = client.snapshot_current(&domain)?;
            if json {
                print_json(&s);
            } else if name {
                println!("{}\n", s.name);
            } else {
                print!("{}", client.snapshot_xml(&domain, &s.name)?);
            }
        }
        SnapshotCommand::SnapshotRevert {
            domain,
            snapshotname,
            current,
            running,
            paused,
            force,
        } => {
            let name = which(client, &domain, snapshotname, current)?;
            let req = RevertRequest {
                running,
                paused,
                force,
            };
            let r = client.snapshot_revert(&domain, &name, &req)?;
            if json {
                print_json(&r.domain);
            } else {
                println!("Domain '{domain}' reverted to snapshot {name}\n");
            }
        }
        SnapshotCommand::SnapshotDelete {
            domain,
            snapshotname,
            current,
            children,
            children_only,
            metadata,
        } => {
            let name = which(client, &domain, snapshotname, current)?;
            client.snapshot_delete(&domain, &name, children, children_only, metadata)?;
            if json {
                println!("{{}}");
            } else if children_only {
                println!("Domain snapshot {name} children deleted\n");
            } else {
                println!("Domain snapshot {name} deleted\n");
            }
        }
        SnapshotCommand::SnapshotParent {
            domain,
            snapshotname,
            current,
        } => {
            let name = which(client, &domain, snapshotname, current)?;
            let s = client.snapshot_get(&domain, &name)?;
            match s.parent {
                Some(p) => println!("{p}\n"),
                None => return Err(Failure::Usage(format!("snapshot '{name}' has no parent"))),
            }
        }
        SnapshotCommand::SnapshotEdit {
            domain,
            snapshotname,
            description,
            current,
        } => {
            let name = which(
                client,
                &domain,
                snapshotname,
                current && description.is_some(),
            )?;
            let req = EditRequest {
                description,
                current,
            };
            let s = client.snapshot_edit(&domain, &name, &req)?;
            if json {
                print_json(&s);
            } else {
                println!("Snapshot {name} edited.\n");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_civil_dates() {
        assert_eq!(time(951_827_696_000), "2000-02-29 12:34:56 +0000");
    }
}
