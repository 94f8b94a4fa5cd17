//! A real KVM host inside QEMU TCG: an outer Linux VM with kvm-amd loaded (TCG emulates
//! AMD SVM), in which a test's payload (e.g. ferrovmm booting a Linux guest) runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cache::scratch_dir;
use crate::error::{Error, Result};
use crate::initramfs::{shell_quote, Compression, Initramfs, LOAD_MODULES_COMMAND};
use crate::kernel::guest_kernel;
use crate::qemu::TcgVm;

const INIT_MARK: &str = "@@FERROVIRT-INIT@@";
const START_MARK: &str = "@@FERROVIRT-START@@";
const EXIT_MARK: &str = "@@FERROVIRT-EXIT=";
const SETUP_FAILED_MARK: &str = "@@FERROVIRT-SETUP-FAILED@@";
const PAYLOAD_PATH: &str = "/ferrovirt/payload.sh";

/// Builder for one run of a shell command inside a nested KVM host.
#[derive(Debug, Clone)]
pub struct Nested {
    memory_mib: u32,
    smp: u32,
    timeout: Duration,
    /// Limit counted from the payload's start (see `timeout_after_start`).
    after_start: Option<Duration>,
    image: Initramfs,
    guest_paths: Vec<String>,
    qemu_args: Vec<std::ffi::OsString>,
}

/// The result of [`Nested::run`].
#[derive(Debug, Clone)]
pub struct NestedOutput {
    /// What the payload printed (stdout and stderr, as they reached the console).
    /// The outer kernel's console log level is lowered to emergencies only while the
    /// payload runs, so its messages stay out of this (the payload can run `dmesg`).
    pub output: String,
    /// The payload's exit status.
    pub status: i32,
    /// The whole console of the outer VM.
    pub console: String,
    /// From starting QEMU to the outer /init running.
    pub time_to_init: Duration,
    /// From starting QEMU to the payload starting (kvm-amd loaded).
    pub time_to_payload: Duration,
    /// From starting QEMU to QEMU's exit.
    pub total: Duration,
}

impl Default for Nested {
    fn default() -> Self {
        Self::new()
    }
}

impl Nested {
    pub fn new() -> Self {
        Nested {
            memory_mib: 1024,
            smp: 1,
            timeout: Duration::from_secs(180),
            after_start: None,
            image: Initramfs::new().compression(Compression::None).modules(&[
                "irqbypass",
                "kvm",
                "kvm_amd",
            ]),
            guest_paths: Vec::new(),
            qemu_args: Vec::new(),
        }
    }

    /// Memory of the outer VM (default 1024 MiB; packed files live in it).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// vCPUs of the outer VM (default 1: TCG on a shared 2-core host gains little from more).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Wall-clock limit for the whole run (default 180 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A limit counted from the payload's start instead of from the outer VM's boot (for runs
    /// expected to hang: quick on an idle host, still right on a loaded one).
    pub fn timeout_after_start(mut self, limit: Duration) -> Self {
        self.after_start = Some(limit);
        self
    }

    /// Packs the host file `host` at `guest_path` in the outer VM (not under /tmp,
    /// which is an empty tmpfs there).
    pub fn file(mut self, host: impl AsRef<Path>, guest_path: &str) -> Self {
        self.image = self.image.file(host, guest_path);
        self.guest_paths.push(guest_path.to_owned());
        self
    }

    /// Packs an executable plus its shared libraries and loader.
    pub fn binary(mut self, host: impl AsRef<Path>, guest_path: &str) -> Self {
        self.image = self.image.binary_with_libs(host, guest_path);
        self.guest_paths.push(guest_path.to_owned());
        self
    }

    /// Packs a file with the given contents and permission bits.
    pub fn bytes(mut self, guest_path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.image = self.image.bytes(guest_path, mode, data);
        self.guest_paths.push(guest_path.to_owned());
        self
    }

    /// An extra QEMU argument for the outer VM (e.g. `-netdev` / `-device` pairs).
    pub fn qemu_arg(mut self, arg: impl Into<std::ffi::OsString>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// Extra kernel modules for the outer VM (e.g. `tun`), loaded before the payload.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.image = self.image.modules(names);
        self
    }

