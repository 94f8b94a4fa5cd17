//! `ferrovirt install`: virt-install's options (`--opt value` and `--opt=value`), thin volumes in
//! the default pool, define + start, then the console unless told not to.

use std::path::PathBuf;

use clap::Args;
use ferrovirt_api::client::{Client, DefFormat};
use ferrovirt_api::def::{
    BootDev, DiskDef, DiskDevice, DiskFormat, GraphicsDef, GraphicsKind, InterfaceDef,
    InterfaceKind,
};
use ferrovirt_api::msg::{CloudInitRequest, VolumeCreateRequest};
use ferrovirt_api::DomainOp;
use ferrovirt_api::{DomainDef, VirtType};

use crate::sizes::parse_gib;
use crate::Failure;

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Name of the new domain
    #[arg(short = 'n', long)]
    pub name: String,
    /// Memory in MiB (also "memory=MIB")
    #[arg(long, visible_alias = "ram", short = 'r')]
    pub memory: Option<String>,
    /// Number of vCPUs (also "N,maxvcpus=M" / "vcpus=N")
    #[arg(long)]
    pub vcpus: Option<String>,
    /// Driver: kvm (ferrovmm), qemu, or test; default from the host
    #[arg(long = "virt-type")]
    pub virt_type: Option<String>,
    /// Guest OS name (accepted for compatibility; ferrovirt has no OS database)
    #[arg(long = "os-variant", visible_alias = "osinfo")]
    pub os_variant: Option<String>,
    /// Install from this ISO image (qemu driver: SeaBIOS boots it)
    #[arg(long)]
    pub cdrom: Option<PathBuf>,
    /// Boot the first disk as is, no installation
    #[arg(long)]
    pub import: bool,
    /// kernel=PATH,initrd=PATH,kernel_args=ARGS (direct kernel boot) or a boot order like cdrom,hd
    #[arg(long)]
    pub boot: Option<String>,
    /// size=GIB | path=FILE[,format=raw|qcow2][,device=disk|cdrom] | none  (repeatable)
    #[arg(long)]
    pub disk: Vec<String>,
    /// default | network=NAME | bridge=BR[,mac=MAC] | none  (repeatable)
    #[arg(long, short = 'w')]
    pub network: Vec<String>,
    /// vnc[,listen=127.0.0.1] | none
    #[arg(long)]
    pub graphics: Option<String>,
    /// Do not attach to the console after starting
    #[arg(long)]
    pub noautoconsole: bool,
    /// text (default) | none
    #[arg(long)]
    pub autoconsole: Option<String>,
    /// NoCloud seed ISO: user-data=FILE, meta-data=FILE, ssh-key=FILE, root-password-file=FILE,
    /// root-password-generate=on|off, disable=on|off (default: generated root password)
    #[arg(long = "cloud-init", num_args = 0..=1, default_missing_value = "")]
    pub cloud_init: Option<String>,
    /// Mark the domain autostarted
    #[arg(long)]
    pub autostart: bool,
    /// Create a transient domain (gone when it stops) instead of defining it
    #[arg(long)]
    pub transient: bool,
}

fn fail(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

/// "key=value,key=value" with an optional leading bare value.
fn options(spec: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut bare = None;
    let mut kv = Vec::new();
    for (i, part) in spec.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, v)) => kv.push((k.trim().to_string(), v.to_string())),
            None if i == 0 => bare = Some(part.to_string()),
            None => kv.push((part.trim().to_string(), String::new())),
        }
    }
    (bare, kv)
}

fn first_number(spec: &str, key: &str) -> Result<u64, Failure> {
    let (bare, kv) = options(spec);
    let value = bare.or_else(|| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()));
    value
        .as_deref()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| fail(format!("--{key} '{spec}' is not a number")))
}

