//! Virtual networks: definitions, their kernel objects (bridge, nftables table, dnsmasq), the
//! per-VM TAP devices, and reconciliation with what a crashed daemon left behind.

pub mod api;
pub mod dnsmasq;
pub mod link;
pub mod nft;
pub mod store;

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ferrovirt_api::def::InterfaceKind;
use ferrovirt_api::network::{
    DhcpLease, DomIfAddr, DomInterface, ForwardMode, IpDef, NetworkDef, NetworkInfo,
};
use ferrovirt_api::{netmark, ApiError, DomainDef, ErrorCode};

use crate::runtime::{new_uuid, Paths};
use store::{NetStore, StoredNet};

/// Set (to anything) to keep a fresh daemon from defining the `default` network (tests on a host).
pub const NO_DEFAULT_ENV: &str = "FERROVIRT_NO_DEFAULT_NETWORK";

/// The network defined on a daemon's first start: libvirt's default, one subnet over.
pub fn default_network() -> NetworkDef {
    NetworkDef {
        name: "default".into(),
        uuid: None,
        bridge: Some("fvbr0".into()),
        forward: ForwardMode::Nat,
        ip: Some(IpDef {
            address: Ipv4Addr::new(192, 168, 123, 1),
            prefix: 24,
            dhcp_start: Some(Ipv4Addr::new(192, 168, 123, 2)),
            dhcp_end: Some(Ipv4Addr::new(192, 168, 123, 254)),
        }),
    }
}

/// Host device name of a domain's n-th interface, stable across daemon restarts.
pub fn tap_name(def: &DomainDef, index: usize) -> String {
    format!("fv{}n{index}", uuid8(def.uuid.as_deref()))
}

fn uuid8(uuid: Option<&str>) -> String {
    netmark::uuid8(uuid.unwrap_or(""))
}

/// The alias marking a network's bridge.
fn bridge_alias(def: &NetworkDef) -> String {
    netmark::bridge_alias(&def.name, def.uuid.as_deref().unwrap_or(""))
}

/// The end of the alias of a TAP on this network (re-attached by net-start).
fn tap_owner(def: &NetworkDef) -> String {
    format!("@{}:{}", def.name, uuid8(def.uuid.as_deref()))
}

fn table_of(def: &NetworkDef) -> String {
    netmark::table_name(&def.name, def.uuid.as_deref().unwrap_or(""))
}

fn no_network(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NoNetwork,
        format!("network '{name}' not found (see `ferrovirt net-list --all`)"),
    )
}

/// The bridge name is taken. A ferrovirt mark naming a network uuid this daemon does not know is
/// an orphan (typically of a state folder that was removed while its network ran): say what it
/// is and how to remove it, instead of a bare "choose another name".
fn bridge_taken(bridge: &str, alias: &str) -> ApiError {
    let Some(owner) = netmark::bridge_owner(alias) else {
        return ApiError::invalid(format!(
            "device '{bridge}' already exists on the host and is not this network's bridge; choose another bridge name"
        ));
    };
    let table = netmark::table_name(&owner.network, &owner.uuid8);
    ApiError::invalid(format!(
        "device '{bridge}' already exists: ferrovirt made it for network '{}' with a uuid starting {}, \
         which this daemon does not know (a leftover of another state folder, or a network of another \
         ferrovirtd). If no other ferrovirtd uses it, remove it with `ip link del {bridge}` and \
         `nft delete table ip {table}`, and stop the dnsmasq serving it (`ferrovirt host-validate` \
         lists such leftovers); or give this network another bridge name",
        owner.network, owner.uuid8
    ))
}

struct Inner {
    store: NetStore,
    nets: BTreeMap<String, StoredNet>,
}

pub struct Networks {
    inner: Mutex<Inner>,
    /// run-dir/networks/NAME: dnsmasq config and pid file, nftables rules as loaded.
    run_dir: PathBuf,
    /// state-dir/networks: lease files, saved ip_forward value.
    state_dir: PathBuf,
}

