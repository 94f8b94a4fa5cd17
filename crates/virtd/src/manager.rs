//! The domain manager: object model, lifecycle rules and persistence. Every change is written to
//! the store before the caller gets an answer; an error leaves store and memory unchanged.

use std::collections::BTreeMap;
use std::fs;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use ferrovirt_api::def::VirtType;
use ferrovirt_api::host::HostVirt;
use ferrovirt_api::msg::{DefineResponse, DisplayInfo, VolumeCreateRequest, VolumeInfo};
use ferrovirt_api::state::EventKind;
use ferrovirt_api::{Action, ApiError, DomainDef, DomainInfo, DomainState, ErrorCode, StateReason};

use crate::console::{rotate_for_boot, ConsoleHub};
use crate::driver::{kvm::KvmDriver, qemu::QemuDriver, test::TestDriver, Driver, VmCtx};
use crate::events::EventBus;
use crate::network::Networks;
use crate::runtime::{new_mac, new_uuid, ExitKind, Paths};
use crate::store::{Store, StoredDomain};
use crate::volume;

struct Dom {
    stored: StoredDomain,
    /// Bumped on every start and stop, so a late exit report from an old VM is ignored.
    generation: u64,
    /// A reboot was asked for: the next power-off restarts the VM.
    pending_reboot: bool,
    console: Option<Arc<ConsoleHub>>,
}

impl Dom {
    /// A domain as loaded or just defined: not started by this daemon yet.
    fn new(stored: StoredDomain) -> Dom {
        Dom {
            stored,
            generation: 0,
            pending_reboot: false,
            console: None,
        }
    }
}

struct Inner {
    store: Store,
    doms: BTreeMap<String, Dom>,
}

pub struct Manager {
    inner: Mutex<Inner>,
    pub events: EventBus,
    pub paths: Paths,
    pub host: HostVirt,
    pub default_type: VirtType,
    pub default_reason: String,
    test: TestDriver,
    qemu: QemuDriver,
    kvm: KvmDriver,
    /// Virtual networks and the domains' TAP devices.
    pub networks: Arc<Networks>,
    me: Weak<Manager>,
}

