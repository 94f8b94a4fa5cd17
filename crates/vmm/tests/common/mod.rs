//! Test support: tiny guest images assembled with iced-x86, and a runner for the
//! real ferrovmm binary.
#![allow(dead_code)]

pub mod asm;
pub mod image;
pub mod live;
pub mod netns;
pub mod vdriver;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn ferrovmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovmm"))
}

/// What a finished ferrovmm run left behind.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Waits for `child` up to `timeout`, killing it if it takes longer.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Run {
    let deadline = Instant::now() + timeout;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let mut buf = Vec::new();
            let _ = o.read_to_end(&mut buf);
            s = String::from_utf8_lossy(&buf).into_owned();
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for ferrovmm") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "ferrovmm did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status: status.code().unwrap_or(-1),
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Spawns ferrovmm with `args`, output captured, stdin closed.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(ferrovmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrovmm")
}

/// Runs ferrovmm to completion.
pub fn run(args: &[&str]) -> Run {
    wait_with_timeout(spawn(args), Duration::from_secs(30))
}

/// Boots `kernel` with extra args, serial on stdio.
pub fn boot(kernel: &Path, extra: &[&str]) -> Run {
    let k = kernel.to_str().expect("utf-8 path");
    let mut args = vec!["--name", "test", "--kernel", k];
    if !extra.contains(&"--memory") {
        args.extend_from_slice(&["--memory", "64"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

/// Writes `g` (plus `extra` segments) as a PVH ELF kernel entered at `CODE_BASE`.
pub fn pvh_kernel(dir: &Path, name: &str, g: asm::Guest, extra: Vec<image::Segment>) -> PathBuf {
    let mut segments = vec![image::Segment {
        addr: asm::CODE_BASE,
        data: g.assemble(asm::CODE_BASE),
    }];
    segments.extend(extra);
    image::write(
        dir,
        name,
        &image::elf(&segments, asm::CODE_BASE, Some(asm::CODE_BASE as u32)),
    )
}

/// A scratch directory removed at the end of the test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}
