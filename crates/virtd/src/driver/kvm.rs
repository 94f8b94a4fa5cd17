//! The `kvm` driver: one ferrovmm process per VM (see docs/ferrovmm-contract.md), in its own
//! session so it outlives ferrovirtd; controlled over its HTTP API socket.
//!
//! Per VM in its run folder: `pid`, `api.sock`, `serial.sock` (the console hub's link), `vmm.log`
//! (ferrovmm's stderr) and `exit.json` (ferrovmm's exit record: how the VM ended).
//! ferrovmm's argv comes from one typed `LaunchConfig` (ferrovmm-api).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferrovirt_api::http::unix_request;
use ferrovirt_api::{ApiError, DomainDef};
use ferrovmm_api::launch::{DiskConfig, Mac, NetBackend, NetConfig, SerialMode};
use ferrovmm_api::{ExitReason, ExitRecord, LaunchConfig};

use super::{Driver, ExitNotifier, Progress, Started, VmCtx, VmRef};
use crate::console::ConsoleHub;
use crate::deadline::Deadline;
use crate::runtime::{
    kill, kill_and_wait, pid_alive, pid_has_arg, pid_stopped, wait_gone, ExitKind, Runtime,
};

mod save;

pub struct KvmDriver {
    pub binary: PathBuf,
}