    /// Boots the outer VM, runs `shell_cmd` with `sh` in it (cwd `/`, `/dev/kvm` present,
    /// stdin `/dev/null`) and returns its output and exit status.
    pub fn run(&self, shell_cmd: &str) -> Result<NestedOutput> {
        if let Some(path) = self
            .guest_paths
            .iter()
            .find(|p| p.starts_with("/tmp/") || *p == "/tmp")
        {
            return Err(Error::new(format!(
                "Nested: cannot pack {path}: /tmp is an empty tmpfs in the outer VM; pick another directory"
            )));
        }
        // One outer VM at a time per test process: two TCG machines with KVM guests inside on a
        // 2-core host starve each other past any sane timeout (seen: 400 s, versus 56 s alone).
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let kernel = guest_kernel()?;
        let scratch = scratch_dir("nested")?;
        let image = scratch.join("outer.cpio");
        let result = self
            .image
            .clone()
            .kernel(&kernel)
            .init_script(&outer_init())
            .bytes(PAYLOAD_PATH, 0o755, format!("{shell_cmd}\n"))
            .build(&image)
            .and_then(|image| self.boot(&kernel.bzimage, &image));
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    fn boot(&self, bzimage: &Path, image: &PathBuf) -> Result<NestedOutput> {
        let mut vm = TcgVm::new(bzimage)
            .initrd(image)
            .cpu("EPYC,+svm")
            .memory_mib(self.memory_mib)
            .smp(self.smp)
            .append("console=ttyS0 panic=-1 quiet no_timer_check")
            .timeout(self.timeout);
        if let Some(limit) = self.after_start {
            vm = vm.timeout_after(START_MARK, limit);
        }
        for arg in &self.qemu_args {
            vm = vm.arg(arg.clone());
        }
        let run = vm.run(&[INIT_MARK, START_MARK])?;
        let (output, status) = parse_payload(&run.console)?;
        let missing = |what: &str| {
            Error::new(format!(
                "{what} marker missing from console:\n{}",
                run.console
            ))
        };
        Ok(NestedOutput {
            output,
            status,
            time_to_init: run.mark(INIT_MARK).ok_or_else(|| missing(INIT_MARK))?,
            time_to_payload: run.mark(START_MARK).ok_or_else(|| missing(START_MARK))?,
            total: run.elapsed,
            console: run.console,
        })
    }
}

/// The outer VM's /init. The payload's output reaches the console through `cat`: written
/// straight to the outer console one byte per write() (as a VMM forwards its guest's serial
/// port), bursts lost bytes there (3 runs of 3 lost ~1,100 bytes of a 1,500-byte burst; 6 of
/// 6 were whole through `cat`, which writes them in larger pieces).
fn outer_init() -> String {
    format!(
        "#!/bin/sh\n\
         export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
         echo {INIT_MARK}\n\
         fail() {{ echo \"{SETUP_FAILED_MARK} $*\"; poweroff -f; sleep 60; }}\n\
         mount -t proc proc /proc || fail 'cannot mount /proc'\n\
         mount -t sysfs sysfs /sys || fail 'cannot mount /sys'\n\
         mount -t devtmpfs devtmpfs /dev || fail 'cannot mount /dev'\n\
         mount -t tmpfs tmpfs /tmp || fail 'cannot mount /tmp'\n\
         {LOAD_MODULES_COMMAND} || fail 'loading kernel modules (irqbypass, kvm, kvm-amd) failed'\n\
         [ -c /dev/kvm ] || fail '/dev/kvm did not appear after loading kvm-amd (no SVM in the outer CPU?)'\n\
         cd /\n\
         echo 1 >/proc/sys/kernel/printk\n\
         echo {START_MARK}\n\
         {{ sh {payload} </dev/null 2>&1; echo $? >/tmp/payload.status; }} | cat\n\
         printf '\\n{EXIT_MARK}%d@@\\n' \"$(cat /tmp/payload.status)\"\n\
         poweroff -f\n\
         sleep 60\n",
        payload = shell_quote(PAYLOAD_PATH),
    )
}

/// Splits the outer console into the payload's output and its exit status.
fn parse_payload(console: &str) -> Result<(String, i32)> {
    if let Some(at) = console.find(SETUP_FAILED_MARK) {
        let reason = console[at + SETUP_FAILED_MARK.len()..]
            .lines()
            .next()
            .unwrap_or("")
            .trim();
        return Err(Error::new(format!(
            "the nested KVM host could not be set up: {reason}\nconsole:\n{console}"
        )));
    }
    let start_line = format!("{START_MARK}\n");
    let begin = console
        .find(&start_line)
        .map(|at| at + start_line.len())
        .ok_or_else(|| {
            Error::new(format!(
                "the outer VM never started the payload; console:\n{console}"
            ))
        })?;
    let exit_line = format!("\n{EXIT_MARK}");
    let end = console[begin..]
        .rfind(&exit_line)
        .map(|at| begin + at)
        .ok_or_else(|| {
            Error::new(format!(
                "the payload did not finish (no exit marker: the outer VM crashed or was powered off by the payload); console:\n{console}"
            ))
        })?;
    let status_text = console[end + exit_line.len()..]
        .split("@@")
        .next()
        .unwrap_or("");
    let status = status_text.parse::<i32>().map_err(|_| {
        Error::new(format!(
            "malformed exit marker {status_text:?}; console:\n{console}"
        ))
    })?;
    Ok((console[begin..end].to_owned(), status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_output_and_status_are_extracted() {
        let console = "SeaBIOS\n@@FERROVIRT-INIT@@\n@@FERROVIRT-START@@\nhello\nworld\n\n@@FERROVIRT-EXIT=7@@\nreboot: Power down\n";
        assert_eq!(
            parse_payload(console).unwrap(),
            ("hello\nworld\n".to_owned(), 7)
        );
    }

    #[test]
    fn output_without_final_newline_is_kept_exactly() {
        let console = "@@FERROVIRT-START@@\nno newline\n@@FERROVIRT-EXIT=0@@\n";
        assert_eq!(
            parse_payload(console).unwrap(),
            ("no newline".to_owned(), 0)
        );
    }

    #[test]
    fn setup_failure_is_reported() {
        let console = "@@FERROVIRT-INIT@@\n@@FERROVIRT-SETUP-FAILED@@ /dev/kvm did not appear\n";
        let err = parse_payload(console).unwrap_err();
        assert!(
            err.message()
                .contains("could not be set up: /dev/kvm did not appear"),
            "{err}"
        );
    }

    #[test]
    fn missing_exit_marker_is_an_error() {
        let err = parse_payload("@@FERROVIRT-START@@\nhalf").unwrap_err();
        assert!(err.message().contains("did not finish"), "{err}");
    }

    #[test]
    fn files_under_tmp_are_refused() {
        let err = Nested::new()
            .bytes("/tmp/x", 0o644, "x")
            .run("true")
            .unwrap_err();
        assert!(err.message().contains("/tmp is an empty tmpfs"), "{err}");
    }
}
