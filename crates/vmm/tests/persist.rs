//! Device state through the `Persist` trait on the virtio transport: a device
//! saved mid-conversation and loaded into a freshly built one carries on.

mod common;

use std::time::Duration;

use common::vdriver::Driver;
use ferrovmm::persist::Persist;
use ferrovmm::virtio::rng::Rng;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn virtio_state_round_trips_and_the_restored_device_continues_the_ring() {
    let mut d = Driver::new(Box::new(Rng::default()), 4);
    d.init(None, 16);
    for i in 0..3u64 {
        d.post(0, &[(0x10_0000 + i * 0x1000, 64, true)]);
    }
    d.kick(0);
    assert_eq!(d.wait_used(0, 3, WAIT).len(), 3);

    let saved = serde_json::to_value(d.dev.save()).unwrap();
    assert_eq!(saved["activated"], true);
    assert_eq!(saved["queues"][0]["next_used"], 3);

    d.rebuild(Box::new(Rng::default()));
    d.dev
        .restore(serde_json::from_value(saved.clone()).unwrap())
        .unwrap();
    assert_eq!(serde_json::to_value(d.dev.save()).unwrap(), saved);

    // The restored device is running on the same ring: the next buffer is used
    // as entry 4, not entry 1.
    d.post(0, &[(0x20_0000, 32, true)]);
    d.kick(0);
    let used = d.wait_used(0, 1, WAIT);
    assert_eq!(used.len(), 1);
    assert_eq!(d.used_idx(0), 4);
}

#[test]
fn a_state_from_another_kind_of_device_is_refused_and_changes_nothing() {
    let mut d = Driver::new(Box::new(Rng::default()), 4);
    d.init(None, 16);
    let mut state = d.dev.save();
    state.device_type = 2;
    d.rebuild(Box::new(Rng::default()));
    let before = serde_json::to_value(d.dev.save()).unwrap();
    let err = d.dev.restore(state).unwrap_err();
    assert!(err.contains("device type"), "{err}");
    assert_eq!(serde_json::to_value(d.dev.save()).unwrap(), before);
}
