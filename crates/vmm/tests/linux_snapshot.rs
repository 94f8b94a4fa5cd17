//! Snapshot, restore and live migration of a real Linux guest (in the nested KVM harness on
//! this host): the guest counts on its serial console and writes each count to an ext4
//! virtio-blk disk, with its NIC on a bridge in the KVM host. One outer boot per test:
//! boot, snapshot, restore into a new process (the bridge learns the MAC from the restored
//! VM's announcement), [live migration to a third process on another TAP over a Unix
//! socket,] then ping, a clean shutdown and e2fsck of the disk.

use std::process::Command;
use std::time::Duration;

use ferrovirt_testkit::{guest_kernel, linux_guest_script, scratch_dir, Nested};
use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

const MAC: &str = "52:54:00:aa:bb:01";

/// The guest: its NIC at 10.0.2.15, its disk at /mnt; counts until a TCP connection on
/// port 7777 says stop, then unmounts the disk (so e2fsck must find it clean).
const GUEST: &str = "\
ip link set eth0 up\n\
ip addr add 10.0.2.15/24 dev eth0\n\
mkdir -p /mnt\n\
mount -t ext4 /dev/vda /mnt || echo MOUNT-FAILED\n\
nc -l -p 7777 > /stop &\n\
i=0\n\
while [ ! -s /stop ]; do\n\
  i=$((i+1))\n\
  echo $i > /mnt/count.new && mv /mnt/count.new /mnt/count\n\
  dd if=/dev/urandom of=/mnt/blob bs=4k count=16 conv=fsync 2>/dev/null\n\
  echo COUNT $i\n\
  sleep 0.2\n\
done\n\
umount /mnt && echo GUEST-UMOUNT-OK\n";

/// The KVM host's side. Every wait has a deadline; a failed step says which.
const BOOT_SNAPSHOT_RESTORE: &str = r#"
brctl addbr br0 || exit 1
ip addr add 10.0.2.1/24 dev br0 && ip link set br0 up || exit 1
for t in tap0 tap1; do tunctl -t $t >/dev/null && ip link set $t up && brctl addif br0 $t; done
api() { curl -s --max-time 600 --unix-socket "$1" -X PUT ${3:+-d "$3"} "http://localhost$2"; }
step() { echo "$*" >>/steps; echo "STEP $(cut -d' ' -f1 /proc/uptime) $*"; }
fail() {
  echo "FAILED at: $(tail -n 1 /steps)"
  for f in /a.err /b.err /c.err; do echo "== $f"; cat $f 2>/dev/null; done
  echo "== serial"; tail -n 30 /serial.log; exit 1
}
now() { cut -d. -f1 /proc/uptime; }
waitfor() { end=$(( $(now) + ${2:-300} )); until eval "$1"; do [ $(now) -gt $end ] && { echo "TIMEOUT: $1"; return 1; }; sleep 0.1; done; }
last() { grep '^COUNT ' /serial.log | tail -n 1 | cut -d' ' -f2; }
reached() { [ "$(last)" -ge "$1" ] 2>/dev/null; }
mac_on() { bridge fdb show dev "$1" 2>/dev/null | grep -q "^MAC "; }
gone() { [ ! -e /proc/$1 ] || grep -q '^State:.*Z' /proc/$1/status 2>/dev/null; }
forwarding() { bridge link show dev "$1" 2>/dev/null | grep -q 'state forwarding'; }

ferrovmm --kernel /guest/kernel --initrd /guest/initrd --memory 128 --disk path=/guest/data.img \
  --net tap=tap0,mac=MAC --serial file=/serial.log --api-socket /a.sock \
  --cmdline 'console=ttyS0 quiet panic=-1 no_timer_check' 2>/a.err &
A=$!
step booting
waitfor 'reached 3' || fail
step counting
ping -c 1 -W 30 10.0.2.15 >/dev/null && echo PING-BOOTED=ok
api /a.sock /vm/pause
echo SNAPSHOT=$(api /a.sock /vm/snapshot '{"path":"/snap"}')
echo AT-SNAPSHOT=$(last)
api /a.sock /vm/stop
waitfor "gone $A" 60 || fail; wait $A; echo A-EXIT=$?

# Restore into a new process on the same TAP; its first resume announces the MAC (the
# bridge forgot it when tap0 lost its carrier, and the restored guest sends nothing).
# It is resumed once the bridge forwards on tap0 again (the port follows the carrier).
mac_on tap0 && echo STALE-ENTRY-ON-TAP0
ferrovmm --restore /snap --api-socket /b.sock --serial file=/serial.log 2>/b.err &
B=$!
step restoring
waitfor '[ -S /b.sock ] && forwarding tap0' || fail
api /b.sock /vm/resume
waitfor 'mac_on tap0' 30 && echo ANNOUNCED-AFTER-RESTORE=tap0
N=$(( $(last) + 3 )); waitfor "reached $N" || fail
echo RESTORED-COUNTS-TO=$(last)

"#;

/// Live migration of the restored VM (process B) to a third process (C) on tap1.
const MIGRATE: &str = r#"
# Live migration to a third process on tap1 over a Unix socket.
ferrovmm --incoming unix:/mig.sock --api-socket /c.sock --serial file=/serial.log --net 0=tap=tap1 2>/c.err &
C=$!
waitfor '[ -S /mig.sock ]' || fail
step migrating
echo MIGRATE=$(api /b.sock /vm/migrate '{"destination":"unix:/mig.sock","downtime_ms":300,"timeout_s":240}')
waitfor "gone $B" 300 || fail; wait $B; echo B-EXIT=$?
grep -q 'guest migrated' /b.err && echo SOURCE-SAYS-MIGRATED
waitfor 'mac_on tap1' 30 && echo ANNOUNCED-AFTER-MIGRATION=tap1
N=$(( $(last) + 3 )); waitfor "reached $N" || fail
echo MIGRATED-COUNTS-TO=$(last)
step migrated
LAST=$C
"#;

