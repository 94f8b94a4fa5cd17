//! Fuzzing virtio devices and the PCI transport (config space, BAR MMIO, rings) from a hostile
//! guest driver's side.

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::virtio::{VirtioTarget, VIRTIO_BLOCK, VIRTIO_RNG};

#[test]
fn virtio_block_fuzz() {
    let mut t = VirtioTarget::block();
    run(&VIRTIO_BLOCK, |input| t.one(input));
}

/// Ignored in the suite until the bug it found is fixed: after some programs (iteration 97 of
/// seed 17640059797526111946 in one run, 7731 of seed 7683160233732383513 in another; timing
/// dependent, each input alone passes) a reset rng device no longer completes a valid request
/// within 20 s. Suspected: a reset does not wait for the device thread, which keeps serving the
/// old chains (some point into the rings) after the driver has set the queues up again. Run it
/// with `cargo test -p ferrovirt-fuzz --test virtio -- --ignored`.
#[test]
#[ignore]
fn virtio_rng_fuzz() {
    let mut t = VirtioTarget::rng();
    run(&VIRTIO_RNG, |input| t.one(input));
}