fn sniff_format(path: &PathBuf) -> DiskFormat {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|_| magic == *b"QFI\xfb")
        .unwrap_or(false);
    if is_qcow2 {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// A disk to create in the pool before defining.
struct PlannedVolume {
    name: String,
    size: u64,
}

pub fn run(client: &Client, a: &InstallArgs, json: bool) -> Result<(), Failure> {
    let mut def = DomainDef::new(&a.name);
    let memory = a
        .memory
        .as_deref()
        .ok_or_else(|| fail("--memory MIB is required (e.g. --memory 1024)"))?;
    // virt-install's --memory is MiB; the definition keeps KiB.
    def.memory_kib = first_number(memory, "memory")?
        .checked_mul(1024)
        .ok_or_else(|| fail(format!("--memory '{memory}' MiB is too large")))?;
    if let Some(v) = &a.vcpus {
        def.vcpus = first_number(v, "vcpus")? as u32;
    }
    def.virt_type = match a.virt_type.as_deref() {
        None => None,
        Some(t) => Some(
            VirtType::parse(t)
                .ok_or_else(|| fail(format!("--virt-type '{t}' is not kvm, qemu or test")))?,
        ),
    };
    let version = client.version()?;
    if def.virt_type.is_none() {
        eprintln!(
            "Using the {} driver: {}",
            version.default_driver, version.default_reason
        );
    }
    if let Some(os) = &a.os_variant {
        eprintln!("WARNING --os-variant {os} is accepted but not used: ferrovirt has no OS database (defaults: virtio disk and network)");
    }
    if let Some(boot) = &a.boot {
        let (bare, kv) = options(boot);
        for token in bare.into_iter().map(|b| (b, String::new())).chain(kv) {
            match (token.0.as_str(), token.1) {
                ("kernel", v) => def.os.kernel = Some(v.into()),
                ("initrd", v) => def.os.initrd = Some(v.into()),
                ("kernel_args" | "cmdline", v) => def.os.cmdline = Some(v),
                ("hd", _) => def.os.boot.push(BootDev::Hd),
                ("cdrom", _) => def.os.boot.push(BootDev::Cdrom),
                ("network", _) => def.os.boot.push(BootDev::Network),
                ("uefi", _) => return Err(fail("--boot uefi is not supported yet (SeaBIOS only)")),
                (other, _) => return Err(fail(format!("--boot option '{other}' is not known (kernel=, initrd=, kernel_args=, hd, cdrom, network)"))),
            }
        }
    }
    if let Some(iso) = &a.cdrom {
        def.disks.push(DiskDef {
            path: iso.clone(),
            format: DiskFormat::Raw,
            device: DiskDevice::Cdrom,
            target: None,
            readonly: true,
        });
        if def.os.boot.is_empty() {
            def.os.boot = vec![BootDev::Cdrom, BootDev::Hd];
        }
    }
    if def.os.kernel.is_none() && a.cdrom.is_none() && !a.import {
        return Err(fail("an install method is required: --cdrom ISO, --import (boot the disk) or --boot kernel=PATH"));
    }
    let mut planned = Vec::new();
    let no_disks = a.disk.iter().any(|d| d == "none");
    for spec in a.disk.iter().filter(|d| *d != "none") {
        let (bare, kv) = options(spec);
        let mut path = bare.map(PathBuf::from);
        let (mut size, mut format, mut device) = (None, None, DiskDevice::Disk);
        for (k, v) in kv {
            match k.as_str() {
                "path" => path = Some(v.into()),
                "size" => size = Some(parse_gib(&v).map_err(fail)?),
                "format" => {
                    format = Some(match v.as_str() {
                        "qcow2" => DiskFormat::Qcow2,
                        "raw" => DiskFormat::Raw,
                        other => {
                            return Err(fail(format!("disk format '{other}' is not raw or qcow2")))
                        }
                    })
                }
                "device" => {
                    device = match v.as_str() {
                        "disk" => DiskDevice::Disk,
                        "cdrom" => DiskDevice::Cdrom,
                        other => {
                            return Err(fail(format!("disk device '{other}' is not disk or cdrom")))
                        }
                    }
                }
                "pool" if v == "default" => {}
                "pool" => {
                    return Err(fail(format!(
                        "storage pool '{v}' does not exist (only 'default')"
                    )))
                }
                "bus" | "sparse" | "cache" | "target" => {
                    eprintln!("WARNING --disk {k}={v} is ignored (ferrovirt picks virtio, thin)")
                }
                other => {
                    return Err(fail(format!(
                        "--disk option '{other}' is not known (size=, path=, format=, device=)"
                    )))
                }
            }
        }
        let path = match (path, size) {
            (Some(p), _) if p.exists() => p,
            (Some(p), _) => {
                return Err(fail(format!(
                    "disk path '{}' does not exist; to create a new volume use --disk size=GIB",
                    p.display()
                )))
            }
            (None, Some(size)) => {
                let index = def
                    .disks
                    .iter()
                    .filter(|d| d.device == DiskDevice::Disk)
                    .count();
                let vol = if index == 0 {
                    format!("{}.qcow2", a.name)
                } else {
                    format!("{}-{index}.qcow2", a.name)
                };
                let p = PathBuf::from(&version.images_dir).join(&vol);
                planned.push(PlannedVolume { name: vol, size });
                format = Some(DiskFormat::Qcow2);
                p
            }
            (None, None) => {
                return Err(fail(format!("--disk '{spec}' needs size=GIB or path=FILE")))
            }
        };
        let format = format.unwrap_or_else(|| sniff_format(&path));
        def.disks.push(DiskDef {
            path,
            format,
            device,
            target: None,
            readonly: device == DiskDevice::Cdrom,
        });
    }
    if no_disks && !a.disk.iter().all(|d| d == "none") {
        return Err(fail(
            "--disk none cannot be combined with other --disk options",
        ));
    }
    for spec in &a.network {
        let (bare, kv) = options(spec);
        let mut nic = match bare.as_deref() {
            Some("none") => continue,
            Some("default") => InterfaceDef {
                kind: InterfaceKind::Network,
                source: "default".into(),
                mac: None,
            },
            Some(other) => {
                return Err(fail(format!(
                    "--network '{other}' is not default, none, network=NAME or bridge=BR"
                )))
            }
            None => InterfaceDef {
                kind: InterfaceKind::Network,
                source: String::new(),
                mac: None,
            },
        };
        for (k, v) in kv {
            match k.as_str() {
                "network" => {
                    nic = InterfaceDef {
                        kind: InterfaceKind::Network,
                        source: v,
                        mac: nic.mac,
                    }
                }
                "bridge" => {
                    nic = InterfaceDef {
                        kind: InterfaceKind::Bridge,
                        source: v,
                        mac: nic.mac,
                    }
                }
                "mac" | "mac.address" => nic.mac = Some(v.to_ascii_lowercase()),
                "model" | "model.type" if v == "virtio" => {}
                "model" | "model.type" => {
                    eprintln!("WARNING --network model={v} replaced by virtio")
                }
                other => {
                    return Err(fail(format!(
                        "--network option '{other}' is not known (network=, bridge=, mac=, model=)"
                    )))
                }
            }
        }
        if nic.source.is_empty() {
            return Err(fail(format!(
                "--network '{spec}' needs network=NAME or bridge=BR"
            )));
        }
        def.interfaces.push(nic);
    }
    if a.network.is_empty() {
        eprintln!("WARNING no --network given: the VM gets no network interface (use --network bridge=BR)");
    }
    match a.graphics.as_deref().map(options) {
        None => {}
        Some((Some(kind), kv)) if kind == "none" && kv.is_empty() => {}
        Some((Some(kind), kv)) if kind == "vnc" => {
            let get = |key: &str| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            // The daemon decides whether the address is allowed (loopback unless it runs with
            // --allow-remote-vnc, and then with a password).
            let listen = match get("listen").as_deref() {
                None | Some("localhost") => "127.0.0.1".to_string(),
                Some(other) => other.to_string(),
            };
            def.graphics = Some(GraphicsDef {
                kind: GraphicsKind::Vnc,
                listen,
                passwd: get("password"),
            });
        }
        Some(_) => {
            return Err(fail(format!(
                "--graphics '{}' is not supported (vnc or none)",
                a.graphics.as_deref().unwrap_or("")
            )))
        }
    }

    let cloud_init = match &a.cloud_init {
        None => None,
        Some(spec) => {
            let seed = cloud_init_seed(&a.name, spec)?;
            let name = format!("{}-cidata.iso", a.name);
            def.disks.push(DiskDef {
                path: PathBuf::from(&version.images_dir).join(&name),
                format: DiskFormat::Raw,
                device: DiskDevice::Cdrom,
                target: None,
                readonly: true,
            });
            Some((name, seed))
        }
    };

    // Every check the daemon can make, before anything is created.
    let body = serde_json::to_string(&def).map_err(|e| fail(e.to_string()))?;
    client.define_opts(&body, DefFormat::Json, a.transient, true)?;

    let mut created = Vec::new();
    let cleanup = |created: &Vec<String>| {
        for vol in created {
            let _ = client.delete_volume(vol);
        }
    };
    for vol in &planned {
        eprintln!(
            "Allocating '{}' ({} GiB, thin qcow2) ...",
            vol.name,
            vol.size as f64 / (1u64 << 30) as f64
        );
        let req = VolumeCreateRequest {
            name: vol.name.clone(),
            capacity_bytes: vol.size,
            format: "qcow2".into(),
        };
        if let Err(e) = client.create_volume(&req) {
            cleanup(&created);
            return Err(e.into());
        }
        created.push(vol.name.clone());
    }
    if let Some((name, seed)) = &cloud_init {
        eprintln!("Making the cloud-init seed '{name}' ...");
        let req = CloudInitRequest {
            name: name.clone(),
            user_data: seed.user_data.clone(),
            meta_data: seed.meta_data.clone(),
        };
        if let Err(e) = client.create_cloud_init(&req) {
            cleanup(&created);
            return Err(e.into());
        }
        created.push(name.clone());
    }
    eprintln!("Starting install...");
    let resp = match client.define_opts(&body, DefFormat::Json, a.transient, false) {
        Ok(r) => r,
        Err(e) => {
            cleanup(&created);
            return Err(e.into());
        }
    };
    for w in &resp.warnings {
        eprintln!("WARNING {w}");
    }
    let info = if a.transient {
        resp.domain
    } else {
        if a.autostart {
            client.set_autostart(&a.name, true)?;
        }
        client.action(&a.name, DomainOp::Start)?
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        );
    } else {
        println!(
            "Domain '{}' started ({} driver, id {})",
            info.name,
            info.virt_type.as_str(),
            info.id.unwrap_or(0)
        );
    }
    if let Some(password) = cloud_init
        .as_ref()
        .and_then(|(_, seed)| seed.generated_password.clone())
    {
        println!("Generated password for first root login: {password}");
    }
    if def.graphics.is_some() {
        if let Ok(d) = client.display(&a.name) {
            if let Some(uri) = d.uri {
                eprintln!("Display: {uri} (ferrovirt domdisplay {})", a.name);
            }
        }
    }
    let autoconsole = !a.noautoconsole && a.autoconsole.as_deref() != Some("none");
    if autoconsole {
        crate::console::attach(client, &a.name, true)?;
    } else if !json {
        println!(
            "Domain creation completed. Attach with: ferrovirt console {}",
            a.name
        );
    }
    Ok(())
}

