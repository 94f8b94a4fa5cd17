//! The fuzz loop: bounded in time (and optionally in count), seeded, every input reproducible.
//!
//! Environment (all optional):
//! * `FERROVIRT_FUZZ_SECONDS`: time per target (default [`DEFAULT_SECONDS`]); `0` runs only the
//!   corpus and the regression inputs.
//! * `FERROVIRT_FUZZ_ITERS`: at most this many mutated inputs per target.
//! * `FERROVIRT_FUZZ_SEED` (else `FERROVIRT_TEST_SEED`): the seed; without one a fresh seed is
//!   drawn and printed, so every run explores new inputs and every failure can be replayed.
//! * `FERROVIRT_FUZZ_ITER=N`: run only mutated input N of the seed (replays one failure).
//! * `FERROVIRT_FUZZ_INPUT=FILE`: run only this file.
//! * `FERROVIRT_FUZZ_HANG_SECONDS`: one input running longer than this is a hang (default 60).
//!
//! A target that panics (or trips the hang watchdog) has its input written to
//! `target/fuzz-crashes/<target>/` and the test fails with the seed, the iteration and the
//! command that replays it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mutate::{iteration_rng, mutate, Material};

/// Seconds per target when `FERROVIRT_FUZZ_SECONDS` is not set: a dozen targets, two cores,
/// about a minute and a half of the test suite in all.
pub const DEFAULT_SECONDS: f64 = 8.0;

/// What a target did with an input; counted so a run shows how much got past the first checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Parsed (and, where the target checks it, round-tripped).
    Accepted,
    /// Refused with an error, as a bad input should be.
    Rejected,
}

/// A fuzz target's static description.
pub struct Target {
    /// Also the corpus folder name (`crates/fuzz/corpus/<name>/`).
    pub name: &'static str,
    /// Tokens of the input language for the mutator.
    pub dict: &'static [&'static [u8]],
    /// Mutated inputs never grow past this (at least the largest corpus entry).
    pub max_len: usize,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub inputs: u64,
    pub accepted: u64,
    pub seconds: f64,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.inputs as f64 / self.seconds.max(1e-9)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        v.parse()
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

fn env_seconds(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number of seconds")),
        Err(_) => default,
    }
}

/// The crate's folder, where corpus and regression inputs live.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace's root (tests run in the crate's folder; paths people type start here).
pub fn workspace_dir() -> PathBuf {
    let d = crate_dir().join("../..");
    d.canonicalize().unwrap_or(d)
}

/// Every file of `dir`, sorted by name (missing folder: none).
pub fn read_dir_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .map(|p| {
                let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                (p, data)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut r = crate::mutate::Rng::new(t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32);
    r.next_u64()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Writes a failing input where the README says to look for it; returns its path.
fn save_crash(target: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::var_os("FERROVIRT_FUZZ_CRASH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/fuzz-crashes"))
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("crash-{:016x}", fnv(data)));
    if let Err(e) = std::fs::write(&path, data) {
        eprintln!(
            "fuzz {target}: could not save the input to {}: {e}",
            path.display()
        );
    }
    path
}

/// Shared with the hang watchdog: what is running now.
struct Current {
    target: &'static str,
    /// Milliseconds since `epoch` when the current input started; 0 when idle.
    started_ms: AtomicU64,
    label: Mutex<String>,
    input: Mutex<Vec<u8>>,
    done: AtomicBool,
    epoch: Instant,
}

fn watchdog(cur: Arc<Current>, limit: Duration) {
    std::thread::spawn(move || {
        while !cur.done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(250));
            let started = cur.started_ms.load(Ordering::SeqCst);
            if started == 0 {
                continue;
            }
            let now = cur.epoch.elapsed().as_millis() as u64;
            if now.saturating_sub(started) > limit.as_millis() as u64 {
                let input = cur.input.lock().unwrap().clone();
                let path = save_crash(cur.target, &input);
                eprintln!(
                    "fuzz {}: HANG: {} ran longer than {limit:?}; input saved to {}",
                    cur.target,
                    cur.label.lock().unwrap(),
                    path.display()
                );
                // A hung target cannot be unwound from another thread: end the test binary.
                std::process::abort();
            }
        }
    });
}

