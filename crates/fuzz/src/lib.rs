//! ferrovirt-fuzz: fuzz targets for every parser that takes untrusted input, on stable Rust.
//!
//! cargo-fuzz needs nightly, which these machines do not have; afl.rs needs its own compiler
//! wrapper and a fork server per target. Instead each target is a plain function over bytes,
//! driven by [`engine::run`]: a seeded, bounded, reproducible loop of structure-aware mutations
//! (a libFuzzer-style mutator with a per-target dictionary) over a seed corpus committed in
//! `crates/fuzz/corpus/<target>/`, run by `cargo test` like any other test. See the README's
//! "Fuzzing" section.
//!
//! * [`engine`]: the loop (seed, budget, replay, crash files, hang watchdog)
//! * [`mutate`]: the mutator and its random generator
//! * [`targets`]: one module per parser family

pub mod engine;
pub mod mutate;
pub mod targets;

pub use engine::{run, Outcome, Target};
