//! The `qemu` driver: qemu-system-x86_64 daemonized (it outlives ferrovirtd), controlled over QMP.
//!
//! Per VM in its run folder: `pid` (QEMU's pidfile), `qmp.sock` (commands), `qmp-events.sock`
//! (held by the daemon's monitor thread), `serial.sock` (the console hub's link), `qemu.log`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferrovirt_api::def::{Accel, BootDev, DiskDevice, GraphicsKind};
use ferrovirt_api::{Action, ApiError, DomainDef};
use serde_json::Value;

use super::qmp::Qmp;
use super::{Driver, ExitNotifier, LiveDiskSnapshot, Progress, Started, VmCtx, VmRef};
use crate::console::ConsoleHub;
use crate::deadline::Deadline;
use crate::runtime::{
    kill, kill_and_wait, pid_alive, pid_has_arg, pid_stopped, wait_gone, ExitKind, Runtime,
};

mod save;
mod snapshot;

pub struct QemuDriver {
    pub binary: PathBuf,
    /// The accelerator of a definition that names none (from the host's capabilities).
    pub default_accel: Accel,
}

/// How long a VM's control socket may take to appear (QEMU creates it before daemonizing).
const SOCKET_APPEARS: Duration = Duration::from_secs(2);

impl QemuDriver {
    pub fn from_env(default_accel: Accel) -> Self {
        let binary = std::env::var_os("FERROVIRT_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| "qemu-system-x86_64".into());
        QemuDriver {
            binary,
            default_accel,
        }
    }

    fn args(&self, ctx: &VmCtx) -> Vec<String> {
        let def = ctx.def;
        let dir = &ctx.vm_dir;
        let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
        let accel = match def.accel.unwrap_or(self.default_accel) {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("guest={},debug-threads=on", def.name),
            "-uuid".into(),
            def.uuid.clone().unwrap_or_default(),
            "-machine".into(),
            format!("pc,accel={accel}"),
            "-m".into(),
            format!("{}k", def.memory_kib),
            "-smp".into(),
            def.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-daemonize".into(),
            "-pidfile".into(),
            p("pid"),
            "-chardev".into(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off",
                p("serial.sock")
            ),
            "-serial".into(),
            "chardev:serial0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p("qmp.sock")),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p("qmp-events.sock")),
            // A guest panic becomes a SHUTDOWN event with reason guest-panic.
            "-device".into(),
            "pvpanic".into(),
            "-action".into(),
            "panic=shutdown".into(),
        ];
        if def.on_reboot == Action::Destroy {
            a.push("-no-reboot".into());
        }
        if let Some(k) = &def.os.kernel {
            a.extend(["-kernel".into(), k.to_string_lossy().into_owned()]);
            if let Some(i) = &def.os.initrd {
                a.extend(["-initrd".into(), i.to_string_lossy().into_owned()]);
            }
            if let Some(c) = &def.os.cmdline {
                a.extend(["-append".into(), c.clone()]);
            }
        }
        for (i, d) in def.disks.iter().enumerate() {
            let file = d.path.to_string_lossy().replace(',', ",,");
            let drive = match d.device {
                DiskDevice::Cdrom => format!(
                    "file={file},format=raw,media=cdrom,readonly=on,if=ide,index={}",
                    i % 4
                ),
                DiskDevice::Disk => format!(
                    "file={file},format={},if=virtio{}",
                    d.format.as_str(),
                    if d.readonly { ",readonly=on" } else { "" }
                ),
            };
            a.extend(["-drive".into(), drive]);
        }
        if !def.os.boot.is_empty() {
            let order: String = def
                .os
                .boot
                .iter()
                .map(|b| match b {
                    BootDev::Hd => 'c',
                    BootDev::Cdrom => 'd',
                    BootDev::Network => 'n',
                })
                .collect();
            a.extend(["-boot".into(), format!("order={order}")]);
        }
        // Each interface is a TAP the daemon made and enslaved to its bridge (see crate::network).
        for (i, nic) in def.interfaces.iter().enumerate() {
            let tap = crate::network::tap_name(def, i);
            a.extend([
                "-netdev".into(),
                format!("tap,id=net{i},ifname={tap},script=no,downscript=no"),
            ]);
            let mac = nic.mac.clone().unwrap_or_default();
            a.extend([
                "-device".into(),
                format!("virtio-net-pci,netdev=net{i},mac={mac}"),
            ]);
        }
        match &def.graphics {
            Some(g) if g.kind == GraphicsKind::Vnc => {
                // `to=` lets QEMU pick the first free display from 0 up; the port is read back over
                // QMP. The manager checked the address against its policy (loopback unless
                // --allow-remote-vnc, then with a password, set over QMP after start).
                let host = if g.listen.contains(':') {
                    format!("[{}]", g.listen)
                } else {
                    g.listen.clone()
                };
                let password = if g.passwd.is_some() {
                    ",password=on"
                } else {
                    ""
                };
                a.extend([
                    "-vga".into(),
                    "std".into(),
                    "-vnc".into(),
                    format!("{host}:0,to=99{password}"),
                ]);
            }
            _ => a.extend(["-display".into(), "none".into()]),
        }
        a
    }

    /// One QMP command on a fresh connection, all of it within `deadline`.
    fn command(
        &self,
        dir: &Path,
        name: &str,
        args: Option<Value>,
        deadline: &Deadline,
    ) -> Result<Value, ApiError> {
        let mut qmp = Qmp::connect(&dir.join("qmp.sock"), SOCKET_APPEARS, deadline)?;
        qmp.execute(name, args, deadline)
    }

    /// Watch QMP events until QEMU exits, then report how it ended.
    fn monitor(
        dir: &Path,
        pid: u32,
        on_exit: ExitNotifier,
        deadline: &Deadline,
    ) -> Result<(), ApiError> {
        let mut qmp = Qmp::connect(&dir.join("qmp-events.sock"), SOCKET_APPEARS, deadline)?;
        std::thread::Builder::new()
            .name("qemu-monitor".into())
            .spawn(move || {
                let mut kind = ExitKind::Crash;
                while let Some(ev) = qmp.next_event() {
                    if ev.get("event").and_then(Value::as_str) == Some("SHUTDOWN") {
                        let reason = ev
                            .pointer("/data/reason")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        kind = match reason {
                            "guest-shutdown" => ExitKind::Poweroff,
                            "guest-reset" => ExitKind::Reboot,
                            "guest-panic" => ExitKind::Crash,
                            _ => ExitKind::Destroyed,
                        };
                    }
                }
                wait_gone(pid, Duration::from_secs(10));
                on_exit(kind);
            })
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(())
    }

    fn read_pid(dir: &Path) -> Option<u32> {
        fs::read_to_string(dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Where VNC really listens: (host, port), as QEMU reports it.
    fn vnc_address(&self, dir: &Path, deadline: &Deadline) -> Option<(String, u16)> {
        let v = self.command(dir, "query-vnc", None, deadline).ok()?;
        let port = v
            .get("service")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())?;
        let host = v.get("host").and_then(Value::as_str)?.to_string();
        Some((host, port))
    }

    /// Start QEMU with the definition's arguments plus `extra` (a restore adds its own).
    fn launch(&self, ctx: VmCtx, extra: &[&str]) -> Result<Started, ApiError> {
        let dir = ctx.vm_dir.clone();
        for f in ["pid", "qmp.sock", "qmp-events.sock", "serial.sock"] {
            let _ = fs::remove_file(dir.join(f));
        }
        let log_path = dir.join("qemu.log");
        let log = crate::files::create_private(&log_path)
            .map_err(|e| ApiError::internal(format!("{}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        // With -daemonize QEMU forks, sets up the VM, and its first process exits once the VM is
        // ready: from then on QEMU is not our child and survives ferrovirtd.
        let binary = ctx.def.emulator_binary().unwrap_or(&self.binary);
        let mut child = Command::new(binary)
            .args(self.args(&ctx))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                ApiError::driver(format!(
                    "cannot run {}: {e} (install qemu-system-x86 or set FERROVIRT_QEMU)",
                    binary.display()
                ))
            })?;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if let Err(e) = ctx.deadline.check() {
                // The daemonizing parent is stuck: take it and whatever it forked down.
                let _ = child.kill();
                let _ = child.wait();
                if let Some(pid) = Self::read_pid(&dir) {
                    kill(pid, libc::SIGKILL);
                }
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if !status.success() {
            return Err(ApiError::driver(format!(
                "qemu failed to start: {}",
                log_tail(&log_path)
            )));
        }
        let pid = Self::read_pid(&dir)
            .ok_or_else(|| ApiError::driver("qemu started but wrote no pidfile"))?;
        let console = match ConsoleHub::start(
            &dir.join("serial.sock"),
            ctx.console_log.clone(),
            Box::new(|| {}),
        ) {
            Ok(c) => c,
            Err(e) => {
                kill(pid, libc::SIGKILL);
                return Err(ApiError::driver(e));
            }
        };
        if let Err(e) = Self::monitor(&dir, pid, ctx.on_exit, &ctx.deadline) {
            kill(pid, libc::SIGKILL);
            return Err(e);
        }
        // Until the password is set, VNC with password=on lets nobody in.
        if let Some(passwd) = ctx.def.graphics.as_ref().and_then(|g| g.passwd.clone()) {
            let args = serde_json::json!({"protocol": "vnc", "password": passwd});
            if let Err(e) = self.command(&dir, "set_password", Some(args), &ctx.deadline) {
                kill(pid, libc::SIGKILL);
                return Err(e);
            }
        }
        let vnc = if ctx.def.graphics.is_some() {
            self.vnc_address(&dir, &ctx.deadline)
        } else {
            None
        };
        Ok(Started {
            runtime: Runtime {
                id: ctx.id,
                pid: Some(pid),
                vnc_port: vnc.as_ref().map(|(_, port)| *port),
                vnc_listen: vnc.map(|(host, _)| host),
                engine: None,
            },
            console: Some(console),
        })
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

impl Driver for QemuDriver {
    fn check(&self, _def: &DomainDef) -> Result<(), ApiError> {
        // Network existence is checked by the manager; everything else QEMU offers.
        Ok(())
    }

    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError> {
        self.launch(ctx, &[])
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
        let uuid = ctx.def.uuid.clone().unwrap_or_default();
        if !pid_alive(pid) || !pid_has_arg(pid, &uuid) {
            return None;
        }
        let console = ConsoleHub::start(
            &ctx.vm_dir.join("serial.sock"),
            ctx.console_log.clone(),
            Box::new(|| {}),
        );
        Self::monitor(&ctx.vm_dir, pid, ctx.on_exit, &ctx.deadline).ok()?;
        Some(Started {
            runtime: runtime.clone(),
            console: console.ok(),
        })
    }

    fn destroy(&self, vm: &VmRef) -> Result<(), ApiError> {
        let Some(pid) = vm.runtime.pid else {
            return Ok(());
        };
        // A polite quit first, briefly: a QEMU that does not answer is killed.
        let polite = vm.deadline.within(Duration::from_secs(3));
        if pid_stopped(pid) || self.command(vm.vm_dir, "quit", None, &polite).is_err() {
            kill(pid, libc::SIGKILL);
        }
        if !wait_gone(pid, vm.deadline.remaining().min(Duration::from_secs(10))) {
            return kill_and_wait(pid, "qemu");
        }
        Ok(())
    }

    fn shutdown(&self, vm: &VmRef) -> Result<Option<ExitKind>, ApiError> {
        self.command(vm.vm_dir, "system_powerdown", None, vm.deadline)
            .map(|_| None)
    }

    fn suspend(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.command(vm.vm_dir, "stop", None, vm.deadline)
            .map(|_| ())
    }

    fn resume(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.command(vm.vm_dir, "cont", None, vm.deadline)
            .map(|_| ())
    }

    fn reset(&self, vm: &VmRef) -> Result<(), ApiError> {
        self.command(vm.vm_dir, "system_reset", None, vm.deadline)
            .map(|_| ())
    }

    // Snapshots: see qemu/snapshot.rs.

    fn snapshot_live(
        &self,
        vm: &VmRef,
        disks: &[LiveDiskSnapshot],
        memory: Option<(&Path, &str)>,
    ) -> Result<(), ApiError> {
        self.snapshot_running(vm, disks, memory)
    }

    fn start_from_memory(&self, ctx: VmCtx, memory: &Path, tag: &str) -> Result<Started, ApiError> {
        self.start_loading(ctx, memory, tag)
    }

    fn commit_live(
        &self,
        vm: &VmRef,
        active: &Path,
        top: &Path,
        base: &Path,
    ) -> Result<(), ApiError> {
        self.commit_running(vm, active, top, base)
    }

    fn delete_internal_live(&self, vm: &VmRef, image: &Path, name: &str) -> Result<(), ApiError> {
        self.delete_internal_running(vm, image, name)
    }
}