impl Networks {
    pub fn open(paths: &Paths) -> Result<Arc<Networks>, String> {
        let run_dir = paths.run_dir.join("networks");
        let state_dir = paths.state_dir.join("networks");
        for d in [&run_dir, &state_dir] {
            crate::files::private_dir(d)?;
        }
        let store = NetStore::open(&paths.db())?;
        let nets = store
            .load_all()?
            .into_iter()
            .map(|n| (n.def.name.clone(), n))
            .collect();
        Ok(Arc::new(Networks {
            inner: Mutex::new(Inner { store, nets }),
            run_dir,
            state_dir,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn files(&self, name: &str) -> dnsmasq::Files {
        let dir = self.run_dir.join(name);
        dnsmasq::Files {
            conf: dir.join("dnsmasq.conf"),
            pid: dir.join("dnsmasq.pid"),
            leases: self.state_dir.join(format!("{name}.leases")),
        }
    }

    fn info(n: &StoredNet) -> NetworkInfo {
        NetworkInfo {
            name: n.def.name.clone(),
            uuid: n.def.uuid.clone().unwrap_or_default(),
            active: n.active,
            persistent: true,
            autostart: n.autostart,
            bridge: n.def.bridge.clone().unwrap_or_default(),
            forward: n.def.forward,
            address: n
                .def
                .ip
                .as_ref()
                .map(|i| format!("{}/{}", i.address, i.prefix)),
        }
    }

    fn get<'a>(inner: &'a Inner, name: &str) -> Result<&'a StoredNet, ApiError> {
        inner
            .nets
            .get(name)
            .or_else(|| {
                inner
                    .nets
                    .values()
                    .find(|n| n.def.uuid.as_deref() == Some(name))
            })
            .ok_or_else(|| no_network(name))
    }

    /// Daemon start: define `default` the first time, bring back what should run, remove what a
    /// crashed daemon left behind, autostart. `our_taps`: the TAP names of every domain of this
    /// daemon; `keep_taps`: those of domains recorded as running.
    pub fn startup(self: &Arc<Self>, our_taps: &[String], keep_taps: &[String]) {
        self.define_default_once();
        self.reconcile(our_taps, keep_taps);
        let names: Vec<String> = {
            let inner = self.lock();
            inner
                .nets
                .values()
                .filter(|n| n.autostart && !n.active)
                .map(|n| n.def.name.clone())
                .collect()
        };
        for name in names {
            match self.start(&name) {
                Ok(_) => eprintln!("ferrovirtd: network '{name}' autostarted"),
                Err(e) => eprintln!("ferrovirtd: autostart of network '{name}' failed: {e}"),
            }
        }
        self.supervise();
    }

    fn define_default_once(&self) {
        let mut inner = self.lock();
        if inner.store.meta("default_defined").is_some()
            || std::env::var_os(NO_DEFAULT_ENV).is_some()
        {
            return;
        }
        let mut def = default_network();
        def.uuid = Some(new_uuid());
        let stored = StoredNet {
            def,
            autostart: true,
            active: false,
        };
        if !inner.nets.contains_key("default") {
            if let Err(e) = inner.store.put(&stored) {
                eprintln!("ferrovirtd: cannot define the default network: {e}");
                return;
            }
            inner.nets.insert("default".into(), stored);
            eprintln!("ferrovirtd: defined network 'default' (fvbr0, 192.168.123.1/24, NAT)");
        }
        let _ = inner.store.set_meta("default_defined", "1");
    }

    /// Make the host match the records: adopt or rebuild what should run, delete our leftovers.
    /// Only objects with our marks are touched: never the host's, never another daemon's.
    fn reconcile(&self, our_taps: &[String], keep_taps: &[String]) {
        let mut inner = self.lock();
        let names: Vec<String> = inner.nets.keys().cloned().collect();
        for name in &names {
            let Some(n) = inner.nets.get(name).cloned() else {
                continue;
            };
            if n.active {
                if let Err(e) = self.bring_up(&n.def) {
                    eprintln!("ferrovirtd: network '{name}' was active but cannot be restored: {e}; marking it inactive");
                    self.tear_down(&n.def);
                    let mut n = n.clone();
                    n.active = false;
                    let _ = inner.store.put(&n);
                    inner.nets.insert(name.clone(), n);
                } else {
                    eprintln!("ferrovirtd: network '{name}' restored");
                }
            }
        }
        let active_names: Vec<String> = inner
            .nets
            .values()
            .filter(|n| n.active)
            .map(|n| n.def.name.clone())
            .collect();
        for (dev, alias) in link::devices() {
            let stale = if alias.starts_with(netmark::BRIDGE_ALIAS) {
                inner
                    .nets
                    .values()
                    .find(|n| bridge_alias(&n.def) == alias)
                    .is_some_and(|n| {
                        !n.active
                            || n.def.forward == ForwardMode::Bridge
                            || n.def.bridge.as_deref() != Some(dev.as_str())
                    })
            } else if alias.starts_with(netmark::TAP_ALIAS) {
                our_taps.contains(&dev) && !keep_taps.contains(&dev)
            } else {
                false
            };
            if stale {
                eprintln!("ferrovirtd: removing leftover device {dev} ({alias})");
                if let Err(e) = link::delete(&dev) {
                    eprintln!("ferrovirtd: {e}");
                }
            }
        }
        if let Ok(tables) = nft::tables() {
            for n in inner.nets.values() {
                let t = table_of(&n.def);
                let wanted = n.active && n.def.forward != ForwardMode::Bridge;
                if !wanted && tables.contains(&t) {
                    eprintln!("ferrovirtd: removing leftover nftables table ip {t}");
                    let _ = nft::delete(&t);
                }
            }
        }
        for (pid, conf) in dnsmasq::find_under(&self.run_dir) {
            let owner = conf
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !active_names.contains(&owner) {
                eprintln!(
                    "ferrovirtd: stopping leftover dnsmasq {pid} ({})",
                    conf.display()
                );
                dnsmasq::stop_pid(pid);
            }
        }
        self.restore_ip_forward(&inner);
    }

    /// Restart a network's dnsmasq when it died (checked every 2 s).
    fn supervise(self: &Arc<Self>) {
        let me: Weak<Networks> = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("net-supervisor".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(2));
                let Some(nets) = me.upgrade() else { return };
                let inner = nets.lock();
                for n in inner.nets.values().filter(|n| n.active) {
                    let (Some(ip), Some(br)) = (&n.def.ip, &n.def.bridge) else {
                        continue;
                    };
                    let files = nets.files(&n.def.name);
                    if dnsmasq::running(&files).is_none() {
                        let conf = dnsmasq::config(&files, &n.def.name, n.def.forward, br, ip);
                        match dnsmasq::start(&files, &conf) {
                            Ok(pid) => eprintln!(
                                "ferrovirtd: dnsmasq of network '{}' had died; restarted (pid {pid})",
                                n.def.name
                            ),
                            Err(e) => eprintln!(
                                "ferrovirtd: dnsmasq of network '{}' is down and cannot restart: {e}",
                                n.def.name
                            ),
                        }
                    }
                }
            });
    }

