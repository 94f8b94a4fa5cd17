//! A Linux guest boots under KVM inside the nested host. QEMU (microvm, -accel kvm) stands in
//! for ferrovmm here, so the harness is proven independently of the VMM under test.

use std::time::Duration;

use ferrovirt_testkit::{guest_kernel, linux_guest_initramfs, scratch_dir, Nested};

#[test]
fn linux_boots_under_kvm_inside_the_nested_host() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("nested-linux").unwrap();
    let initrd = linux_guest_initramfs("INNER-LINUX-UP")
        .build(dir.join("inner.cpio.gz"))
        .expect("inner initramfs");

    let out = Nested::new()
        .timeout(Duration::from_secs(300))
        .binary("/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-x86_64")
        .file("/usr/share/qemu/bios-microvm.bin", "/usr/share/qemu/bios-microvm.bin")
        .file("/usr/share/qemu/pvh.bin", "/usr/share/qemu/pvh.bin")
        .file(&kernel.vmlinux, "/guest/vmlinux")
        .file(&initrd, "/guest/initrd")
        .run(
            "time qemu-system-x86_64 -accel kvm -M microvm -cpu host -m 128 -nodefaults -no-user-config \
             -display none -no-reboot -serial stdio -kernel /guest/vmlinux -initrd /guest/initrd \
             -append 'console=ttyS0 panic=-1 quiet no_timer_check'",
        )
        .expect("nested run");
    eprintln!(
        "outer init {:?}, payload start {:?}, total {:?}\n{}",
        out.time_to_init, out.time_to_payload, out.total, out.output
    );
    assert_eq!(out.status, 0, "output:\n{}", out.output);
    assert!(
        out.output.lines().any(|l| l == "INNER-LINUX-UP"),
        "console:\n{}",
        out.console
    );
    std::fs::remove_dir_all(dir).unwrap();
}
