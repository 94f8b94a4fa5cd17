//! The domain manager: object model, lifecycle rules and persistence. Every change is written to
//! the store before the caller gets an answer; an error leaves store and memory unchanged.
//!
//! One lock guards the domain table, and it is never held across a driver call or a store write:
//! an operation takes the domain's job ([`jobs`]), copies out what the driver needs, releases
//! the lock, calls the driver under a deadline, then commits ([`commit`]: the store has a lock
//! of its own, taken before the table's).
//! Lifecycle operations are in [`lifecycle`], VM exits in [`exits`], daemon start in [`recover`],
//! save and restore in [`save`].

mod commit;
mod exits;
mod feature_jobs;
pub mod jobs;
mod lifecycle;
mod recover;
mod save;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ferrovirt_api::def::VirtType;
use ferrovirt_api::engine::{choose_engine, EngineChoice};
use ferrovirt_api::host::HostVirt;
use ferrovirt_api::msg::{DefineResponse, DisplayInfo, VolumeCreateRequest, VolumeInfo};
use ferrovirt_api::state::EventKind;
use ferrovirt_api::{ApiError, DomainDef, DomainInfo, DomainState, ErrorCode, StateReason};

use crate::console::ConsoleHub;
use crate::deadline::Deadline;
use crate::driver::registry::Drivers;
use crate::driver::{Driver, VmCtx};
use crate::events::EventBus;
use crate::files;
use crate::network::Networks;
use crate::runtime::{new_mac, new_uuid, ExitKind, Paths, Runtime};
use crate::store::{Store, StoredDomain};
use crate::volume;
use commit::Transient;
pub use feature_jobs::DomainCopy;
use jobs::Job;

/// How long driver calls and waits may take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// One call on a running VM (shutdown, suspend, resume, reset): a VM that does not answer
    /// within this fails the operation with a timeout error.
    pub op: Duration,
    /// Starting a VM until it runs.
    pub start: Duration,
    /// Destroy, including its SIGKILL fallback.
    pub destroy: Duration,
    /// How much longer than a deadline the client waits for the driver's own timeout error.
    pub grace: Duration,
    /// The most a client may ask to wait for a busy domain (`?wait=SECONDS`).
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            op: Duration::from_secs(10),
            start: Duration::from_secs(60),
            destroy: Duration::from_secs(30),
            grace: Duration::from_secs(2),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// What the manager is built from: the host, its drivers, the time limits, the policy.
pub struct Setup {
    pub host: HostVirt,
    pub drivers: Drivers,
    pub limits: Limits,
    /// --allow-remote-vnc: VNC may listen beyond loopback (then only with a password).
    pub allow_remote_vnc: bool,
}

impl Setup {
    /// This host's capabilities and the drivers that follow from them.
    pub fn probe() -> Setup {
        let host = HostVirt::probe();
        Setup {
            drivers: Drivers::for_host(&host),
            host,
            limits: Limits::default(),
            allow_remote_vnc: false,
        }
    }
}

struct Dom {
    stored: StoredDomain,
    /// Bumped on every start and stop, so a late exit report from an old VM is ignored.
    generation: u64,
    /// A reboot was asked for: the next power-off restarts the VM.
    pending_reboot: bool,
    console: Option<Arc<ConsoleHub>>,
    /// The job the domain is busy with.
    job: Option<Job>,
    /// The VM ended while a job ran: (generation, how); handled when the job ends.
    pending_exit: Option<(u64, ExitKind)>,
    /// Destroy killed the VM to get past a stuck job: its end is a destroy, not a crash.
    killed: bool,
}

impl Dom {
    /// A domain as loaded or just defined: not started by this daemon yet.
    fn new(stored: StoredDomain) -> Dom {
        Dom {
            stored,
            generation: 0,
            pending_reboot: false,
            console: None,
            job: None,
            pending_exit: None,
            killed: false,
        }
    }
}

struct Inner {
    doms: BTreeMap<String, Dom>,
    /// The id the next start uses; handed out under the lock, so parallel starts never share one.
    next_id: u32,
}

pub struct Manager {
    inner: Mutex<Inner>,
    /// The state database; its lock is the writer lock (see [`commit`]).
    store: Mutex<Store>,
    /// Signalled whenever a job ends (for operations waiting for a busy domain).
    job_ended: Condvar,
    pub events: EventBus,
    pub paths: Paths,
    pub host: HostVirt,
    pub default_type: VirtType,
    pub default_reason: String,
    drivers: Drivers,
    limits: Limits,
    /// --allow-remote-vnc (see Setup).
    allow_remote_vnc: bool,
    /// Virtual networks and the domains' TAP devices.
    pub networks: Arc<Networks>,
    /// Serializes volume creation and deletion (not the domains: creating an image can be slow).
    volumes: Mutex<()>,
    /// Domain snapshots' metadata (crate::snapshot).
    pub(crate) snapshots: crate::snapshot::Snapshots,
    me: Weak<Manager>,
}

