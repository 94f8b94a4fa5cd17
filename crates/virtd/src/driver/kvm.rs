//! The `kvm` driver: one ferrovmm process per VM (see notes/FERROVMM-CONTRACT.md), in its own
//! session so it outlives ferrovirtd; controlled over its HTTP API socket.
//!
//! Per VM in its run folder: `pid`, `api.sock`, `serial.sock` (the console hub's link), `vmm.log`
//! (ferrovmm's stderr, whose last line says how the VM ended).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrovirt_api::http::unix_request;
use ferrovirt_api::{ApiError, DomainDef};

use super::{Driver, ExitNotifier, Started, VmCtx};
use crate::console::ConsoleHub;
use crate::runtime::{kill, kill_and_wait, pid_alive, pid_has_arg, wait_gone, ExitKind, Runtime};

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

    fn api(&self, dir: &Path, method: &str, path: &str) -> Result<Vec<u8>, ApiError> {
        let resp = unix_request(
            &dir.join("api.sock"),
            method,
            path,
            None,
            b"",
            Some(Duration::from_secs(10)),
        )
        .map_err(|e| ApiError::driver(format!("ferrovmm API: {e}")))?;
        if resp.status >= 300 {
            return Err(ApiError::driver(format!(
                "ferrovmm {method} {path}: HTTP {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            )));
        }
        Ok(resp.body)
    }

    fn args(&self, ctx: &VmCtx) -> Vec<String> {
        let def = ctx.def;
        let p = |f: &str| ctx.vm_dir.join(f).to_string_lossy().into_owned();
        // --name right after the program name, so `ps` shows which VM a process is.
        let mut a = vec!["--name".to_string(), def.name.clone()];
        if let Some(k) = &def.os.kernel {
            a.extend(["--kernel".into(), k.to_string_lossy().into_owned()]);
        }
        if let Some(i) = &def.os.initrd {
            a.extend(["--initrd".into(), i.to_string_lossy().into_owned()]);
        }
        if let Some(c) = &def.os.cmdline {
            a.extend(["--cmdline".into(), c.clone()]);
        }
        a.extend([
            // ferrovmm sizes RAM in MiB: round up, the definition keeps its exact KiB.
            "--memory".into(),
            def.memory_mib_rounded_up().to_string(),
            "--vcpus".into(),
            def.vcpus.to_string(),
        ]);
        a.extend(["--serial".into(), format!("socket={}", p("serial.sock"))]);
        a.extend(["--api-socket".into(), p("api.sock")]);
        for d in &def.disks {
            let mut spec = format!(
                "path={},format={}",
                d.path.to_string_lossy(),
                d.format.as_str()
            );
            if d.readonly {
                spec.push_str(",readonly=on");
            }
            a.extend(["--disk".into(), spec]);
        }
        // The daemon made each interface's TAP and enslaved it to its bridge (see crate::network).
        for (i, nic) in def.interfaces.iter().enumerate() {
            let mut spec = format!("tap={}", crate::network::tap_name(def, i));
            if let Some(mac) = &nic.mac {
                spec.push_str(&format!(",mac={mac}"));
            }
            a.extend(["--net".into(), spec]);
        }
        a
    }

    /// After the serial socket closed: wait for the process to end and read how it ended.
    fn watch_exit(dir: PathBuf, pid: u32, on_exit: ExitNotifier) -> Box<dyn FnOnce() + Send> {
        Box::new(move || {
            wait_gone(pid, Duration::from_secs(10));
            let log = fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
            let kind = if log.contains("guest powered off") {
                ExitKind::Poweroff
            } else if log.contains("guest reset") {
                ExitKind::Reboot
            } else if log.contains("vm stopped") {
                ExitKind::Destroyed
            } else {
                ExitKind::Crash
            };
            on_exit(kind);
        })
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
        match ferrovirt_api::engine::ferrovmm_lacks(def) {
            Some(what) => Err(ApiError::not_supported(format!(
                "ferrovmm does not support {what} yet; use --virt-type qemu (type = \"qemu\") or no emulator"
            ))),
            None => Ok(()),
        }
    }

    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError> {
        let dir = ctx.vm_dir.clone();
        for f in ["pid", "api.sock", "serial.sock"] {
            let _ = fs::remove_file(dir.join(f));
        }
        let log_path = dir.join("vmm.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| ApiError::internal(format!("{}: {e}", log_path.display())))?;
        let mut cmd = Command::new(ctx.def.emulator_binary().unwrap_or(&self.binary));
        cmd.args(self.args(&ctx))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setsid() is async-signal-safe; it detaches the VMM from the daemon's session so
        // signals aimed at the daemon's process group do not reach the VM.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
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
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ApiError::driver(format!(
                    "ferrovmm exited at start ({status}): {}",
                    log_tail(&log_path)
                )));
            }
            if self.api(&dir, "GET", "/vm").is_ok() {
                break;
            }
            if Instant::now() > deadline {
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
                kill(pid, libc::SIGKILL);
                ApiError::driver(e)
            })?;
        Ok(Started {
            runtime: Runtime {
                id: ctx.id,
                pid: Some(pid),
                vnc_port: None,
                // Recorded by the manager, which chose the engine.
                engine: None,
            },
            console: Some(console),
        })
    }

    fn reattach(&self, ctx: VmCtx, runtime: &Runtime) -> Option<Started> {
        let pid = runtime.pid?;
        if !pid_alive(pid)
            || !pid_has_arg(pid, &ctx.def.name)
            || self.api(&ctx.vm_dir, "GET", "/vm").is_err()
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

    fn destroy(&self, _def: &DomainDef, dir: &Path, runtime: &Runtime) -> Result<(), ApiError> {
        let Some(pid) = runtime.pid else {
            return Ok(());
        };
        if self.api(dir, "PUT", "/vm/stop").is_err() || !wait_gone(pid, Duration::from_secs(5)) {
            return kill_and_wait(pid, "ferrovmm");
        }
        Ok(())
    }

    fn shutdown(
        &self,
        _def: &DomainDef,
        dir: &Path,
        _rt: &Runtime,
    ) -> Result<Option<ExitKind>, ApiError> {
        self.api(dir, "PUT", "/vm/power-button").map(|_| None)
    }

    fn suspend(&self, _def: &DomainDef, dir: &Path, _rt: &Runtime) -> Result<(), ApiError> {
        self.api(dir, "PUT", "/vm/pause").map(|_| ())
    }

    fn resume(&self, _def: &DomainDef, dir: &Path, _rt: &Runtime) -> Result<(), ApiError> {
        self.api(dir, "PUT", "/vm/resume").map(|_| ())
    }

    fn reset(&self, _def: &DomainDef, dir: &Path, _rt: &Runtime) -> Result<(), ApiError> {
        // ferrovmm ends with "guest reset"; the exit watcher reports a reboot and
        // on_reboot (restart by default) brings the VM back.
        self.api(dir, "PUT", "/vm/reset").map(|_| ())
    }
}