    pub fn list(&self, all: bool) -> Vec<NetworkInfo> {
        let inner = self.lock();
        inner
            .nets
            .values()
            .filter(|n| all || n.active)
            .map(Self::info)
            .collect()
    }

    pub fn info_of(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let inner = self.lock();
        Self::get(&inner, name).map(Self::info)
    }

    pub fn definition(&self, name: &str) -> Result<NetworkDef, ApiError> {
        let inner = self.lock();
        Self::get(&inner, name).map(|n| n.def.clone())
    }

    /// Another network whose subnet overlaps `ip` (all defined ones, or only active ones).
    fn overlapping<'a>(
        inner: &'a Inner,
        me: &str,
        ip: &IpDef,
        only_active: bool,
    ) -> Option<&'a StoredNet> {
        inner.nets.values().find(|n| {
            n.def.name != me
                && (!only_active || n.active)
                && n.def.ip.as_ref().is_some_and(|o| overlaps(o, ip))
        })
    }

    /// net-define: a new network, or a new definition for an existing inactive one.
    pub fn define(&self, mut def: NetworkDef) -> Result<NetworkInfo, ApiError> {
        def.validate()?;
        let mut inner = self.lock();
        let existing = inner.nets.get(&def.name).cloned();
        if let Some(e) = &existing {
            if e.active {
                return Err(ApiError::new(
                    ErrorCode::OperationInvalid,
                    format!(
                        "network '{}' is active: destroy it before changing its definition",
                        def.name
                    ),
                ));
            }
            if def.uuid.is_some() && def.uuid != e.def.uuid {
                return Err(ApiError::new(
                    ErrorCode::DomainExists,
                    format!(
                        "network '{}' already exists with uuid {}",
                        def.name,
                        e.def.uuid.as_deref().unwrap_or("")
                    ),
                ));
            }
            def.uuid = e.def.uuid.clone();
        }
        if let Some(uuid) = &def.uuid {
            if let Some(o) = inner
                .nets
                .values()
                .find(|n| n.def.uuid.as_ref() == Some(uuid) && n.def.name != def.name)
            {
                return Err(ApiError::new(
                    ErrorCode::DomainExists,
                    format!("network '{}' already has uuid {uuid}", o.def.name),
                ));
            }
        }
        if let Some(ip) = &def.ip {
            if let Some(o) = Self::overlapping(&inner, &def.name, ip, false) {
                return Err(ApiError::invalid(format!(
                    "subnet {} overlaps network '{}' ({}); choose another subnet",
                    ip.cidr(),
                    o.def.name,
                    o.def.ip.as_ref().map(IpDef::cidr).unwrap_or_default()
                )));
            }
        }
        if def.forward != ForwardMode::Bridge {
            match &def.bridge {
                // A redefinition without a bridge keeps the one chosen before.
                None => {
                    def.bridge = existing
                        .as_ref()
                        .filter(|e| e.def.forward != ForwardMode::Bridge)
                        .and_then(|e| e.def.bridge.clone())
                        .or_else(|| Some(Self::free_bridge(&inner)))
                }
                Some(br) => {
                    if let Some(o) = inner.nets.values().find(|n| {
                        n.def.name != def.name && n.def.bridge.as_deref() == Some(br.as_str())
                    }) {
                        return Err(ApiError::invalid(format!(
                            "bridge '{br}' is already used by network '{}'",
                            o.def.name
                        )));
                    }
                }
            }
        }
        if def.uuid.is_none() {
            def.uuid = Some(new_uuid());
        }
        let stored = StoredNet {
            def,
            autostart: existing.as_ref().is_some_and(|e| e.autostart),
            active: false,
        };
        inner.store.put(&stored)?;
        let info = Self::info(&stored);
        inner.nets.insert(stored.def.name.clone(), stored);
        Ok(info)
    }

    fn free_bridge(inner: &Inner) -> String {
        (0..)
            .map(|i| format!("fvbr{i}"))
            .find(|b| {
                !link::exists(b)
                    && !inner
                        .nets
                        .values()
                        .any(|n| n.def.bridge.as_deref() == Some(b.as_str()))
            })
            .unwrap_or_else(|| "fvbr0".into())
    }

    pub fn undefine(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let n = Self::get(&inner, name)?.clone();
        if n.active {
            return Err(ApiError::new(
                ErrorCode::OperationInvalid,
                format!(
                    "network '{}' is active: destroy it first (`ferrovirt net-destroy {}`)",
                    n.def.name, n.def.name
                ),
            ));
        }
        inner.store.delete(&n.def.name)?;
        inner.nets.remove(&n.def.name);
        let files = self.files(&n.def.name);
        let _ = fs::remove_file(&files.leases);
        let _ = fs::remove_dir_all(self.run_dir.join(&n.def.name));
        Ok(())
    }

    pub fn set_autostart(&self, name: &str, autostart: bool) -> Result<NetworkInfo, ApiError> {
        let mut inner = self.lock();
        let mut n = Self::get(&inner, name)?.clone();
        n.autostart = autostart;
        inner.store.put(&n)?;
        let info = Self::info(&n);
        inner.nets.insert(n.def.name.clone(), n);
        Ok(info)
    }

    pub fn start(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let mut inner = self.lock();
        let mut n = Self::get(&inner, name)?.clone();
        if n.active {
            return Err(ApiError::new(
                ErrorCode::OperationInvalid,
                format!("network '{}' is already active", n.def.name),
            ));
        }
        self.preflight(&inner, &n.def)?;
        if let Err(e) = self.bring_up(&n.def) {
            self.tear_down(&n.def);
            self.restore_ip_forward(&inner);
            return Err(e);
        }
        n.active = true;
        if let Err(e) = inner.store.put(&n) {
            self.tear_down(&n.def);
            self.restore_ip_forward(&inner);
            return Err(e);
        }
        let info = Self::info(&n);
        inner.nets.insert(n.def.name.clone(), n);
        Ok(info)
    }

    /// Checks before touching the host: the subnet is free, the bridge name is ours to take.
    fn preflight(&self, inner: &Inner, def: &NetworkDef) -> Result<(), ApiError> {
        let bridge = def.bridge.clone().unwrap_or_default();
        if def.forward == ForwardMode::Bridge {
            if !link::is_bridge(&bridge) {
                return Err(ApiError::invalid(format!(
                    "host bridge '{bridge}' of network '{}' does not exist (create it first, e.g. `ip link add {bridge} type bridge`)",
                    def.name
                )));
            }
            return Ok(());
        }
        if link::exists(&bridge) {
            let alias = link::alias(&bridge);
            if alias != bridge_alias(def) {
                return Err(bridge_taken(&bridge, &alias));
            }
        }
        if let Some(ip) = &def.ip {
            if let Some(o) = Self::overlapping(inner, &def.name, ip, true) {
                return Err(ApiError::invalid(format!(
                    "subnet {} overlaps the active network '{}'",
                    ip.cidr(),
                    o.def.name
                )));
            }
            for (dev, net, prefix) in link::routes() {
                if dev == bridge || prefix == 0 {
                    continue;
                }
                let route = IpDef {
                    address: net,
                    prefix,
                    dhcp_start: None,
                    dhcp_end: None,
                };
                if overlaps(&route, ip) {
                    return Err(ApiError::invalid(format!(
                        "subnet {} of network '{}' overlaps the host route {net}/{prefix} on {dev}; starting it would break the host's networking: redefine the network with another subnet",
                        ip.cidr(),
                        def.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Create (or adopt) bridge, nftables table and dnsmasq. Idempotent.
    fn bring_up(&self, def: &NetworkDef) -> Result<(), ApiError> {
        let (Some(bridge), Some(ip)) = (&def.bridge, &def.ip) else {
            // forward = bridge: the host's bridge is used as it is.
            return match &def.bridge {
                Some(b) if link::is_bridge(b) => Ok(()),
                b => Err(ApiError::invalid(format!(
                    "host bridge '{}' does not exist",
                    b.as_deref().unwrap_or("")
                ))),
            };
        };
        let dir = self.run_dir.join(&def.name);
        crate::files::private_dir(&dir).map_err(ApiError::internal)?;
        link::bridge_up(bridge, &bridge_alias(def), ip.address, ip.prefix)?;
        // VMs that kept running while the network was down get their TAPs back on the bridge.
        let suffix = tap_owner(def);
        for (dev, alias) in link::devices() {
            if alias.starts_with(netmark::TAP_ALIAS) && alias.ends_with(&suffix) {
                link::enslave(&dev, bridge)?;
            }
        }
        let table = table_of(def);
        nft::apply(
            &dir.join("nft.rules"),
            &nft::ruleset(&table, def.forward, bridge, ip),
        )?;
        if def.forward == ForwardMode::Nat {
            self.enable_ip_forward()?;
        }
        let files = self.files(&def.name);
        let conf = dnsmasq::config(&files, &def.name, def.forward, bridge, ip);
        dnsmasq::start(&files, &conf)?;
        Ok(())
    }

    /// Remove everything a network made. Only a bridge carrying this network's alias is deleted.
    fn tear_down(&self, def: &NetworkDef) {
        if def.forward == ForwardMode::Bridge {
            return;
        }
        dnsmasq::stop(&self.files(&def.name));
        if let Err(e) = nft::delete(&table_of(def)) {
            eprintln!("ferrovirtd: {e}");
        }
        if let Some(br) = &def.bridge {
            if link::alias(br) == bridge_alias(def) {
                if let Err(e) = link::delete(br) {
                    eprintln!("ferrovirtd: {e}");
                }
            }
        }
    }

    pub fn destroy(&self, name: &str) -> Result<NetworkInfo, ApiError> {
        let mut inner = self.lock();
        let mut n = Self::get(&inner, name)?.clone();
        if !n.active {
            return Err(ApiError::new(
                ErrorCode::OperationInvalid,
                format!("network '{}' is not active", n.def.name),
            ));
        }
        n.active = false;
        inner.store.put(&n)?;
        self.tear_down(&n.def);
        inner.nets.insert(n.def.name.clone(), n.clone());
        self.restore_ip_forward(&inner);
        Ok(Self::info(&n))
    }

    fn saved_forward(&self) -> PathBuf {
        self.state_dir.join("ip_forward.saved")
    }

    /// Turn IPv4 forwarding on, remembering the host's value the first time.
    fn enable_ip_forward(&self) -> Result<(), ApiError> {
        let saved = self.saved_forward();
        if !saved.exists() {
            let was = if link::ip_forward() { "1" } else { "0" };
            fs::write(&saved, was)
                .map_err(|e| ApiError::internal(format!("{}: {e}", saved.display())))?;
        }
        link::set_ip_forward(true)
    }

    /// With no NAT network running any more (ours or, by its nftables table, another daemon's),
    /// give the host its own ip_forward value back.
    fn restore_ip_forward(&self, inner: &Inner) {
        if inner
            .nets
            .values()
            .any(|n| n.active && n.def.forward == ForwardMode::Nat)
        {
            return;
        }
        // Another daemon's network (its table is still loaded) may rely on forwarding too.
        if nft::tables().is_ok_and(|t| !t.is_empty()) {
            return;
        }
        let saved = self.saved_forward();
        if let Ok(was) = fs::read_to_string(&saved) {
            if let Err(e) = link::set_ip_forward(was.trim() == "1") {
                eprintln!("ferrovirtd: {e}");
            }
            let _ = fs::remove_file(&saved);
        }
    }

    pub fn leases(&self, name: &str) -> Result<Vec<DhcpLease>, ApiError> {
        let inner = self.lock();
        let n = Self::get(&inner, name)?;
        let Some(ip) = &n.def.ip else {
            return Ok(Vec::new());
        };
        Ok(dnsmasq::leases(&self.files(&n.def.name).leases, ip.prefix))
    }

    /// The bridge an interface attaches to; `need_active`: its network must be running.
    fn bridge_for(
        inner: &Inner,
        kind: InterfaceKind,
        source: &str,
        need_active: bool,
    ) -> Result<String, ApiError> {
        match kind {
            InterfaceKind::Network => {
                let n = inner.nets.get(source).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NoNetwork,
                        format!(
                            "network '{source}' not found: define it with `ferrovirt net-define FILE` (see `ferrovirt net-list --all`), or use --network bridge=BRIDGE"
                        ),
                    )
                })?;
                if need_active && !n.active {
                    return Err(ApiError::new(
                        ErrorCode::OperationInvalid,
                        format!(
                            "network '{source}' is not active: start it with `ferrovirt net-start {source}`"
                        ),
                    ));
                }
                Ok(n.def.bridge.clone().unwrap_or_default())
            }
            InterfaceKind::Bridge => {
                validate_dev(source)?;
                if !link::is_bridge(source) {
                    return Err(ApiError::invalid(format!(
                        "bridge '{source}' does not exist on this host"
                    )));
                }
                Ok(source.to_string())
            }
        }
    }

    /// Check a definition's interfaces (define: networks exist; start/install: they run).
    pub fn check_interfaces(&self, def: &DomainDef, need_active: bool) -> Result<(), ApiError> {
        let inner = self.lock();
        for nic in &def.interfaces {
            Self::bridge_for(&inner, nic.kind, &nic.source, need_active)?;
        }
        Ok(())
    }

    /// Create the domain's TAPs on their bridges (before its VM starts).
    pub fn plug(&self, def: &DomainDef) -> Result<(), ApiError> {
        let inner = self.lock();
        for (i, nic) in def.interfaces.iter().enumerate() {
            let made = Self::bridge_for(&inner, nic.kind, &nic.source, true).and_then(|br| {
                let owner = match nic.kind {
                    InterfaceKind::Network => {
                        inner.nets.get(&nic.source).map(|n| tap_owner(&n.def))
                    }
                    InterfaceKind::Bridge => None,
                };
                let alias = format!(
                    "{}{}{}",
                    netmark::TAP_ALIAS,
                    def.name,
                    owner.unwrap_or_default()
                );
                link::tap_up(&tap_name(def, i), &alias, &br)
            });
            if let Err(e) = made {
                drop(inner);
                self.unplug(def);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Remove the domain's TAPs (after its VM stopped).
    pub fn unplug(&self, def: &DomainDef) {
        for i in 0..def.interfaces.len() {
            let tap = tap_name(def, i);
            if link::alias(&tap).starts_with(netmark::TAP_ALIAS) {
                if let Err(e) = link::delete(&tap) {
                    eprintln!("ferrovirtd: {e}");
                }
            }
        }
    }

    /// domiflist rows.
    pub fn interfaces(&self, def: &DomainDef, running: bool) -> Vec<DomInterface> {
        def.interfaces
            .iter()
            .enumerate()
            .map(|(i, nic)| DomInterface {
                interface: if running {
                    tap_name(def, i)
                } else {
                    "-".into()
                },
                kind: match nic.kind {
                    InterfaceKind::Network => "network".into(),
                    InterfaceKind::Bridge => "bridge".into(),
                },
                source: nic.source.clone(),
                model: "virtio".into(),
                mac: nic.mac.clone().unwrap_or_default(),
            })
            .collect()
    }

    /// domifaddr rows: the leases of the domain's MACs on its networks.
    pub fn addresses(&self, def: &DomainDef) -> Vec<DomIfAddr> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (i, nic) in def.interfaces.iter().enumerate() {
            if nic.kind != InterfaceKind::Network {
                continue;
            }
            let (Some(n), Some(mac)) = (inner.nets.get(&nic.source), &nic.mac) else {
                continue;
            };
            let Some(ip) = &n.def.ip else { continue };
            for lease in dnsmasq::leases(&self.files(&n.def.name).leases, ip.prefix) {
                if lease.mac.eq_ignore_ascii_case(mac) {
                    out.push(DomIfAddr {
                        interface: tap_name(def, i),
                        mac: mac.to_ascii_lowercase(),
                        protocol: "ipv4".into(),
                        address: lease.address,
                    });
                }
            }
        }
        out
    }
}

fn validate_dev(name: &str) -> Result<(), ApiError> {
    ferrovirt_api::network::validate_ifname("bridge", name)
}

fn overlaps(a: &IpDef, b: &IpDef) -> bool {
    let p = a.prefix.min(b.prefix);
    let m = ferrovirt_api::network::prefix_mask(p);
    u32::from(a.address) & m == u32::from(b.address) & m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(a: [u8; 4], prefix: u8) -> IpDef {
        IpDef {
            address: Ipv4Addr::from(a),
            prefix,
            dhcp_start: None,
            dhcp_end: None,
        }
    }

    #[test]
    fn subnet_overlap() {
        assert!(overlaps(&net([10, 0, 0, 1], 8), &net([10, 9, 3, 1], 24)));
        assert!(overlaps(
            &net([192, 168, 123, 1], 24),
            &net([192, 168, 123, 0], 25)
        ));
        assert!(!overlaps(
            &net([192, 168, 122, 1], 24),
            &net([192, 168, 123, 1], 24)
        ));
    }

    #[test]
    fn tap_names_are_short_stable_and_valid() {
        let mut d = DomainDef::new("x");
        d.uuid = Some("1a2b3c4d-0000-4000-8000-000000000000".into());
        assert_eq!(tap_name(&d, 0), "fv1a2b3c4dn0");
        assert!(tap_name(&d, 99).len() <= 15);
        ferrovirt_api::network::validate_ifname("tap", &tap_name(&d, 99)).unwrap();
    }
}
