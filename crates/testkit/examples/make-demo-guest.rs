//! Builds the README demo's guest from Debian packages into a folder:
//!   vmlinuz      Debian's cloud kernel (downloaded with apt-get, not installed)
//!   initrd.img   busybox initramfs that loads virtio_pci + virtio_blk and switches to /dev/vda
//!   root.img     ext4 root disk (mke2fs -d) with busybox; its init greets, shows the machine,
//!                then powers off when the kernel command line has fv.poweroff, else runs a shell
//!
//! Usage: cargo run -p ferrovirt-testkit --example make-demo-guest -- DIR

use std::path::PathBuf;

use ferrovirt_testkit::{guest_kernel, linux_guest_script, make_root_disk};

const ROOT_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
hostname ferrovirt-demo
echo
echo "Hello from a ferrovirt VM: $(uname -sr), root on $(grep ' / ' /proc/mounts | cut -d' ' -f1)"
echo "CPUs: $(grep -c ^processor /proc/cpuinfo)  memory: $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
df -h / | tail -1
if [ -e /sys/class/net/eth0 ]; then
    # busybox udhcpc calls this script to apply the lease.
    printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/${mask:-24}" dev "$interface"; [ -n "$router" ] && ip route add default via "${router%%%% *}";; esac\nexit 0\n' > /etc/udhcpc.sh
    chmod +x /etc/udhcpc.sh
    ip link set lo up
    ip link set eth0 up
    if udhcpc -i eth0 -n -q -t 5 -s /etc/udhcpc.sh >/dev/null 2>&1; then
        echo "network: eth0 $(ip -4 -o addr show eth0 | awk '{print $4}') (DHCP from ferrovirtd's default network)"
    else
        echo "network: eth0 got no DHCP lease"
    fi
fi
case " $(cat /proc/cmdline) " in
    *" fv.poweroff "*) echo "demo done, powering off"; sync; poweroff -f ;;
esac
echo "busybox shell on the console; 'poweroff -f' ends the VM"
exec setsid cttyhack sh
"#;

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/demo-guest".into()),
    );
    if let Err(e) = run(&dir) {
        eprintln!("make-demo-guest: {e}");
        std::process::exit(1);
    }
}

fn run(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    eprintln!("make-demo-guest: kernel (Debian linux-image-cloud-amd64)...");
    let kernel = guest_kernel()?;
    std::fs::copy(&kernel.bzimage, dir.join("vmlinuz"))?;
    eprintln!("make-demo-guest: initramfs (busybox, virtio modules)...");
    linux_guest_script(
        "mkdir -p /newroot\n\
         mount -t ext4 /dev/vda /newroot || { echo 'no root disk on /dev/vda'; poweroff -f; }\n\
         exec switch_root /newroot /sbin/init",
    )
    .modules(&[
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "virtio-rng",
    ])
    .build(dir.join("initrd.img"))?;
    eprintln!("make-demo-guest: root disk (ext4, busybox)...");
    let init = dir.join("root-init");
    std::fs::write(&init, ROOT_INIT)?;
    make_root_disk(&dir.join("root.img"), 64, Some(&init))?;
    std::fs::remove_file(init)?;
    eprintln!("make-demo-guest: done: {}", dir.display());
    Ok(())
}
