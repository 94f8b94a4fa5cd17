//! Shared test helpers: scratch directories, the real qemu-img/qemu-io as oracles,
//! and a small seeded random generator.
#![allow(dead_code)]

use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferrovirt-disk-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a tool and returns its output; a missing tool fails the test with a clear message.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output_within(TOOL_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} (install qemu-utils: apt-get install qemu-utils): {e}")
        })
}

pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// qemu-img with success required.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let o = qemu_img(args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn qemu_io(file: &Path, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(file.display().to_string());
    let o = Command::new("qemu-io")
        .args(&args)
        .output_within(TOOL_TIMEOUT)
        .expect("cannot run qemu-io (install qemu-utils)");
    assert!(
        o.status.success(),
        "qemu-io {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("failed"), "qemu-io {args:?}: {out}");
}

/// `qemu-img check` must find no corruption; returns its exit code (0 or 3 for leaks).
pub fn assert_no_corruption(file: &Path) -> i32 {
    let o = qemu_img(&["check", &file.display().to_string()]);
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check {} exit {code}: {}{}",
        file.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    code
}

pub fn assert_clean(file: &Path) {
    let code = assert_no_corruption(file);
    assert_eq!(code, 0, "qemu-img check found leaks in {}", file.display());
}

/// `qemu-img compare` (with formats) must say identical.
pub fn assert_identical(a: &Path, afmt: &str, b: &Path, bfmt: &str) {
    let o = qemu_img(&[
        "compare",
        "-f",
        afmt,
        "-F",
        bfmt,
        &a.display().to_string(),
        &b.display().to_string(),
    ]);
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// xorshift64*: deterministic workloads from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let v = self.next();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (v >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8;
        }
    }
}

/// `ferrovirt img` (the examples/ferrovirt-img program, which `cargo test` builds).
pub fn img_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/test-xxx -> target/<profile>/examples/ferrovirt-img
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf();
    let bin = profile_dir.join("examples").join("ferrovirt-img");
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        // `cargo test --test NAME` does not build examples: build it (cheap when fresh),
        // into the profile directory the tests run from.
        let mut args = vec![
            "build",
            "-q",
            "-p",
            "ferrovirt-disk",
            "--example",
            "ferrovirt-img",
        ];
        if profile_dir.file_name() == Some(std::ffi::OsStr::new("release")) {
            args.push("--release");
        }
        let st = Command::new(env!("CARGO"))
            .args(&args)
            .status_within(TOOL_TIMEOUT)
            .expect("run cargo");
        assert!(st.success(), "building examples/ferrovirt-img failed");
    });
    assert!(
        bin.exists(),
        "{} is missing after building it",
        bin.display()
    );
    bin
}

/// Runs `ferrovirt img ARGS`: (exit code, stdout, stderr).
pub fn img(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(img_bin())
        .args(args)
        .output_within(TOOL_TIMEOUT)
        .expect("run ferrovirt img");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn img_ok(args: &[&str]) -> String {
    let (code, out, err) = img(args);
    assert_eq!(code, 0, "ferrovirt img {args:?} failed: {out}{err}");
    out
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs a crash-test child (this test binary in child mode): true when it completed, false when
/// the injected fault killed it (an abort, so SIGABRT). Anything else, a panic or another
/// signal, fails the test: it must never pass as the injected crash.
pub fn crash_child_completed(cmd: &mut Command, what: &str) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let out = cmd
        .output_within(TOOL_TIMEOUT)
        .expect("spawn the crash-test child");
    if out.status.success() {
        return true;
    }
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{what}: the child did not die of the injected fault: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}
