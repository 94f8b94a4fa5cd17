//! Fuzzing virtio devices and the PCI transport (config space, BAR MMIO, rings) from a hostile
//! guest driver's side.

use ferrovirt_fuzz::run;
use ferrovirt_fuzz::targets::virtio::{VirtioTarget, VIRTIO_BLOCK, VIRTIO_RNG};

#[test]
fn virtio_block_fuzz() {
    let mut t = VirtioTarget::block();
    run(&VIRTIO_BLOCK, |input| t.one(input));
}

#[test]
fn virtio_rng_fuzz() {
    let mut t = VirtioTarget::rng();
    run(&VIRTIO_RNG, |input| t.one(input));
}