impl Manager {
    /// Open the state, reattach to running VMs, mark vanished ones, then autostart.
    pub fn open(paths: Paths, setup: Setup) -> Result<Arc<Manager>, String> {
        // Private folders (tightened if an older version made them 0755); the run folder lets
        // the socket's group reach the socket, nothing more.
        for dir in [
            &paths.state_dir,
            &paths.images(),
            &paths.logs(),
            &paths.run_dir.join("vms"),
        ] {
            files::private_dir(dir)?;
        }
        // What older versions left inside them 0644/0755 (logs, volumes, seeds, VM folders).
        for dir in [&paths.state_dir, &paths.run_dir.join("vms")] {
            // Not fatal: a file that cannot be changed (read-only mount) must not keep the
            // daemon from starting.
            if let Err(e) = files::tighten_tree(dir) {
                eprintln!(
                    "ferrovirtd: cannot make everything under {} private: {e}",
                    dir.display()
                );
            }
        }
        files::dir_with_mode(&paths.run_dir, files::SOCKET_DIR_MODE)
            .map_err(|e| format!("cannot create {}: {e}", paths.run_dir.display()))?;
        let store = Store::open(&paths.db())?;
        let loaded = store.load_all()?;
        let next_id = store.peek_next_id().map_err(|e| e.message)?;
        let networks = Networks::open(&paths)?;
        let snapshots = crate::snapshot::Snapshots::open(&paths)?;
        // Networks first: reattached and autostarted domains need their bridges.
        let taps = |d: &StoredDomain| {
            (0..d.def.interfaces.len())
                .map(|i| crate::network::tap_name(&d.def, i))
                .collect::<Vec<_>>()
        };
        let our_taps: Vec<String> = loaded.iter().flat_map(taps).collect();
        let keep_taps: Vec<String> = loaded
            .iter()
            .filter(|d| d.state.is_active())
            .flat_map(taps)
            .collect();
        networks.startup(&our_taps, &keep_taps);
        let Setup {
            host,
            drivers,
            limits,
            allow_remote_vnc,
        } = setup;
        let (default_type, default_reason) = host.default_driver();
        let doms = loaded
            .into_iter()
            .map(|s| (s.def.name.clone(), Dom::new(s)))
            .collect();
        let mgr = Arc::new_cyclic(|me| Manager {
            inner: Mutex::new(Inner { doms, next_id }),
            store: Mutex::new(store),
            job_ended: Condvar::new(),
            events: EventBus::default(),
            paths,
            host,
            default_type,
            default_reason,
            drivers,
            limits,
            allow_remote_vnc,
            networks,
            volumes: Mutex::new(()),
            snapshots,
            me: me.clone(),
        });
        mgr.recover();
        Ok(mgr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another request must not take the whole daemon down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The driver names this daemon has (`GET /v1/version`).
    pub fn driver_names(&self) -> Vec<String> {
        self.drivers.names()
    }

    /// The driver that starts `def`: the one of its engine.
    fn driver(&self, def: &DomainDef) -> Result<Arc<dyn Driver>, ApiError> {
        self.drivers.get(self.engine(def).engine.driver())
    }

    /// The driver of a running VM: the one that started it (rows stored before the engine was
    /// recorded: the one a start would use).
    fn running_driver(
        &self,
        def: &DomainDef,
        runtime: &Runtime,
    ) -> Result<Arc<dyn Driver>, ApiError> {
        match runtime.engine {
            Some(engine) => self.drivers.get(engine.driver()),
            None => self.driver(def),
        }
    }

    fn vtype(&self, def: &DomainDef) -> VirtType {
        def.virt_type.unwrap_or(self.default_type)
    }

    /// The engine that would run `def` on this host, and why (see ferrovirt_api::engine).
    fn engine(&self, def: &DomainDef) -> EngineChoice {
        if def.virt_type.is_some() {
            return choose_engine(&self.host, def);
        }
        let mut typed = def.clone();
        typed.virt_type = Some(self.default_type);
        choose_engine(&self.host, &typed)
    }

    /// The engine for dominfo: the one running the VM, else the one a start would use.
    fn engine_info(&self, s: &StoredDomain) -> EngineChoice {
        let choice = self.engine(&s.def);
        let running = s.runtime.as_ref().and_then(|r| r.engine);
        match running {
            Some(engine) if s.state.is_active() && engine != choice.engine => EngineChoice {
                engine,
                accel: None,
                reason: "started before the definition was changed".into(),
                cannot_start: None,
            },
            _ => choice,
        }
    }

    fn ctx<'a>(
        &self,
        def: &'a DomainDef,
        id: u32,
        generation: u64,
        deadline: Deadline,
    ) -> Result<VmCtx<'a>, ApiError> {
        let vm_dir = self.paths.vm_dir(&def.name);
        files::private_dir(&vm_dir).map_err(ApiError::internal)?;
        let me = self.me.clone();
        let name = def.name.clone();
        Ok(VmCtx {
            def,
            id,
            vm_dir,
            console_log: self.paths.console_log(&def.name),
            on_exit: Box::new(move |kind| {
                if let Some(mgr) = me.upgrade() {
                    mgr.vm_exited(&name, generation, kind);
                }
            }),
            deadline,
        })
    }

