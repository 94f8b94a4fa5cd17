//! Where the kit keeps downloaded kernels and generated images, and how it runs guest/ scripts.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Context, Error, Result};

/// The repository root (two levels above this crate's manifest).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// `$FERROVIRT_GUEST_CACHE`, or `<repo>/target/guest-cache`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("FERROVIRT_GUEST_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("target").join("guest-cache"),
    }
}

/// A fresh scratch directory under the cache for one test's generated files.
pub fn scratch_dir(label: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = cache_dir()
        .join("scratch")
        .join(format!("{label}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Runs `guest/<script>` and returns its stdout; the error carries its stderr.
pub(crate) fn run_guest_script(script: &str, args: &[&str]) -> Result<String> {
    let path = repo_root().join("guest").join(script);
    if !path.is_file() {
        return Err(Error::new(format!(
            "{} is missing: the testkit needs the repository's guest/ scripts",
            path.display()
        )));
    }
    let output = Command::new("bash")
        .arg(&path)
        .args(args)
        .env("FERROVIRT_GUEST_CACHE", cache_dir())
        .output()
        .context(|| format!("cannot run {}", path.display()))?;
    if !output.status.success() {
        return Err(Error::new(format!(
            "{} failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout)
        .context(|| format!("{} printed non-UTF-8 output", path.display()))
}
