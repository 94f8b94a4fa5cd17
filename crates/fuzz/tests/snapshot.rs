//! Fuzzing ferrovmm's snapshot reader and restore with tampered `state` files.

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::snapshot::{SnapshotTarget, SNAPSHOT_STATE};

#[test]
fn snapshot_state_fuzz() {
    let mut t = SnapshotTarget::start();
    run(&SNAPSHOT_STATE, |input| t.one(input));
}

/// Refreshes the seed corpus from a fresh snapshot (after the state format changes):
/// `cargo test -p ferrovirt-fuzz --test snapshot -- --ignored`.
#[test]
#[ignore]
fn refresh_snapshot_corpus() {
    let t = SnapshotTarget::start();
    let dir = ferrovirt_fuzz::engine::crate_dir().join("corpus/snapshot_state");
    std::fs::create_dir_all(&dir).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&t.payload());
    std::fs::write(dir.join("halting-guest"), framed).unwrap();
}