/// Runs `target`'s regression inputs, its corpus, then mutated inputs until the budget is spent.
/// Panics (failing the test) on the first input that makes `one` panic, naming how to replay it.
pub fn run(target: &Target, mut one: impl FnMut(&[u8]) -> Outcome) -> Report {
    let seed = env_u64("FERROVIRT_FUZZ_SEED")
        .or_else(|| env_u64("FERROVIRT_TEST_SEED"))
        .unwrap_or_else(fresh_seed);
    let seconds = env_seconds("FERROVIRT_FUZZ_SECONDS", DEFAULT_SECONDS);
    let max_iters = env_u64("FERROVIRT_FUZZ_ITERS");
    let only_iter = env_u64("FERROVIRT_FUZZ_ITER");
    // A relative path is taken from the workspace root, where the README's commands run.
    let only_input = std::env::var_os("FERROVIRT_FUZZ_INPUT").map(|p| workspace_dir().join(p));
    let hang = Duration::from_secs_f64(env_seconds("FERROVIRT_FUZZ_HANG_SECONDS", 60.0));
    let name = target.name;
    eprintln!(
        "fuzz {name}: seed {seed} (replay with FERROVIRT_FUZZ_SEED={seed}), {seconds} s budget"
    );

    let corpus_files = read_dir_files(&crate_dir().join("corpus").join(name));
    let regressions = read_dir_files(&crate_dir().join("regressions").join(name));
    let corpus: Vec<Vec<u8>> = corpus_files.iter().map(|(_, d)| d.clone()).collect();
    assert!(
        !corpus.is_empty() || only_input.is_some(),
        "fuzz {name}: no seed corpus in {}",
        crate_dir().join("corpus").join(name).display()
    );
    let max_len = corpus
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(target.max_len);
    let material = Material {
        dict: target.dict,
        corpus: &corpus,
        max_len,
    };

    let cur = Arc::new(Current {
        target: name,
        started_ms: AtomicU64::new(0),
        label: Mutex::new(String::new()),
        input: Mutex::new(Vec::new()),
        done: AtomicBool::new(false),
        epoch: Instant::now(),
    });
    watchdog(cur.clone(), hang);
    let start = Instant::now();
    let mut report = Report {
        seed,
        inputs: 0,
        accepted: 0,
        seconds: 0.0,
    };

    let mut exec = |label: String, data: &[u8], replay: &str| {
        *cur.input.lock().unwrap() = data.to_vec();
        *cur.label.lock().unwrap() = label.clone();
        cur.started_ms.store(
            (cur.epoch.elapsed().as_millis() as u64).max(1),
            Ordering::SeqCst,
        );
        let result = catch_unwind(AssertUnwindSafe(|| one(data)));
        cur.started_ms.store(0, Ordering::SeqCst);
        match result {
            Ok(o) => {
                report.inputs += 1;
                if o == Outcome::Accepted {
                    report.accepted += 1;
                }
            }
            Err(e) => {
                cur.done.store(true, Ordering::SeqCst);
                let msg = e
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| e.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                let path = save_crash(name, data);
                panic!(
                    "fuzz {name}: {label} panicked: {msg}\n  input ({} bytes) saved to {}\n  \
                     replay: {replay}FERROVIRT_FUZZ_INPUT={} cargo test -p ferrovirt-fuzz -- {name}\n  \
                     then copy it to crates/fuzz/regressions/{name}/ so it is replayed on every run",
                    data.len(),
                    path.display(),
                    path.display()
                );
            }
        }
    };

    if let Some(file) = &only_input {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        exec(format!("input {}", file.display()), &data, "");
    } else if let Some(it) = only_iter {
        let (data, label) = mutated(&corpus, &material, seed, it);
        exec(
            label,
            &data,
            &format!("FERROVIRT_FUZZ_SEED={seed} FERROVIRT_FUZZ_ITER={it} or "),
        );
    } else {
        for (path, data) in regressions.iter().chain(corpus_files.iter()) {
            exec(format!("input {}", path.display()), data, "");
        }
        let mut it = 0u64;
        while start.elapsed().as_secs_f64() < seconds && max_iters.is_none_or(|m| it < m) {
            let (data, label) = mutated(&corpus, &material, seed, it);
            exec(
                label,
                &data,
                &format!("FERROVIRT_FUZZ_SEED={seed} FERROVIRT_FUZZ_ITER={it} or "),
            );
            it += 1;
        }
    }
    cur.done.store(true, Ordering::SeqCst);
    report.seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {name}: {} inputs in {:.1} s ({:.0}/s), {} accepted, seed {seed}",
        report.inputs,
        report.seconds,
        report.per_second(),
        report.accepted
    );
    report
}

/// Mutated input `it` of `seed`.
fn mutated(corpus: &[Vec<u8>], m: &Material<'_>, seed: u64, it: u64) -> (Vec<u8>, String) {
    let mut r = iteration_rng(seed, it);
    let mut data = r.pick(corpus).clone();
    mutate(&mut data, &mut r, m);
    (data, format!("seed {seed} iteration {it}"))
}
