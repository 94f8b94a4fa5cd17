//! Boots Debian's cloud kernel under plain QEMU TCG with initramfs images from the kit.

use std::time::{Duration, Instant};

use ferrovirt_testkit::{
    guest_kernel, linux_guest_initramfs, linux_guest_script, make_root_disk, scratch_dir,
    Initramfs, TcgVm,
};

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn linux_guest_initramfs_prints_its_marker_from_user_space() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("tcg-marker").unwrap();
    let initrd = linux_guest_initramfs("FERROVIRT-GUEST-UP 'quoted'")
        .build(dir.join("initrd.cpio.gz"))
        .expect("initramfs");

    let started = Instant::now();
    let console =
        ferrovirt_testkit::qemu_tcg_boot(&kernel.bzimage, &initrd, TIMEOUT).expect("boot");
    eprintln!(
        "TCG boot to user-space marker and power-off: {:?}",
        started.elapsed()
    );

    assert!(
        console
            .lines()
            .any(|line| line == "FERROVIRT-GUEST-UP 'quoted'"),
        "marker line missing from console:\n{console}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn virtio_modules_load_and_drive_a_root_disk() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("tcg-virtio").unwrap();
    let disk = make_root_disk(&dir.join("root.img"), 16, None).expect("root disk");
    let initrd = linux_guest_script(
        "echo drivers: $(ls /sys/bus/virtio/drivers)\n\
         mount -t ext4 -o ro /dev/vda /mnt && echo root-init: $(head -c 9 /mnt/sbin/init)",
    )
    .modules(&[
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "virtio-rng",
    ])
    .build(dir.join("initrd.cpio.gz"))
    .expect("initramfs");

    let run = TcgVm::new(&kernel.bzimage)
        .initrd(&initrd)
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .timeout(TIMEOUT)
        .run(&[])
        .expect("boot");

    let drivers = run
        .console
        .lines()
        .find_map(|l| l.strip_prefix("drivers: "))
        .unwrap_or_else(|| panic!("no driver list on console:\n{}", run.console));
    for driver in ["virtio_blk", "virtio_net", "virtio_console", "virtio_rng"] {
        assert!(
            drivers.split(' ').any(|d| d == driver),
            "{driver} not registered: {drivers}"
        );
    }
    assert!(
        run.console.lines().any(|l| l == "root-init: #!/bin/sh"),
        "root disk not readable through virtio-blk:\n{}",
        run.console
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_guest_that_never_powers_off_times_out_with_its_console() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("tcg-timeout").unwrap();
    let initrd = Initramfs::new()
        .init_script("#!/bin/sh\necho still-running\nwhile :; do sleep 1; done\n")
        .build(dir.join("initrd.cpio.gz"))
        .expect("initramfs");

    let err = TcgVm::new(&kernel.bzimage)
        .initrd(&initrd)
        .timeout(Duration::from_secs(600))
        .timeout_after("still-running", Duration::from_secs(3))
        .run(&[])
        .expect_err("a guest that never exits must time out");
    assert!(err.message().contains("timed out"), "{err}");
    assert!(
        err.message().contains("still-running"),
        "console missing from error: {err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn qemu_errors_and_missing_files_are_reported() {
    let kernel = guest_kernel().expect("guest kernel");
    let err = TcgVm::new(&kernel.bzimage)
        .arg("-device")
        .arg("no-such-device")
        .run(&[])
        .expect_err("QEMU must refuse an unknown device");
    assert!(err.message().contains("QEMU failed"), "{err}");
    assert!(
        err.message().contains("no-such-device"),
        "QEMU's own message missing: {err}"
    );

    let err = TcgVm::new("/nonexistent/bzImage").run(&[]).unwrap_err();
    assert!(
        err.message()
            .contains("kernel /nonexistent/bzImage does not exist"),
        "{err}"
    );
}
