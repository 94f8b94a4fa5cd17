#!/bin/bash
# Network benchmark: ferrovirtd's default network beside libvirt's, same guest, same run.
#   1. net-start + net-destroy latency (one CLI process per verb, like a sysadmin types them)
#   2. guest-to-host TCP throughput through the TAP: a TCG guest (qemu driver / libvirt's qemu)
#      gets a DHCP lease and sends SEND_MIB MiB with busybox nc to a server on the host side.
# Everything runs inside a network namespace this script creates (the host's networking is not
# touched); libvirtd also gets a private mount namespace (its own /etc/libvirt copy, /run/libvirt,
# /var/lib/libvirt), so nothing of the run is left on the host.
#   bench/net/run.sh                   # N=20 cycles, RUNS=3 transfers of SEND_MIB=32 each
#   NO_LIBVIRT=1 bench/net/run.sh      # ferrovirt only
# Needs root, python3, nftables, dnsmasq-base, qemu-system-x86, busybox-static,
# and for the comparison libvirt-daemon-system + libvirt-clients (iptables, as libvirt uses it).
# Results: printed, and bench/net/results.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
N=${N:-20}
RUNS=${RUNS:-3}
SEND_MIB=${SEND_MIB:-32}
NS=fvnetbench-$$
WORK=$(mktemp -d /tmp/fvnb.XXXXXX)
chmod 755 "$WORK"
FV_PID=""; LV_PID=""; SRV_PID=""
cleanup() {
    set +e
    [ -n "$FV_PID" ] && target/release/ferrovirt -c "$WORK/fv-run/ferrovirtd.sock" destroy nbvm >/dev/null 2>&1
    [ -n "$LV_PID" ] && lv destroy nbvm >/dev/null 2>&1 && lv undefine nbvm >/dev/null 2>&1
    [ -n "$FV_PID" ] && kill "$FV_PID" 2>/dev/null
    [ -n "$LV_PID" ] && kill "$LV_PID" 2>/dev/null
    [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null
    sleep 0.5
    # Whatever still runs in the namespace (dnsmasq, virtlogd, qemu) is ours.
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cargo build --release -q -p ferrovirtd -p ferrovirt
FV="$ROOT/target/release/ferrovirt"

# --- the guest: Debian's cloud kernel, busybox, virtio-net modules, an init that sends data ---
eval "$(bash guest/fetch-kernel.sh | grep -E '^(bzimage|modules_dir)=')"
G="$WORK/guest"; mkdir -p "$G/bin" "$G/proc" "$G/sys" "$G/dev" "$G/tmp" "$G/etc" "$G/lib/modules"
cp "$(command -v busybox)" "$G/bin/busybox"
MODS="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
      drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/core/failover
      drivers/net/net_failover drivers/net/virtio_net"
for m in $MODS; do cp "$modules_dir/kernel/$m.ko" "$G/lib/modules/"; done
cat > "$G/etc/udhcpc.script" <<'S'
#!/bin/sh
case "$1" in bound|renew)
  ip addr add "$ip/$mask" dev "$interface"
  echo "${router%% *}" > /tmp/router
  ip route add default via "${router%% *}" ;;
esac
exit 0
S
cat > "$G/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(for m in $MODS; do printf '%s ' "${m##*/}"; done); do insmod /lib/modules/\$m.ko; done
ip link set lo up; ip link set eth0 up
udhcpc -i eth0 -s /etc/udhcpc.script -q -t 30 -T 1 >/dev/null 2>&1 || echo BENCH-NO-DHCP
echo "BENCH-LEASE \$(cat /tmp/router)"
dd if=/dev/zero bs=65536 count=$((SEND_MIB * 16)) 2>/dev/null | nc \$(cat /tmp/router) 5001
echo BENCH-SENT
poweroff -f
INIT
chmod 755 "$G/init" "$G/etc/udhcpc.script"
(cd "$G" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.img"
cp "$bzimage" "$WORK/vmlinuz"
chmod 644 "$WORK/initrd.img" "$WORK/vmlinuz"

# --- the namespace and the byte-counting server (one line per connection: bytes seconds) ---
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" python3 -u -c '
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(4)
while True:
    c, a = s.accept(); n = 0; t0 = None
    while True:
        b = c.recv(1 << 20)
        if not b: break
        if t0 is None: t0 = time.monotonic()
        n += len(b)
    print(n, time.monotonic() - (t0 or time.monotonic()), flush=True); c.close()
' > "$WORK/server.out" 2>&1 &
SRV_PID=$!

ip netns exec "$NS" "$ROOT/target/release/ferrovirtd" --state-dir "$WORK/fv-state" --run-dir "$WORK/fv-run" \
    >"$WORK/ferrovirtd.log" 2>&1 &
FV_PID=$!
fv() { "$FV" -c "$WORK/fv-run/ferrovirtd.sock" "$@"; }
i=0; until fv net-list 2>/dev/null | grep -q default; do i=$((i+1)); [ $i -gt 200 ] && { cat "$WORK/ferrovirtd.log"; exit 1; }; sleep 0.05; done

LV_SOCK="$WORK/lv-sock/libvirt-sock"
lv() { virsh -q -c "qemu:///system?socket=$LV_SOCK" "$@"; }
if [ -z "${NO_LIBVIRT:-}" ]; then
    command -v libvirtd >/dev/null || { echo "run.sh: libvirtd missing (apt-get install libvirt-daemon-system libvirt-clients), or NO_LIBVIRT=1" >&2; exit 1; }
    mkdir -p "$WORK/lv-sock"
    printf 'unix_sock_dir = "%s"\n' "$WORK/lv-sock" > "$WORK/libvirtd.conf"
    # Private /run/libvirt, /var/lib/libvirt, /var/cache/libvirt: no clash with another libvirtd.
    # /dev/kvm is hidden (PVM hosts: libvirt would re-probe KVM for 30-45 s; both stacks use TCG).
    ip netns exec "$NS" unshare -m --propagation private bash -c '
        # A private copy of /etc/libvirt too: the domain this script defines stays in the run.
        cp -a /etc/libvirt "$2/etc-libvirt" && mount --bind "$2/etc-libvirt" /etc/libvirt
        for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
            mkdir -p $d; mount -t tmpfs tmpfs $d; done
        mkdir -p /var/lib/libvirt/dnsmasq /var/lib/libvirt/qemu /var/log/libvirt/qemu
        chown libvirt-qemu:kvm /var/lib/libvirt/qemu 2>/dev/null || true
        [ -e /dev/kvm ] && mount --bind /dev/null /dev/kvm
        virtlogd -d -p /run/libvirt/virtlogd.pid
        exec libvirtd -p /run/libvirt/libvirtd.pid -f "$1"' _ "$WORK/libvirtd.conf" "$WORK" >"$WORK/libvirtd.log" 2>&1 &
    LV_PID=$!
    i=0; until lv version >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 400 ] && { cat "$WORK/libvirtd.log"; exit 1; }; sleep 0.05; done
    lv net-info default >/dev/null 2>&1 || lv net-define /etc/libvirt/qemu/networks/default.xml >/dev/null
fi

now() { date +%s%N; }
# Latency: N cycles of start + destroy, medians of each verb and of the cycle.
latency() { # $1 = fv|lv
    local tool=$1 out="$WORK/lat-$1"; : > "$out"
    $tool net-destroy default >/dev/null 2>&1 || true
    for _ in $(seq "$N"); do
        local a b c
        a=$(now); $tool net-start default >/dev/null; b=$(now)
        $tool net-destroy default >/dev/null; c=$(now)
        echo "$(( (b - a) / 1000 )) $(( (c - b) / 1000 ))" >> "$out"
    done
    $tool net-start default >/dev/null
}
latency fv
[ -n "$LV_PID" ] && latency lv

# Throughput: the same guest, RUNS times per stack.
fv_def="$WORK/nbvm.toml"
cat > "$fv_def" <<T
name = "nbvm"
type = "qemu"
accel = "tcg"
memory_mib = 256
[os]
kernel = "$WORK/vmlinuz"
initrd = "$WORK/initrd.img"
cmdline = "console=ttyS0 quiet"
[[interface]]
type = "network"
source = "default"
T
cat > "$WORK/nbvm.xml" <<X
<domain type='qemu'>
  <name>nbvm</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>$WORK/vmlinuz</kernel><initrd>$WORK/initrd.img</initrd>
      <cmdline>console=ttyS0 quiet</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <devices>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <serial type='file'><source path='$WORK/lv-console.log'/></serial>
  </devices>
</domain>
X
fv define "$fv_def" >/dev/null
[ -n "$LV_PID" ] && lv define "$WORK/nbvm.xml" >/dev/null
transfer() { # $1 = fv|lv; appends "bytes seconds" to $WORK/tp-$1
    local tool=$1 before
    before=$(wc -l < "$WORK/server.out")
    $tool start nbvm >/dev/null
    local i=0
    until [ "$(wc -l < "$WORK/server.out")" -gt "$before" ]; do
        i=$((i+1)); [ $i -gt 1200 ] && { echo "no transfer from the $tool guest" >&2; exit 1; }; sleep 0.1
    done
    tail -n1 "$WORK/server.out" >> "$WORK/tp-$tool"
    $tool destroy nbvm >/dev/null 2>&1 || true
    sleep 0.5
}
: > "$WORK/tp-fv"; : > "$WORK/tp-lv"
for _ in $(seq "$RUNS"); do
    transfer fv
    [ -n "$LV_PID" ] && transfer lv
done

python3 - "$WORK" "$N" "$SEND_MIB" "${LV_PID:+yes}" "$ROOT/bench/net/results.json" <<'PY'
import json, statistics, sys, subprocess
work, n, mib, libvirt, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "yes", sys.argv[5]
def lat(tool):
    rows = [list(map(int, l.split())) for l in open(f"{work}/lat-{tool}") if l.strip()]
    st = [r[0] / 1000 for r in rows]; de = [r[1] / 1000 for r in rows]
    return {"net_start_ms": round(statistics.median(st), 1), "net_destroy_ms": round(statistics.median(de), 1),
            "cycle_ms": round(statistics.median([a + b for a, b in zip(st, de)]), 1), "cycles": len(rows)}
def tp(tool):
    rows = [list(map(float, l.split())) for l in open(f"{work}/tp-{tool}") if l.strip()]
    mbit = [b * 8 / s / 1e6 for b, s in rows if s > 0]
    return {"mbit_s_median": round(statistics.median(mbit), 1), "runs": [round(x, 1) for x in mbit],
            "bytes": int(rows[0][0]) if rows else 0}
res = {"ferrovirt": {**lat("fv"), **tp("fv")}, "send_mib": mib,
       "host": subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()}
if libvirt:
    res["libvirt"] = {**lat("lv"), **tp("lv")}
json.dump(res, open(out, "w"), indent=2)
print(f"{'':24}{'ferrovirt':>12}{'libvirt':>12}")
for k, label in [("net_start_ms", "net-start ms"), ("net_destroy_ms", "net-destroy ms"), ("cycle_ms", "start+destroy ms"),
                 ("mbit_s_median", "guest->host Mbit/s")]:
    print(f"{label:24}{res['ferrovirt'][k]:>12}{res.get('libvirt', {}).get(k, '-'):>12}")
print(f"(medians; {n} cycles, {len(res['ferrovirt']['runs'])} transfers of {mib} MiB; TCG guest, virtio-net on a TAP)")
PY