fn mkdir(path: &std::path::Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

impl Manager {
    /// Open the state, reattach to running VMs, mark vanished ones, then autostart.
    pub fn open(paths: Paths) -> Result<Arc<Manager>, String> {
        for dir in [
            &paths.state_dir,
            &paths.run_dir,
            &paths.images(),
            &paths.logs(),
            &paths.run_dir.join("vms"),
        ] {
            mkdir(dir)?;
        }
        let store = Store::open(&paths.db())?;
        let loaded = store.load_all()?;
        let networks = Networks::open(&paths)?;
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
        let host = HostVirt::probe();
        let (default_type, default_reason) = host.default_driver();
        let doms = loaded
            .into_iter()
            .map(|s| (s.def.name.clone(), Dom::new(s)))
            .collect();
        let mgr = Arc::new_cyclic(|me| Manager {
            inner: Mutex::new(Inner { store, doms }),
            events: EventBus::default(),
            paths,
            host,
            default_type,
            default_reason,
            test: TestDriver,
            qemu: QemuDriver::from_env(),
            kvm: KvmDriver::from_env(),
            networks,
            me: me.clone(),
        });
        mgr.recover();
        Ok(mgr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another request must not take the whole daemon down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn driver(&self, t: VirtType) -> &dyn Driver {
        match t {
            VirtType::Test => &self.test,
            VirtType::Qemu => &self.qemu,
            VirtType::Kvm => &self.kvm,
        }
    }

    fn vtype(&self, def: &DomainDef) -> VirtType {
        def.virt_type.unwrap_or(self.default_type)
    }

    fn ctx<'a>(&self, def: &'a DomainDef, id: u32, generation: u64) -> Result<VmCtx<'a>, ApiError> {
        let vm_dir = self.paths.vm_dir(&def.name);
        fs::create_dir_all(&vm_dir)
            .map_err(|e| ApiError::internal(format!("{}: {e}", vm_dir.display())))?;
        let me = self.me.clone();
        let name = def.name.clone();
        Ok(VmCtx {
            def,
            id,
            vm_dir,
            console_log: self.paths.console_log(&def.name),
            accel: def.accel.unwrap_or(self.host.default_accel()),
            on_exit: Box::new(move |kind| {
                if let Some(mgr) = me.upgrade() {
                    mgr.vm_exited(&name, generation, kind);
                }
            }),
        })
    }

    fn recover(&self) {
        let mut inner = self.lock();
        let names: Vec<String> = inner.doms.keys().cloned().collect();
        for name in &names {
            let Some(dom) = inner.doms.get(name) else {
                continue;
            };
            if !dom.stored.state.is_active() {
                continue;
            }
            let def = dom.stored.def.clone();
            let runtime = dom.stored.runtime.clone().unwrap_or_default();
            let generation = dom.generation + 1;
            let started = self
                .ctx(&def, runtime.id, generation)
                .ok()
                .and_then(|ctx| self.driver(self.vtype(&def)).reattach(ctx, &runtime));
            let Some(dom) = inner.doms.get_mut(name) else {
                continue;
            };
            dom.generation = generation;
            match started {
                Some(s) => {
                    dom.console = s.console;
                    eprintln!(
                        "ferrovirtd: reattached to domain '{name}' (pid {:?})",
                        s.runtime.pid
                    );
                }
                None => {
                    eprintln!("ferrovirtd: domain '{name}' was running but its VM is gone; marking it shut off");
                    dom.stored.state = DomainState::Shutoff;
                    dom.stored.reason = StateReason::Vanished;
                    dom.stored.runtime = None;
                    self.networks.unplug(&def);
                    self.events.emit(name, EventKind::Stopped, "vanished");
                    self.persist_or_forget(&mut inner, name);
                }
            }
        }
        for name in &names {
            let autostart = inner.doms.get(name).is_some_and(|d| {
                d.stored.persistent && d.stored.autostart && !d.stored.state.is_active()
            });
            if autostart {
                if let Err(e) = self.start_locked(&mut inner, name, StateReason::Booted) {
                    eprintln!("ferrovirtd: autostart of '{name}' failed: {e}");
                }
            }
        }
    }

    /// Write the domain's row, or delete it when it is an inactive transient domain.
    fn persist_or_forget(&self, inner: &mut Inner, name: &str) {
        let Some(dom) = inner.doms.get(name) else {
            return;
        };
        let result = if !dom.stored.persistent && !dom.stored.state.is_active() {
            let r = inner.store.delete(name);
            inner.doms.remove(name);
            r
        } else {
            inner.store.put(&dom.stored)
        };
        if let Err(e) = result {
            eprintln!("ferrovirtd: cannot save domain '{name}': {e}");
        }
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

    /// Checks every definition must pass before it is stored.
    /// Order matters for the user: what the driver cannot do at all comes before missing files.
    /// `dry_run` skips files that would be created in the default pool (install checks first).
    fn check_definition(&self, def: &DomainDef, dry_run: bool) -> Result<(), ApiError> {
        def.validate()?;
        self.driver(self.vtype(def)).check(def)?;
        // A dry run is install's pre-check: the VM is about to start, so its networks must run.
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
            // Redefinition with the same uuid: the new definition applies at the next start.
            let mut stored = existing.stored.clone();
            stored.def = def;
            if dry_run {
                let domain = self.info(&Dom::new(stored));
                return Ok(DefineResponse { domain, warnings });
            }
            inner.store.put(&stored)?;
            let name = stored.def.name.clone();
            if let Some(dom) = inner.doms.get_mut(&name) {
                dom.stored = stored;
            }
            self.events.emit(&name, EventKind::Defined, "updated");
            let domain = self.info(Self::get(&inner, &name)?);
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
        if transient {
            // Nothing is stored unless the VM actually starts.
            inner.doms.insert(name.clone(), Dom::new(stored));
            if let Err(e) = self.start_locked(&mut inner, &name, StateReason::Booted) {
                inner.doms.remove(&name);
                return Err(e);
            }
        } else {
            inner.store.put(&stored)?;
            inner.doms.insert(name.clone(), Dom::new(stored));
            self.events.emit(&name, EventKind::Defined, "added");
        }
        let domain = self.info(Self::get(&inner, &name)?);
        Ok(DefineResponse { domain, warnings })
    }

    pub fn undefine(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        let dom = Self::get(&inner, &name)?;
        if !dom.stored.persistent {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is transient (created, not defined); use destroy to remove it"
            )));
        }
        if dom.stored.state.is_active() {
            // Like libvirt: a running domain becomes transient and disappears when it stops.
            let mut stored = dom.stored.clone();
            stored.persistent = false;
            stored.autostart = false;
            inner.store.put(&stored)?;
            if let Some(d) = inner.doms.get_mut(&name) {
                d.stored = stored;
            }
        } else {
            inner.store.delete(&name)?;
            inner.doms.remove(&name);
        }
        self.events.emit(&name, EventKind::Undefined, "removed");
        Ok(())
    }

    fn start_locked(
        &self,
        inner: &mut Inner,
        name: &str,
        reason: StateReason,
    ) -> Result<(), ApiError> {
        let dom = inner
            .doms
            .get(name)
            .ok_or_else(|| ApiError::no_domain(name))?;
        let def = dom.stored.def.clone();
        let generation = dom.generation + 1;
        def.check_paths()?;
        let id = inner.store.peek_next_id()?;
        rotate_for_boot(&self.paths.console_log(name));
        let ctx = self.ctx(&def, id, generation)?;
        self.networks.plug(&def)?;
        let started = match self.driver(self.vtype(&def)).start(ctx) {
            Ok(s) => s,
            Err(e) => {
                self.networks.unplug(&def);
                return Err(e);
            }
        };
        let dom = inner
            .doms
            .get_mut(name)
            .ok_or_else(|| ApiError::no_domain(name))?;
        dom.generation = generation;
        dom.pending_reboot = false;
        dom.console = started.console;
        dom.stored.state = DomainState::Running;
        dom.stored.reason = reason;
        dom.stored.runtime = Some(started.runtime);
        let stored = dom.stored.clone();
        if let Err(e) = inner.store.put_started(&stored, id) {
            // Not recorded means not started: take the VM down again rather than lose track of it.
            let _ = self.driver(self.vtype(&def)).destroy(
                &def,
                &self.paths.vm_dir(name),
                stored.runtime.as_ref().unwrap_or(&Default::default()),
            );
            self.networks.unplug(&def);
            if let Some(d) = inner.doms.get_mut(name) {
                d.generation += 1;
                d.stored.state = DomainState::Shutoff;
                d.stored.reason = StateReason::Failed;
                d.stored.runtime = None;
                d.console = None;
            }
            return Err(e);
        }
        self.events.emit(name, EventKind::Started, reason.as_str());
        Ok(())
    }

    /// Run an operation on a domain by verb (start, shutdown, destroy, reboot, reset, suspend, resume).
    pub fn action(&self, name: &str, verb: &str) -> Result<DomainInfo, ApiError> {
        let mut inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        let dom = Self::get(&inner, &name)?;
        let state = dom.stored.state;
        let def = dom.stored.def.clone();
        let runtime = dom.stored.runtime.clone().unwrap_or_default();
        let vm_dir = self.paths.vm_dir(&name);
        let driver = self.driver(self.vtype(&def));
        let need = |ok: bool, what: &str| -> Result<(), ApiError> {
            if ok {
                Ok(())
            } else {
                Err(ApiError::wrong_state(format!(
                    "domain '{name}' is {}: {what}",
                    state.display()
                )))
            }
        };
        match verb {
            "start" => {
                need(
                    !state.is_active(),
                    "it is already active (destroy or shutdown it first)",
                )?;
                self.start_locked(&mut inner, &name, StateReason::Booted)?;
            }
            "shutdown" | "reboot" => {
                need(state == DomainState::Running, "it must be running")?;
                let ended = driver.shutdown(&def, &vm_dir, &runtime)?;
                if let Some(d) = inner.doms.get_mut(&name) {
                    d.pending_reboot = verb == "reboot";
                }
                if let Some(kind) = ended {
                    self.apply_exit(&mut inner, &name, kind);
                }
            }
            "destroy" => {
                need(state.is_active(), "it is not running")?;
                driver.destroy(&def, &vm_dir, &runtime)?;
                self.stopped(
                    &mut inner,
                    &name,
                    DomainState::Shutoff,
                    StateReason::Destroyed,
                );
                self.events.emit(&name, EventKind::Stopped, "destroyed");
                self.persist_or_forget(&mut inner, &name);
            }
            "reset" => {
                need(state.is_active(), "it is not running")?;
                driver.reset(&def, &vm_dir, &runtime)?;
            }
            "suspend" => {
                need(
                    state == DomainState::Running,
                    "only a running domain can be suspended",
                )?;
                driver.suspend(&def, &vm_dir, &runtime)?;
                self.set_state(&mut inner, &name, DomainState::Paused, StateReason::User)?;
                self.events.emit(&name, EventKind::Suspended, "paused");
            }
            "resume" => {
                need(
                    state == DomainState::Paused,
                    "only a paused domain can be resumed",
                )?;
                driver.resume(&def, &vm_dir, &runtime)?;
                self.set_state(
                    &mut inner,
                    &name,
                    DomainState::Running,
                    StateReason::Unpaused,
                )?;
                self.events.emit(&name, EventKind::Resumed, "unpaused");
            }
            other => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("unknown domain operation '{other}'"),
                ))
            }
        }
        // A transient domain that stopped is gone.
        match inner.doms.get(&name) {
            Some(d) => Ok(self.info(d)),
            None => {
                let mut info = DomainInfo {
                    id: None,
                    name: name.clone(),
                    uuid: def.uuid.clone().unwrap_or_default(),
                    virt_type: self.vtype(&def),
                    state: DomainState::Shutoff,
                    reason: StateReason::Destroyed,
                    persistent: false,
                    autostart: false,
                    memory_kib: def.memory_kib,
                    vcpus: def.vcpus,
                    pid: None,
                    console_log: None,
                };
                if verb != "destroy" {
                    info.reason = StateReason::Shutdown;
                }
                Ok(info)
            }
        }
    }

    fn set_state(
        &self,
        inner: &mut Inner,
        name: &str,
        state: DomainState,
        reason: StateReason,
    ) -> Result<(), ApiError> {
        let dom = inner
            .doms
            .get_mut(name)
            .ok_or_else(|| ApiError::no_domain(name))?;
        let mut stored = dom.stored.clone();
        stored.state = state;
        stored.reason = reason;
        inner.store.put(&stored)?;
        if let Some(d) = inner.doms.get_mut(name) {
            d.stored = stored;
        }
        Ok(())
    }

    /// Mark a domain inactive in memory (the caller persists).
    fn stopped(&self, inner: &mut Inner, name: &str, state: DomainState, reason: StateReason) {
        if let Some(d) = inner.doms.get_mut(name) {
            // The VM is gone: its TAPs go with it.
            self.networks.unplug(&d.stored.def);
            d.generation += 1;
            d.pending_reboot = false;
            d.console = None;
            d.stored.state = state;
            d.stored.reason = reason;
            d.stored.runtime = None;
        }
    }

    /// A driver's monitor saw the VM end by itself.
    fn vm_exited(&self, name: &str, generation: u64, kind: ExitKind) {
        let mut inner = self.lock();
        if inner
            .doms
            .get(name)
            .is_none_or(|d| d.generation != generation)
        {
            return;
        }
        self.apply_exit(&mut inner, name, kind);
    }

    /// Apply on_poweroff / on_reboot / on_crash after the VM ended.
    fn apply_exit(&self, inner: &mut Inner, name: &str, kind: ExitKind) {
        let Some(dom) = inner.doms.get(name) else {
            return;
        };
        let kind = if dom.pending_reboot && kind == ExitKind::Poweroff {
            ExitKind::Reboot
        } else {
            kind
        };
        let def = &dom.stored.def;
        let (action, state, reason, event, detail) = match kind {
            ExitKind::Poweroff => (
                def.on_poweroff,
                DomainState::Shutoff,
                StateReason::Shutdown,
                EventKind::Shutdown,
                "guest powered off",
            ),
            ExitKind::Reboot => (
                def.on_reboot,
                DomainState::Shutoff,
                StateReason::Shutdown,
                EventKind::Shutdown,
                "guest rebooted",
            ),
            ExitKind::Crash => (
                def.on_crash,
                DomainState::Crashed,
                StateReason::Crashed,
                EventKind::Crashed,
                "guest crashed",
            ),
            ExitKind::Destroyed => (
                Action::Destroy,
                DomainState::Shutoff,
                StateReason::Destroyed,
                EventKind::Stopped,
                "destroyed",
            ),
        };
        self.stopped(inner, name, state, reason);
        self.events.emit(name, event, detail);
        if action == Action::Restart {
            if let Err(e) = self.start_locked(inner, name, StateReason::Restarted) {
                eprintln!("ferrovirtd: restart of '{name}' failed: {e}");
                self.stopped(inner, name, DomainState::Shutoff, StateReason::Failed);
                self.events.emit(name, EventKind::Stopped, "failed");
            } else {
                return;
            }
        } else if event != EventKind::Stopped {
            self.events.emit(name, EventKind::Stopped, reason.as_str());
        }
        self.persist_or_forget(inner, name);
    }

    pub fn set_autostart(&self, name: &str, autostart: bool) -> Result<DomainInfo, ApiError> {
        let mut inner = self.lock();
        let name = Self::resolve(&inner, name)?;
        let dom = Self::get(&inner, &name)?;
        if !dom.stored.persistent {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is transient: autostart needs a defined domain"
            )));
        }
        let mut stored = dom.stored.clone();
        stored.autostart = autostart;
        inner.store.put(&stored)?;
        let dom = inner
            .doms
            .get_mut(&name)
            .ok_or_else(|| ApiError::no_domain(&name))?;
        dom.stored = stored;
        Ok(self.info(dom))
    }

    /// setmem / setvcpus: change the persistent definition (applies at the next start).
    pub fn update_config(
        &self,
        name: &str,
        config: bool,
        change: impl FnOnce(&mut DomainDef),
    ) -> Result<DomainInfo, ApiError> {
        let mut inner = self.lock();
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
        let mut stored = dom.stored.clone();
        change(&mut stored.def);
        stored.def.validate()?;
        inner.store.put(&stored)?;
        let dom = inner
            .doms
            .get_mut(&name)
            .ok_or_else(|| ApiError::no_domain(&name))?;
        dom.stored = stored;
        Ok(self.info(dom))
    }

    pub fn display(&self, name: &str) -> Result<DisplayInfo, ApiError> {
        let inner = self.lock();
        let dom = Self::get(&inner, name)?;
        if !dom.stored.state.is_active() {
            return Err(ApiError::wrong_state(format!(
                "domain '{name}' is not running"
            )));
        }
        let port = dom.stored.runtime.as_ref().and_then(|r| r.vnc_port);
        Ok(DisplayInfo {
            uri: port.map(|p| format!("vnc://127.0.0.1:{}", p.saturating_sub(5900))),
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

    pub fn create_volume(&self, req: &VolumeCreateRequest) -> Result<VolumeInfo, ApiError> {
        let _guard = self.lock();
        volume::create(&self.paths.images(), req)
    }

    pub fn create_cloud_init(
        &self,
        req: &ferrovirt_api::msg::CloudInitRequest,
    ) -> Result<VolumeInfo, ApiError> {
        let _guard = self.lock();
        volume::create_cloud_init(&self.paths.images(), req)
    }

    /// Delete a volume of the default pool, unless a domain uses it.
    pub fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        let inner = self.lock();
        let path = self.paths.images().join(name);
        if let Some(user) = inner
            .doms
            .values()
            .find(|d| d.stored.def.disks.iter().any(|disk| disk.path == path))
        {
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
