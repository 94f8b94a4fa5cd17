//! Linux on ferrovmm with virtio devices (in the nested KVM harness on this host,
//! directly where the host has vmx/svm): root on a virtio-blk ext4 disk, a qcow2
//! data disk checked by qemu-img, two NICs on TAPs with ping and TCP through
//! them, /dev/hwrng and hvc0.

use std::process::Command;
use std::time::Duration;

use ferrovirt_testkit::{
    guest_kernel, hardware_kvm, linux_guest_script, make_root_disk, scratch_dir, Nested,
};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
];

fn nested() -> Nested {
    Nested::new()
        .timeout(Duration::from_secs(400))
        .memory_mib(1024)
        .binary(env!("CARGO_BIN_EXE_ferrovmm"), "/bin/ferrovmm")
}

fn require_nested() {
    // On a host with vmx/svm these scenarios would run ferrovmm directly; the harness is
    // what this (PVM) host needs. Both paths run the same guest scripts.
    if hardware_kvm() {
        eprintln!("hardware KVM present: running the same scenario inside the harness anyway");
    }
}

#[test]
fn root_on_virtio_blk_ext4_keeps_a_synced_file_and_stays_clean() {
    require_nested();
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("virtio-root").unwrap();
    let init = dir.join("disk-init");
    std::fs::write(
        &init,
        "#!/bin/sh\nmount -t proc proc /proc\necho written-by-the-guest > /hello.txt\nsync\n\
         echo ROOT=$(grep ' / ' /proc/mounts | cut -d' ' -f1,3)\necho DISK-INIT-DONE\npoweroff -f\n",
    )
    .unwrap();
    let root = make_root_disk(&dir.join("root.img"), 64, Some(&init)).expect("root disk");
    let initrd = linux_guest_script(
        "mkdir -p /newroot\nmount -t ext4 /dev/vda /newroot\nexec switch_root /newroot /sbin/init",
    )
    .modules(MODULES)
    .build(dir.join("initrd.cpio.gz"))
    .unwrap();
    let out = nested()
        .binary("/usr/sbin/e2fsck", "/bin/e2fsck")
        .binary("/usr/sbin/debugfs", "/bin/debugfs")
        .file(&kernel.vmlinux, "/guest/kernel")
        .file(&initrd, "/guest/initrd")
        .file(&root, "/guest/root.img")
        .run(
            "ferrovmm --kernel /guest/kernel --initrd /guest/initrd --memory 256 \
             --disk path=/guest/root.img,serial=rootdisk --cmdline 'console=ttyS0 quiet panic=-1 no_timer_check' 2>&1\n\
             echo VMM-EXIT=$?\n\
             e2fsck -fn /guest/root.img >/dev/null 2>&1; echo FSCK=$?\n\
             echo FILE=$(debugfs -R 'cat /hello.txt' /guest/root.img 2>/dev/null)",
        )
        .expect("nested run");
    let o = &out.output;
    assert_eq!(out.status, 0, "{o}");
    assert!(
        o.contains("ROOT=/dev/vda ext4"),
        "root is not the virtio disk:\n{o}"
    );
    assert!(o.contains("DISK-INIT-DONE"), "{o}");
    assert!(o.contains("guest powered off"), "{o}");
    assert!(o.contains("VMM-EXIT=0"), "{o}");
    assert!(o.contains("FSCK=0"), "e2fsck -fn found problems:\n{o}");
    assert!(
        o.contains("FILE=written-by-the-guest"),
        "the synced file is not on the image:\n{o}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status_within(TOOL_TIMEOUT)
        .expect("qemu-img (qemu-utils)");
    assert!(st.success(), "qemu-img {args:?}");
}

#[test]
fn two_disks_two_nics_network_rng_and_hvc0_work() {
    require_nested();
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("virtio-devs").unwrap();
    let raw = dir.join("a.raw");
    std::fs::write(&raw, vec![0u8; 16 << 20]).unwrap();
    let qcow = dir.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "64M"]);
    let body = "\
        echo DISKS=$(ls /sys/block | grep vd | tr '\\n' ' ')\n\
        echo NICS=$(ls /sys/class/net | grep eth | tr '\\n' ' ')\n\
        echo SERIAL=$(cat /sys/block/vda/serial)\n\
        echo MAC=$(cat /sys/class/net/eth0/address)\n\
        ip link set eth0 up\n\
        ip addr add 10.0.2.15/24 dev eth0\n\
        ping -c 2 -W 5 10.0.2.1 >/dev/null && echo PING=ok\n\
        echo tcp-payload-4242 | nc -w 5 10.0.2.1 7777 && echo NC=sent\n\
        dd if=/dev/urandom of=/pattern bs=64k count=32 2>/dev/null\n\
        dd if=/pattern of=/dev/vdb bs=64k conv=fsync 2>/dev/null\n\
        echo WROTE=$(md5sum < /pattern | cut -d' ' -f1)\n\
        echo 3 > /proc/sys/vm/drop_caches\n\
        echo READ=$(dd if=/dev/vdb bs=64k count=32 2>/dev/null | md5sum | cut -d' ' -f1)\n\
        echo RNG=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)\n\
        echo hvc-hello > /dev/hvc0\n";
    let initrd = linux_guest_script(body)
        .modules(MODULES)
        .build(dir.join("initrd.cpio.gz"))
        .unwrap();
    let out = nested()
        .modules(&["tun"])
        .binary("/usr/bin/qemu-img", "/bin/qemu-img")
        .file(&kernel.vmlinux, "/guest/kernel")
        .file(&initrd, "/guest/initrd")
        .file(&raw, "/guest/a.raw")
        .file(&qcow, "/guest/b.qcow2")
        .run(
            "tunctl -t tap0 >/dev/null && ip link set tap0 up && ip addr add 10.0.2.1/24 dev tap0\n\
             tunctl -t tap1 >/dev/null && ip link set tap1 up\n\
             nc -l -p 7777 > /got.txt &\n\
             ferrovmm --kernel /guest/kernel --initrd /guest/initrd --memory 256 --rng \
               --disk path=/guest/a.raw,serial=disk-a --disk path=/guest/b.qcow2,format=qcow2 \
               --net tap=tap0,mac=52:54:00:aa:bb:01 --net tap=tap1 --console file=/hvc.log \
               --cmdline 'console=ttyS0 quiet panic=-1 no_timer_check' 2>&1\n\
             echo VMM-EXIT=$?\n\
             echo GOT=$(cat /got.txt)\n\
             echo HVC=$(cat /hvc.log)\n\
             qemu-img check -q /guest/b.qcow2 && echo QCOW2-CHECK=ok\n\
             qemu-img convert -O raw /guest/b.qcow2 /b.raw\n\
             echo IMAGE=$(dd if=/b.raw bs=64k count=32 2>/dev/null | md5sum | cut -d' ' -f1)",
        )
        .expect("nested run");
    let o = &out.output;
    assert!(!o.contains("warn"), "ferrovmm warned:\n{o}");
    assert_eq!(out.status, 0, "{o}");
    assert!(o.lines().any(|l| l == "DISKS=vda vdb"), "{o}");
    assert!(o.lines().any(|l| l == "NICS=eth0 eth1"), "{o}");
    assert!(o.contains("SERIAL=disk-a"), "{o}");
    assert!(o.contains("MAC=52:54:00:aa:bb:01"), "{o}");
    assert!(o.contains("PING=ok"), "no ping through the TAP:\n{o}");
    assert!(
        o.contains("GOT=tcp-payload-4242"),
        "TCP payload did not arrive on the host side:\n{o}"
    );
    assert!(o.contains("RNG=32"), "{o}");
    assert!(o.contains("HVC=hvc-hello"), "{o}");
    assert!(o.contains("QCOW2-CHECK=ok"), "{o}");
    let field = |name: &str| {
        o.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {name} in:\n{o}"))
    };
    let wrote = field("WROTE=");
    assert_eq!(field("READ="), wrote, "the guest read back other data");
    assert_eq!(
        field("IMAGE="),
        wrote,
        "the qcow2 image on the host holds other data"
    );
    assert!(o.contains("VMM-EXIT=0"), "{o}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Guest kicks reach the device through ioeventfds: thousands of disk requests cost no
/// more MMIO exits than driver setup does.
#[test]
fn queue_notifications_do_not_exit_to_userspace() {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("virtio-ioeventfd").unwrap();
    let raw = dir.join("d.raw");
    std::fs::write(&raw, vec![1u8; 4 << 20]).unwrap();
    // Reads with O_DIRECT (no page cache), one 512-byte request each.
    let body = "echo 3 > /proc/sys/vm/drop_caches\n\
                dd if=/dev/vda of=/dev/null bs=512 count=4000 iflag=direct 2>/dev/null && echo DD-DONE\n\
                echo IO-DONE\n\
                sleep 60";
    let initrd = linux_guest_script(body)
        .modules(MODULES)
        .build(dir.join("initrd.cpio.gz"))
        .unwrap();
    let out = nested()
        .binary("/usr/bin/curl", "/bin/curl")
        .file(&kernel.vmlinux, "/guest/kernel")
        .file(&initrd, "/guest/initrd")
        .file(&raw, "/guest/d.raw")
        .run(
            "ferrovmm --kernel /guest/kernel --initrd /guest/initrd --memory 256 --disk path=/guest/d.raw \
               --cmdline 'console=ttyS0 quiet panic=-1 no_timer_check' --serial file=/serial.log --api-socket /api.sock 2>/vmm.err &\n\
             i=0; until grep -q IO-DONE /serial.log 2>/dev/null; do i=$((i+1)); [ $i -gt 1800 ] && break; sleep 0.1; done\n\
             grep DD-DONE /serial.log\n\
             echo COUNTERS=$(curl -s --unix-socket /api.sock http://localhost/vm/counters)\n\
             curl -s -X PUT --unix-socket /api.sock http://localhost/vm/stop\n\
             wait",
        )
        .expect("nested run");
    let _ = std::fs::remove_dir_all(dir);
    let o = &out.output;
    assert!(o.contains("DD-DONE"), "{o}");
    let json = o
        .lines()
        .find_map(|l| l.strip_prefix("COUNTERS="))
        .unwrap_or_else(|| panic!("{o}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let mmio_writes = v["exits"]["mmio_write"].as_u64().unwrap();
    eprintln!("counters after 4000 requests: {json}");
    assert!(
        mmio_writes < 1000,
        "4000 requests caused {mmio_writes} MMIO write exits:\n{json}"
    );
}