impl KvmDriver {
    /// ferrovmm from FERROVIRT_VMM, else next to ferrovirtd, else from PATH.
    pub fn from_env() -> Self {
        if let Some(p) = std::env::var_os("FERROVIRT_VMM") {
            return KvmDriver { binary: p.into() };
        }
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("ferrovmm")));
        let binary = match sibling {
            Some(s) if s.is_file() => s,
            _ => "ferrovmm".into(),
        };
        KvmDriver { binary }
    }

    /// One call of ferrovmm's API, answered within `deadline`.
    fn api(
        &self,
        dir: &Path,
        method: &str,
        path: &str,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, ApiError> {
        self.api_with(dir, method, path, None, deadline)
    }

    /// The same with a JSON body.
    fn api_with(
        &self,
        dir: &Path,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, ApiError> {
        deadline.check()?;
        let resp = unix_request(
            &dir.join("api.sock"),
            method,
            path,
            json.map(|_| "application/json"),
            json.unwrap_or_default(),
            deadline.io_timeout(),
        )
        .map_err(|e| {
            if deadline.expired() {
                deadline.timeout(&format!(
                    "ferrovmm did not answer {method} {path} (is the VM process stopped?)"
                ))
            } else {
                ApiError::driver(format!("ferrovmm API: {e}"))
            }
        })?;
        if resp.status >= 300 {
            return Err(ApiError::driver(format!(
                "ferrovmm {method} {path}: HTTP {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            )));
        }
        Ok(resp.body)
    }

    /// Run ferrovmm with `argv` (a launch or a restore) and wait until its API answers.
    /// With `jail`, the process makes its jail's mounts before it runs ferrovmm.
    fn spawn(
        &self,
        ctx: VmCtx,
        argv: Vec<String>,
        jail: Option<crate::jail::Mounts>,
    ) -> Result<Started, ApiError> {
        let dir = ctx.vm_dir.clone();
        let log_path = dir.join("vmm.log");
        let log = crate::files::create_private(&log_path)
            .map_err(|e| ApiError::internal(format!("{}: {e}", log_path.display())))?;
        let mut cmd = Command::new(ctx.def.emulator_binary().unwrap_or(&self.binary));
        cmd.args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setsid() is async-signal-safe; it detaches the VMM from the daemon's session so
        // signals aimed at the daemon's process group do not reach the VM. The jail's mounts
        // are plain syscalls on strings prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                match &jail {
                    Some(m) => m.enter(),
                    None => Ok(()),
                }
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            ApiError::driver(format!(
                "cannot run {}: {e} (build ferrovmm or set FERROVIRT_VMM)",
                self.binary.display()
            ))
        })?;
        let pid = child.id();
        let _ = fs::write(dir.join("pid"), format!("{pid}\n"));
        // Wait for the API socket to answer: the contract says it exists once the VM runs.
        let deadline = ctx.deadline.within(Duration::from_secs(10));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ApiError::driver(format!(
                    "ferrovmm exited at start ({status}): {}",
                    why_it_ended(&dir, &log_path)
                )));
            }
            if self.api(&dir, "GET", "/vm", &deadline).is_ok() {
                break;
            }
            if deadline.check().is_err() {
                kill(pid, libc::SIGKILL);
                let _ = child.wait();
                return Err(ApiError::driver(format!(
                    "ferrovmm did not answer on its API socket within 10 s: {}",
                    log_tail(&log_path)
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Reap our child while we live; after a daemon restart init reaps it.
        let _ = std::thread::Builder::new()
            .name("vmm-reaper".into())
            .spawn(move || {
                let _ = child.wait();
            });
        let on_eof = Self::watch_exit(dir.clone(), pid, ctx.on_exit);
        let console = ConsoleHub::start(&dir.join("serial.sock"), ctx.console_log.clone(), on_eof)
            .map_err(|e| {
                // A guest that ends at once takes its console socket with it.
                match ExitRecord::read(&dir.join(EXIT_FILE)) {
                    Ok(record) => ApiError::driver(format!(
                        "the VM ended as soon as it started: {}",
                        record.reason.describe()
                    )),
                    Err(_) => {
                        kill(pid, libc::SIGKILL);
                        ApiError::driver(e)
                    }
                }
            })?;
        Ok(Started {
            runtime: Runtime {
                id: ctx.id,
                pid: Some(pid),
                vnc_port: None,
                vnc_listen: None,
                // Recorded by the manager, which chose the engine.
                engine: None,
            },
            console: Some(console),
        })
    }

    /// After the serial socket closed: wait for the process to end and read its exit record.
    fn watch_exit(dir: PathBuf, pid: u32, on_exit: ExitNotifier) -> Box<dyn FnOnce() + Send> {
        Box::new(move || {
            wait_gone(pid, Duration::from_secs(10));
            crate::jail::release(&dir);
            on_exit(exit_kind(&dir));
        })
    }
}

/// ferrovmm's exit record in a VM's run folder (see ferrovmm_api::exit).
pub const EXIT_FILE: &str = "exit.json";

/// The launch configuration of a domain whose run folder is `dir`.
pub fn launch_config(def: &DomainDef, dir: &Path) -> Result<LaunchConfig, ApiError> {
    let kernel = def.os.kernel.clone().ok_or_else(|| {
        ApiError::not_supported("the kvm driver (ferrovmm) needs os.kernel (--boot kernel=...)")
    })?;
    let mut c = LaunchConfig::new(def.name.clone(), kernel);
    c.initrd = def.os.initrd.clone();
    if let Some(cmdline) = &def.os.cmdline {
        c.cmdline = cmdline.clone();
    }
    // ferrovmm sizes RAM in MiB: round up, the definition keeps its exact KiB.
    c.memory_mib = def.memory_mib_rounded_up();
    c.vcpus = def.vcpus;
    c.serial = SerialMode::Socket(dir.join("serial.sock"));
    c.api_socket = Some(dir.join("api.sock"));
    c.exit_file = Some(dir.join(EXIT_FILE));
    c.disks = def
        .disks
        .iter()
        .map(|d| DiskConfig {
            format: Some(d.format),
            readonly: d.readonly,
            ..DiskConfig::new(d.path.clone())
        })
        .collect();
    // The daemon made each interface's TAP and enslaved it to its bridge (see crate::network).
    for (i, nic) in def.interfaces.iter().enumerate() {
        let mac = match &nic.mac {
            Some(m) => Some(
                m.parse::<Mac>()
                    .map_err(|e| ApiError::invalid(format!("interface {i}: {e}")))?,
            ),
            None => None,
        };
        c.nets.push(NetConfig {
            backend: NetBackend::Tap(crate::network::tap_name(def, i)),
            mac,
        });
    }
    c.validate().map_err(|e| {
        ApiError::invalid(format!(
            "the kvm driver (ferrovmm) cannot run this domain: {e}"
        ))
    })?;
    Ok(c)
}

/// How the VM in `dir` ended, from ferrovmm's exit record; none means it died without
/// writing one (killed, aborted): a crash.
pub fn exit_kind(dir: &Path) -> ExitKind {
    match ExitRecord::read(&dir.join(EXIT_FILE)) {
        Ok(record) => match record.reason {
            ExitReason::Poweroff => ExitKind::Poweroff,
            ExitReason::Reset => ExitKind::Reboot,
            ExitReason::Stopped | ExitReason::Migrated => ExitKind::Destroyed,
            ExitReason::Crash { cause, detail, .. } => {
                eprintln!(
                    "ferrovirtd: VM in {} crashed ({}): {detail}",
                    dir.display(),
                    cause.as_str()
                );
                ExitKind::Crash
            }
            ExitReason::Error { message } => {
                eprintln!("ferrovirtd: VM in {} failed: {message}", dir.display());
                ExitKind::Crash
            }
        },
        Err(why) => {
            eprintln!(
                "ferrovirtd: VM in {} ended without an exit record ({why})",
                dir.display()
            );
            ExitKind::Crash
        }
    }
}

/// Why ferrovmm ended: its exit record, else the end of its log.
fn why_it_ended(dir: &Path, log: &Path) -> String {
    match ExitRecord::read(&dir.join(EXIT_FILE)) {
        Ok(record) => record.reason.describe(),
        Err(_) => log_tail(log),
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

impl Driver for KvmDriver {
    fn check(&self, def: &DomainDef) -> Result<(), ApiError> {
        // A kvm domain that needs more runs on QEMU (ferrovirt_api::engine); this refuses only
        // what reaches ferrovmm anyway.
        if let Some(what) = ferrovirt_api::engine::ferrovmm_lacks(def) {
            return Err(ApiError::not_supported(format!(
                "ferrovmm does not support {what} yet; use --virt-type qemu (type = \"qemu\") or no emulator"
            )));
        }
        // Everything ferrovmm's command line cannot carry is refused now, not at start.
        launch_config(def, Path::new("/run/ferrovirt/vms/check")).map(|_| ())
    }

    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError> {
        let dir = ctx.vm_dir.clone();
        let mut launch = launch_config(ctx.def, &dir)?;
        for f in ["pid", "api.sock", "serial.sock", EXIT_FILE] {
            let _ = fs::remove_file(dir.join(f));
        }
        // A booted VM needs nothing of an earlier restore.
        let _ = fs::remove_dir_all(dir.join(save::RESTORE_DIR));
        // A booted VM runs jailed when the daemon can (see crate::jail); a restored one not yet.
        let started = (|| {
            let jail = if crate::jail::enabled() {
                Some(crate::jail::prepare(&mut launch, &dir)?)
            } else {
                None
            };
            let argv = launch
                .to_args()
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            self.spawn(ctx, argv, jail)
        })();
        if started.is_err() {
            crate::jail::release(&dir);
        }
        started
    }

    fn save(&self, vm: &VmRef, out: &mut fs::File, progress: Progress) -> Result<(), ApiError> {
        self.save_to(vm, out, progress)
    }

    fn restore(
        &self,
        ctx: VmCtx,
        input: &mut fs::File,
        len: u64,
        progress: Progress,
    ) -> Result<Started, ApiError> {
        self.restore_from(ctx, input, len, progress)
    }

    fn reattach(&self, ctx: VmCtx, runtime: &Runtime) -> Option<Started> {
        let pid = runtime.pid?;
        if !pid_alive(pid)
            || !pid_has_arg(pid, &ctx.def.name)
            || self.api(&ctx.vm_dir, "GET", "/vm", &ctx.deadline).is_err()
        {
            return None;
        }
        let on_eof = Self::watch_exit(ctx.vm_dir.clone(), pid, ctx.on_exit);
        let console = ConsoleHub::start(
            &ctx.vm_dir.join("serial.sock"),
            ctx.console_log.clone(),
            on_eof,
        )
        .ok()?;
        Some(Started {
            runtime: runtime.clone(),
            console: Some(console),
        })
    }

    fn destroy(&self, vm: &VmRef) -> Result<(), ApiError> {
        let Some(pid) = vm.runtime.pid else {
            return Ok(());
        };
        // A polite stop first, briefly: a ferrovmm that does not answer is killed.
        let polite = vm.deadline.within(Duration::from_secs(3));
        let gone = if pid_stopped(pid)
            || self.api(vm.vm_dir, "PUT", "/vm/stop", &polite).is_err()
            || !wait_gone(pid, vm.deadline.remaining().min(Duration::from_secs(5)))
        {
            kill_and_wait(pid, "ferrovmm")
        } else {
            Ok(())
        };
        if gone.is_ok() {
            crate::jail::release(vm.vm_dir);
        }
        gone
    }

    fn shutdown(&self, vm: &VmRef) -> Result<Option<ExitKind>, ApiError> {
        self.api(vm.vm_dir, "PUT", "/vm/power-button", vm.deadline)
            .map(|_| None)
    }

    fn suspend(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.api(vm.vm_dir, "PUT", "/vm/pause", vm.deadline)
            .map(|_| ())
    }

    fn resume(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.api(vm.vm_dir, "PUT", "/vm/resume", vm.deadline)
            .map(|_| ())
    }

    fn reset(&self, vm: &VmRef) -> Result<(), ApiError> {
        // ferrovmm ends with "guest reset"; the exit watcher reports a reboot and
        // on_reboot (restart by default) brings the VM back.
        self.api(vm.vm_dir, "PUT", "/vm/reset", vm.deadline)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrovmm_api::{DiskFormat, LogLevel};

    fn def(extra: &str) -> DomainDef {
        DomainDef::from_toml(&format!(
            "name = \"web\"\nuuid = \"0123abcd-0000-4000-8000-000000000000\"\nmemory_kib = 200001\nvcpus = 2\n{extra}\n[os]\nkernel = \"/k\"\ncmdline = \"console=ttyS0\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_definition_becomes_one_launch_config() {
        let d = def(
            "[[disk]]\npath = \"/img/a.qcow2\"\nformat = \"qcow2\"\nreadonly = true\n[[interface]]\ntype = \"bridge\"\nsource = \"br0\"\nmac = \"52:54:00:AA:BB:CC\"\n",
        );
        let dir = Path::new("/run/fv/vms/web");
        let c = launch_config(&d, dir).unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.kernel, Path::new("/k"));
        assert_eq!(c.cmdline, "console=ttyS0");
        // 200001 KiB is 195.3 MiB: ferrovmm gets whole MiB, rounded up.
        assert_eq!(c.memory_mib, 196);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.serial, SerialMode::Socket(dir.join("serial.sock")));
        assert_eq!(
            c.api_socket.as_deref(),
            Some(dir.join("api.sock").as_path())
        );
        assert_eq!(c.exit_file.as_deref(), Some(dir.join(EXIT_FILE).as_path()));
        assert_eq!(c.disks[0].format, Some(DiskFormat::Qcow2));
        assert!(c.disks[0].readonly);
        assert_eq!(
            c.nets[0].backend,
            NetBackend::Tap(crate::network::tap_name(&d, 0))
        );
        assert_eq!(c.nets[0].mac.unwrap().to_string(), "52:54:00:aa:bb:cc");
        assert_eq!(c.log_level, None::<LogLevel>);
        let argv = c.to_args().unwrap();
        assert_eq!(argv[..2], ["--name", "web"]);
    }

    #[test]
    fn what_ferrovmm_cannot_be_given_is_refused_at_define() {
        let e = launch_config(
            &def("[[disk]]\npath = \"/img/a,b.img\"\n"),
            Path::new("/run"),
        )
        .unwrap_err();
        assert!(e.message.contains("contains ','"), "{}", e.message);
        let e = launch_config(
            &def(
                "[[interface]]\ntype = \"bridge\"\nsource = \"br0\"\nmac = \"01:00:5e:00:00:01\"\n",
            ),
            Path::new("/run"),
        )
        .unwrap_err();
        assert!(e.message.contains("multicast"), "{}", e.message);
    }
}