/// The guest answers ping, stops on a TCP message and unmounts; the disk is checked.
const FINISH: &str = r#"
ping -c 3 -W 30 10.0.2.15 >/dev/null && echo PING-AFTER=ok
echo stop | nc -w 30 10.0.2.15 7777 && echo STOP-SENT
waitfor "gone $LAST" 120 || fail; wait $LAST; echo LAST-EXIT=$?
e2fsck -fn /guest/data.img >/fsck.log 2>&1; echo FSCK=$?
echo DISK-COUNT=$(debugfs -R 'cat /count' /guest/data.img 2>/dev/null)
echo ERR-A; cat /a.err; echo ERR-B; cat /b.err; echo ERR-C; cat /c.err; echo FSCK-LOG; cat /fsck.log
echo SERIAL-BEGIN; cat /serial.log; echo SERIAL-END
"#;

fn field<'a>(o: &'a str, name: &str) -> &'a str {
    o.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in:\n{o}"))
}

fn run(payload: &str, migrate: bool) {
    let kernel = guest_kernel().expect("guest kernel");
    let dir = scratch_dir("linux-snapshot").unwrap();
    let data = dir.join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", data.to_str().unwrap()])
        .status_within(TOOL_TIMEOUT)
        .expect("mke2fs (e2fsprogs)");
    assert!(st.success());
    let initrd = linux_guest_script(GUEST)
        .modules(&["virtio_pci", "virtio_blk", "virtio_net"])
        .build(dir.join("initrd.cpio.gz"))
        .unwrap();
    let out = Nested::new()
        .timeout(Duration::from_secs(1200))
        .memory_mib(1536)
        .modules(&["tun", "bridge"])
        .binary(env!("CARGO_BIN_EXE_ferrovmm"), "/bin/ferrovmm")
        .binary("/usr/bin/curl", "/bin/curl")
        .binary("/usr/sbin/e2fsck", "/bin/e2fsck")
        .binary("/usr/sbin/debugfs", "/bin/debugfs")
        .binary("/usr/sbin/bridge", "/bin/bridge")
        .file(&kernel.vmlinux, "/guest/kernel")
        .file(&initrd, "/guest/initrd")
        .file(&data, "/guest/data.img")
        .run(&payload.replace("MAC", MAC))
        .expect("nested run");
    let _ = std::fs::remove_dir_all(&dir);
    let o = &out.output;
    eprintln!("{o}");
    assert_eq!(out.status, 0, "{o}");
    assert!(o.contains("PING-BOOTED=ok"), "{o}");
    assert!(field(o, "SNAPSHOT=").contains("\"bytes_written\""), "{o}");
    assert!(o.contains("A-EXIT=0"), "{o}");
    if !o.contains("STALE-ENTRY-ON-TAP0") {
        assert!(
            o.contains("ANNOUNCED-AFTER-RESTORE=tap0"),
            "the bridge did not learn the MAC after the restore:\n{o}"
        );
    }
    assert!(
        field(o, "RESTORED-COUNTS-TO=").parse::<u32>().unwrap() > 5,
        "{o}"
    );
    if migrate {
        assert!(
            o.contains("B-EXIT=0") && o.contains("SOURCE-SAYS-MIGRATED"),
            "{o}"
        );
        assert!(
            o.contains("ANNOUNCED-AFTER-MIGRATION=tap1"),
            "the bridge did not learn the MAC on the destination's TAP:\n{o}"
        );
        let migrated: u32 = field(o, "MIGRATED-COUNTS-TO=").parse().unwrap();
        let at_snapshot: u32 = field(o, "AT-SNAPSHOT=").parse().unwrap();
        assert!(migrated > at_snapshot + 3, "{o}");
    }
    assert!(o.contains("PING-AFTER=ok"), "no ping at the end:\n{o}");
    assert!(
        o.contains("STOP-SENT") && o.contains("GUEST-UMOUNT-OK"),
        "{o}"
    );
    assert!(o.contains("LAST-EXIT=0"), "{o}");
    assert_eq!(field(o, "FSCK="), "0", "e2fsck -fn found problems:\n{o}");

    // One unbroken count across the processes: nothing lost, nothing repeated.
    let serial = &o[o.find("SERIAL-BEGIN").unwrap()..];
    let counts: Vec<u32> = serial
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("COUNT "))
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("garbled count {n:?}:\n{o}"))
        })
        .collect();
    let expected: Vec<u32> = (1..=counts.len() as u32).collect();
    assert_eq!(counts, expected, "the count broke:\n{o}");
    // The disk holds the last count the guest printed.
    assert_eq!(
        field(o, "DISK-COUNT="),
        counts.last().unwrap().to_string(),
        "{o}"
    );
}

#[test]
fn linux_with_disk_and_network_survives_snapshot_and_restore() {
    run(&format!("{BOOT_SNAPSHOT_RESTORE}LAST=$B\n{FINISH}"), false);
}

/// Known defect: between two processes on one host the destination cannot open the disk
/// while the source holds its image lock ("image is in use"), so the migration is refused
/// and the guest stays on the source. Needs a lock hand-over (the destination opens the
/// image without locks and takes them at GO, the source lets go of them before GO and
/// takes them back if the migration fails), as QEMU does.
#[test]
#[ignore = "live migration on one host: the destination cannot open the locked disk image"]
fn linux_with_disk_and_network_survives_snapshot_restore_and_live_migration() {
    run(&format!("{BOOT_SNAPSHOT_RESTORE}{MIGRATE}{FINISH}"), true);
}
