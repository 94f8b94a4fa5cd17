#!/bin/sh
# Management-plane benchmark: ferrovirtd vs libvirtd (Debian's libvirt-daemon-system + virsh)
# on the same TCG guest, in the same run. Needs root (libvirtd), python3, the release build.
#   bench/mgmt/run.sh            # N_FAST=30 N_VM=10 by default
#   NO_LIBVIRT=1 bench/mgmt/run.sh   # ferrovirt only
# Results: printed, and bench/mgmt/results.json.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
cargo build --release -q -p ferrovirtd -p ferrovirt
WORK=$(mktemp -d /tmp/fvbench.XXXXXX)
chmod 755 "$WORK"
FV_PID=""; LV_PID=""; LOG_PID=""
# The host is left as it was found: no VM, bridge, firewall table or sysctl change of ours.
FORWARD_WAS=$(cat /proc/sys/net/ipv4/ip_forward)
# Waits (bounded) for a pid to be gone.
wait_gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 200 ]; do i=$((i+1)); sleep 0.05; done; }
cleanup() {
    set +e
    if [ -n "$FV_PID" ]; then
        # ferrovirt's VMs outlive the daemon by design: destroy what is still running first.
        for d in $(target/release/ferrovirt --json list 2>/dev/null | python3 -c 'import json,sys; [print(d["name"]) for d in json.load(sys.stdin)]' 2>/dev/null); do
            target/release/ferrovirt destroy "$d" >/dev/null 2>&1
        done
        kill "$FV_PID" 2>/dev/null; wait_gone "$FV_PID"
    fi
    if [ -n "$LV_PID" ]; then
        for d in $(virsh -c qemu:///system list --name 2>/dev/null); do virsh -c qemu:///system destroy "$d" >/dev/null 2>&1; done
        kill "$LV_PID" 2>/dev/null; wait_gone "$LV_PID"
    fi
    [ -n "$LOG_PID" ] && { kill "$LOG_PID" 2>/dev/null; wait_gone "$LOG_PID"; }
    echo "$FORWARD_WAS" > /proc/sys/net/ipv4/ip_forward
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# The guest: Debian's cloud kernel + a busybox initramfs, readable by libvirt's qemu user.
sh guest/make-test-guest.sh "$WORK/guest" >/dev/null
chmod 644 "$WORK/guest/"*

# No `default` network: the benchmark's guests need none, and the host keeps its bridges and sysctls.
FERROVIRT_NO_DEFAULT_NETWORK=1 target/release/ferrovirtd --state-dir "$WORK/fv-state" --run-dir "$WORK/fv-run" 2>"$WORK/ferrovirtd.log" &
FV_PID=$!
export FERROVIRT_SOCKET="$WORK/fv-run/ferrovirtd.sock"
i=0; while ! target/release/ferrovirt list >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && { cat "$WORK/ferrovirtd.log"; exit 1; }; sleep 0.05; done

if [ -z "${NO_LIBVIRT:-}" ]; then
    command -v libvirtd >/dev/null || { echo "run.sh: libvirtd missing: apt-get install --no-install-recommends libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu (or NO_LIBVIRT=1)" >&2; exit 1; }
    if [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1; then
        echo "run.sh: a libvirtd is already running; stop it first (this script starts its own)" >&2; exit 1
    fi
    # No systemd here: start virtlogd and libvirtd by hand (in the foreground, so $! is theirs).
    # On a PVM host libvirtd re-probes QEMU's capabilities (kvm, then tcg) on every define,
    # 30-45 s each time, because its KVM probe does not stay valid; with /dev/kvm hidden it probes
    # TCG once and caches it. Both stacks run the guest with TCG, so this is the fair setup.
    virtlogd >"$WORK/virtlogd.log" 2>&1 &
    LOG_PID=$!
    # libvirtd runs in a mount namespace of its own where its networks' autostart folder is empty:
    # it starts no `default` network (virbr0, firewall chains, ip_forward), as ours starts none.
    mkdir -p "$WORK/no-autostart"
    HIDE_KVM=""
    [ -e /sys/module/kvm_pvm ] && HIDE_KVM="mount --bind /dev/null /dev/kvm &&"
    unshare -m --propagation private sh -c "$HIDE_KVM
        { [ ! -d /etc/libvirt/qemu/networks/autostart ] || mount --bind '$WORK/no-autostart' /etc/libvirt/qemu/networks/autostart; } &&
        exec libvirtd" >"$WORK/libvirtd.log" 2>&1 &
    LV_PID=$!
    i=0; while ! virsh -c qemu:///system version >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 200 ] && { cat "$WORK/libvirtd.log"; exit 1; }; sleep 0.05; done
fi

FV_CLI="$ROOT/target/release/ferrovirt" BENCH_WORK="$WORK" BENCH_OUT="$ROOT/bench/mgmt" \
GUEST_KERNEL="$WORK/guest/vmlinuz" GUEST_INITRD="$WORK/guest/initrd.img" \
FV_DAEMON_PID="$FV_PID" LV_DAEMON_PID="${LV_PID:-0}" python3 bench/mgmt/bench.py