/// What goes on the NoCloud seed.
struct CloudInitSeed {
    user_data: String,
    meta_data: String,
    generated_password: Option<String>,
}

fn read_option_file(key: &str, path: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| fail(format!("--cloud-init {key}={path}: {e}")))
}

fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// virt-install's --cloud-init: user-data=, meta-data=, ssh-key=, root-password-file=,
/// root-password-generate=on|off, disable=on|off. Without user-data a #cloud-config is
/// generated: root password (generated and printed unless given), root's SSH key, and
/// cloud-init disabled after the first boot (disable=on, as virt-install does).
fn cloud_init_seed(name: &str, spec: &str) -> Result<CloudInitSeed, Failure> {
    let (bare, kv) = options(spec);
    if let Some(b) = bare.filter(|b| !b.is_empty()) {
        return Err(fail(format!("--cloud-init option '{b}' needs a value (user-data=FILE, meta-data=FILE, ssh-key=FILE ...)")));
    }
    let (mut user_data, mut meta_data, mut ssh_key, mut password) = (None, None, None, None);
    let (mut generate, mut disable) = (true, true);
    let on = |k: &str, v: &str| match v {
        "on" | "yes" | "true" | "" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(fail(format!("--cloud-init {k}='{v}' is not on or off"))),
    };
    for (k, v) in kv {
        match k.as_str() {
            "user-data" => user_data = Some(read_option_file(&k, &v)?),
            "meta-data" => meta_data = Some(read_option_file(&k, &v)?),
            "ssh-key" => ssh_key = Some(read_option_file(&k, &v)?.trim().to_string()),
            "root-password-file" => password = Some(read_option_file(&k, &v)?.trim().to_string()),
            "root-password-generate" => generate = on(&k, &v)?,
            "disable" => disable = on(&k, &v)?,
            other => {
                return Err(fail(format!(
                    "--cloud-init option '{other}' is not known (user-data=, meta-data=, ssh-key=, root-password-file=, root-password-generate=, disable=)"
                )))
            }
        }
    }
    let meta_data =
        meta_data.unwrap_or_else(|| format!("instance-id: {name}\nlocal-hostname: {name}\n"));
    if let Some(user_data) = user_data {
        return Ok(CloudInitSeed {
            user_data,
            meta_data,
            generated_password: None,
        });
    }
    let mut generated_password = None;
    if password.is_none() && generate {
        let p = random_password();
        generated_password = Some(p.clone());
        password = Some(p);
    }
    let mut ud = String::from("#cloud-config\n");
    if let Some(p) = &password {
        ud.push_str(&format!(
            "chpasswd:\n  list: |\n    root:{p}\n  expire: {}\nssh_pwauth: true\n",
            generated_password.is_some()
        ));
    }
    if let Some(key) = &ssh_key {
        ud.push_str(&format!(
            "users:\n  - name: root\n    ssh_authorized_keys:\n      - {key}\n"
        ));
    }
    if disable {
        ud.push_str("runcmd:\n  - [touch, /etc/cloud/cloud-init.disabled]\n");
    }
    Ok(CloudInitSeed {
        user_data: ud,
        meta_data,
        generated_password,
    })
}
