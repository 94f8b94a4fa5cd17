//! Fuzzing qcow2 image opening, reading, checking and writing (crates/disk).

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::qcow2::{Qcow2Target, QCOW2};

#[test]
fn qcow2_fuzz() {
    let mut t = Qcow2Target::new();
    run(&QCOW2, |input| t.one(input));
}