    fn info(&self, dom: &Dom) -> DomainInfo {
        let s = &dom.stored;
        let active = s.state.is_active();
        let log = self.paths.console_log(&s.def.name);
        DomainInfo {
            id: if active {
                s.runtime.as_ref().map(|r| r.id)
            } else {
                None
            },
            name: s.def.name.clone(),
            uuid: s.def.uuid.clone().unwrap_or_default(),
            virt_type: self.vtype(&s.def),
            engine: self.engine_info(s),
            state: s.state,
            reason: s.reason,
            persistent: s.persistent,
            autostart: s.autostart,
            memory_kib: s.def.memory_kib,
            vcpus: s.def.vcpus,
            pid: if active {
                s.runtime.as_ref().and_then(|r| r.pid)
            } else {
                None
            },
            console_log: log.exists().then(|| log.to_string_lossy().into_owned()),
            managed_save: self.paths.managed_save(&s.def.name).exists(),
        }
    }

    fn get<'a>(inner: &'a Inner, name: &str) -> Result<&'a Dom, ApiError> {
        inner
            .doms
            .get(name)
            .or_else(|| {
                inner
                    .doms
                    .values()
                    .find(|d| d.stored.def.uuid.as_deref() == Some(name))
            })
            .ok_or_else(|| ApiError::no_domain(name))
    }

    /// Resolve a name or UUID to the domain's name.
    fn resolve(inner: &Inner, name: &str) -> Result<String, ApiError> {
        Self::get(inner, name).map(|d| d.stored.def.name.clone())
    }

    /// Refuse to change a domain's definition or existence while a job runs on it.
    fn refuse_if_busy(dom: &Dom) -> Result<(), ApiError> {
        match &dom.job {
            Some(job) => Err(job.busy(&dom.stored.def.name)),
            None => Ok(()),
        }
    }

    pub fn list(&self, all: bool) -> Vec<DomainInfo> {
        let inner = self.lock();
        inner
            .doms
            .values()
            .filter(|d| all || d.stored.state.is_active())
            .map(|d| self.info(d))
            .collect()
    }

    pub fn domain(&self, name: &str) -> Result<DomainInfo, ApiError> {
        let inner = self.lock();
        Self::get(&inner, name).map(|d| self.info(d))
    }

    pub fn definition(&self, name: &str) -> Result<DomainDef, ApiError> {
        let inner = self.lock();
        Self::get(&inner, name).map(|d| d.stored.def.clone())
    }

    /// The daemon's own rules, checked at define and again at start (its options may have
    /// changed since): VNC on loopback unless --allow-remote-vnc, and then with a password.
    fn check_policy(&self, def: &DomainDef) -> Result<(), ApiError> {
        match &def.graphics {
            Some(g) => g.check_listen(self.allow_remote_vnc),
            None => Ok(()),
        }
    }

    /// Checks every definition must pass before it is stored.
    /// Order matters for the user: what the driver cannot do at all comes before missing files.
    /// `dry_run` skips files that would be created in the default pool (install checks first).
    fn check_definition(&self, def: &DomainDef, dry_run: bool) -> Result<(), ApiError> {
        def.validate()?;
        self.check_policy(def)?;
        self.driver(def)?.check(def)?;
        // A dry run is install's pre-check: the VM is about to start, so this host must be able
        // to run it and its networks must run.
        if dry_run {
            self.engine(def).check_startable()?;
        }
        self.networks.check_interfaces(def, dry_run)?;
        if dry_run {
            let pool = self.paths.images();
            let mut planned = def.clone();
            planned
                .disks
                .retain(|d| !d.path.starts_with(&pool) || d.path.exists());
            planned.check_paths()
        } else {
            def.check_paths()
        }
    }

    /// Define a persistent domain, or (transient) create and start one.
    /// `dry_run`: run every check (including the name and uuid checks) and store nothing.
    pub fn define(
        &self,
        mut def: DomainDef,
        warnings: Vec<String>,
        transient: bool,
        dry_run: bool,
    ) -> Result<DefineResponse, ApiError> {
        if def.virt_type.is_none() {
            def.virt_type = Some(self.default_type);
        }
        self.check_definition(&def, dry_run)?;
        for nic in &mut def.interfaces {
            if nic.mac.is_none() {
                nic.mac = Some(new_mac());
            }
        }
        let mut writer = self.writer();
        let mut inner = self.lock();
        if let Some(uuid) = &def.uuid {
            if let Some(other) = inner
                .doms
                .values()
                .find(|d| d.stored.def.uuid.as_ref() == Some(uuid) && d.stored.def.name != def.name)
            {
                return Err(ApiError::new(
                    ErrorCode::DomainExists,
                    format!("domain '{}' already has uuid {uuid}", other.stored.def.name),
                ));
            }
        }
        if let Some(existing) = inner.doms.get(&def.name) {
            let same_uuid = def.uuid.is_some() && def.uuid == existing.stored.def.uuid;
            if transient || !same_uuid || !existing.stored.persistent {
                return Err(ApiError::new(
                    ErrorCode::DomainExists,
                    format!(
                        "domain '{}' already exists (uuid {}); to change its definition define it with that uuid (see `ferrovirt dumpxml {}`), or undefine it first",
                        def.name,
                        existing.stored.def.uuid.as_deref().unwrap_or(""),
                        def.name
                    ),
                ));
            }
            Self::refuse_if_busy(existing)?;
            // Redefinition with the same uuid: the new definition applies at the next start.
            let name = def.name.clone();
            if dry_run {
                let mut stored = existing.stored.clone();
                stored.def = def;
                let domain = self.info(&Dom::new(stored));
                return Ok(DefineResponse { domain, warnings });
            }
            drop(inner);
            writer.commit(&name, Transient::Keep, |s| s.def = def)?;
            drop(writer);
            self.events.emit(&name, EventKind::Defined, "updated");
            let domain = self.domain(&name)?;
            return Ok(DefineResponse { domain, warnings });
        }
        if def.uuid.is_none() {
            def.uuid = Some(new_uuid());
        }
        let name = def.name.clone();
        let stored = StoredDomain {
            def,
            persistent: !transient,
            autostart: false,
            state: DomainState::Shutoff,
            reason: StateReason::Unknown,
            runtime: None,
        };
        if dry_run {
            return Ok(DefineResponse {
                domain: self.info(&Dom::new(stored)),
                warnings,
            });
        }
        // A new domain has no snapshots: metadata an ended transient domain of this name left
        // is not its. (Forgotten without the table's lock; the writer lock keeps others out.)
        if self.snapshots.has_metadata(&name)? {
            drop(inner);
            self.snapshots.forget_domain(&name)?;
            inner = self.lock();
        }
        if transient {
            // Nothing is stored unless the VM actually starts; a failed start forgets it. The
            // start commits from its job's thread: it needs the writer lock.
            drop(writer);
            inner.doms.insert(name.clone(), Dom::new(stored));
            let domain = self.create(inner, &name)?;
            return Ok(DefineResponse { domain, warnings });
        }
        drop(inner);
        writer.add(stored)?;
        drop(writer);
        self.events.emit(&name, EventKind::Defined, "added");
        let domain = self.domain(&name)?;
        Ok(DefineResponse { domain, warnings })
    }

    pub fn undefine(&self, name: &str) -> Result<(), ApiError> {
        self.undefine_opts(name, false)
    }

    /// undefine; a domain with snapshots needs `snapshots_metadata` (virsh --snapshots-metadata),
    /// which deletes their metadata (their images and files stay).
    pub fn undefine_opts(&self, name: &str, snapshots_metadata: bool) -> Result<(), ApiError> {
        let mut writer = self.writer();
        let inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        self.snapshots.check_undefine(&name, snapshots_metadata)?;
        let dom = Self::get(&inner, &name)?;
        if !dom.stored.persistent {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is transient (created, not defined); use destroy to remove it"
            )));
        }
        Self::refuse_if_busy(dom)?;
        self.refuse_if_managed_save(&name)?;
        let active = dom.stored.state.is_active();
        drop(inner);
        if active {
            // Like libvirt: a running domain becomes transient and disappears when it stops.
            writer.commit(&name, Transient::Keep, |s| {
                s.persistent = false;
                s.autostart = false;
            })?;
        } else {
            writer.remove(&name)?;
        }
        drop(writer);
        if snapshots_metadata {
            self.snapshots.forget_domain(&name)?;
        }
        self.events.emit(&name, EventKind::Undefined, "removed");
        Ok(())
    }

    pub fn set_autostart(&self, name: &str, autostart: bool) -> Result<DomainInfo, ApiError> {
        let mut writer = self.writer();
        let inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        let dom = Self::get(&inner, &name)?;
        if !dom.stored.persistent {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is transient: autostart needs a defined domain"
            )));
        }
        drop(inner);
        // Allowed during a job: a job's commit changes only what it owns, on the current record.
        writer.commit(&name, Transient::Keep, |s| s.autostart = autostart)?;
        drop(writer);
        self.domain(&name)
    }

    /// setmem / setvcpus: change the persistent definition (applies at the next start).
    pub fn update_config(
        &self,
        name: &str,
        config: bool,
        change: impl FnOnce(&mut DomainDef),
    ) -> Result<DomainInfo, ApiError> {
        let mut writer = self.writer();
        let inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        let dom = Self::get(&inner, &name)?;
        if dom.stored.state.is_active() && !config {
            return Err(ApiError::not_supported(format!(
                "domain '{name}' is running and live changes are not supported yet; use --config to change the definition for the next start"
            )));
        }
        if !dom.stored.persistent {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is transient: it has no persistent configuration"
            )));
        }
        Self::refuse_if_busy(dom)?;
        let mut def = dom.stored.def.clone();
        change(&mut def);
        def.validate()?;
        drop(inner);
        writer.commit(&name, Transient::Keep, |s| s.def = def)?;
        drop(writer);
        self.domain(&name)
    }

    pub fn display(&self, name: &str) -> Result<DisplayInfo, ApiError> {
        let inner = self.lock();
        let dom = Self::get(&inner, name)?;
        if !dom.stored.state.is_active() {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is not running"
            )));
        }
        // The address VNC really listens on (recorded from QEMU at start).
        let runtime = dom.stored.runtime.as_ref();
        let port = runtime.and_then(|r| r.vnc_port);
        let host = runtime
            .and_then(|r| r.vnc_listen.clone())
            .unwrap_or_else(|| "127.0.0.1".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(DisplayInfo {
            uri: port.map(|p| format!("vnc://{host}:{}", p.saturating_sub(5900))),
        })
    }

    pub fn console(&self, name: &str) -> Result<Arc<ConsoleHub>, ApiError> {
        let inner = self.lock();
        let dom = Self::get(&inner, name)?;
        if !dom.stored.state.is_active() {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is not running (start it with `ferrovirt start --console {name}`)"
            )));
        }
        dom.console
            .clone()
            .filter(|c| c.is_connected())
            .ok_or_else(|| {
                ApiError::not_supported(format!(
                    "domain '{name}' has no serial console (the test driver simulates none)"
                ))
            })
    }

    fn volume_lock(&self) -> MutexGuard<'_, ()> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_volume(&self, req: &VolumeCreateRequest) -> Result<VolumeInfo, ApiError> {
        let _guard = self.volume_lock();
        volume::create(&self.paths.images(), req)
    }

    pub fn create_cloud_init(
        &self,
        req: &ferrovirt_api::msg::CloudInitRequest,
    ) -> Result<VolumeInfo, ApiError> {
        let _guard = self.volume_lock();
        volume::create_cloud_init(&self.paths.images(), req)
    }

    /// Delete a volume of the default pool, unless a domain uses it.
    pub fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        let _guard = self.volume_lock();
        let path = self.paths.images().join(name);
        // Under the domains' lock, so no define can start using it between check and delete.
        let inner = self.lock();
        if let Some(user) = inner.doms.values().find(|d| {
            d.stored
                .def
                .disks
                .iter()
                .any(|disk| files::same_file(&disk.path, &path))
        }) {
            return Err(ApiError::new(
                ErrorCode::StorageError,
                format!(
                    "volume '{name}' is used by domain '{}'",
                    user.stored.def.name
                ),
            ));
        }
        volume::delete(&self.paths.images(), name)
    }
}
