#!/bin/sh
# The README's main job, from a fresh clone: install what the host needs, build
# everything, make a small Linux guest from Debian packages (kernel, busybox
# initramfs, ext4 root disk), start ferrovirtd, install and boot a VM with
# `ferrovirt install`, and show its console.
#
# On a terminal the console stays attached (Ctrl-] detaches, the VM keeps running);
# otherwise the guest prints its greeting and powers off, and the daemon is stopped.
set -eu
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEMO=${FERROVIRT_DEMO_DIR:-/tmp/ferrovirt-demo}

step() { printf '\n== %s\n' "$*"; }

step "host packages"
./scripts/setup-host.sh

step "build (cargo build --release)"
cargo build --release -q

step "guest from Debian packages (kernel, busybox initramfs, ext4 root disk)"
cargo run --release -q -p ferrovirt-testkit --example make-demo-guest -- "$REPO/target/demo-guest"

step "ferrovirtd (state in $DEMO)"
if [ -f "$DEMO/ferrovirtd.pid" ] && kill -0 "$(cat "$DEMO/ferrovirtd.pid")" 2>/dev/null; then
    # A previous demo's daemon, VM and network: stop them (the network before its state folder
    # goes, or its bridge would be an orphan), start clean.
    OLD=$(cat "$DEMO/ferrovirtd.pid")
    FERROVIRT_SOCKET="$DEMO/run/ferrovirtd.sock" target/release/ferrovirt destroy demo >/dev/null 2>&1 || true
    FERROVIRT_SOCKET="$DEMO/run/ferrovirtd.sock" target/release/ferrovirt net-destroy default >/dev/null 2>&1 || true
    kill "$OLD" 2>/dev/null || true
    i=0
    while kill -0 "$OLD" 2>/dev/null && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.05; done
fi
rm -rf "$DEMO"
mkdir -p "$DEMO"
cp "$REPO/target/demo-guest/root.img" "$DEMO/root.img"
target/release/ferrovirtd --state-dir "$DEMO/state" --run-dir "$DEMO/run" >"$DEMO/ferrovirtd.log" 2>&1 &
echo $! >"$DEMO/ferrovirtd.pid"
export FERROVIRT_SOCKET="$DEMO/run/ferrovirtd.sock"
i=0
until [ -S "$FERROVIRT_SOCKET" ]; do
    i=$((i + 1))
    [ $i -lt 100 ] || { echo "ferrovirtd did not start; see $DEMO/ferrovirtd.log" >&2; exit 1; }
    sleep 0.05
done
target/release/ferrovirt version
target/release/ferrovirt host-validate || true

ARGS="console=ttyS0 root=/dev/vda quiet no_timer_check"
if [ -t 0 ] && [ -t 1 ]; then
    INTERACTIVE=1
else
    INTERACTIVE=0
    ARGS="$ARGS fv.poweroff"
fi

# ferrovirtd defines and starts the `default` NAT network (fvbr0, 192.168.123.0/24) on its
# first start, unless that subnet is already in use here.
NET=none
if target/release/ferrovirt net-info default 2>/dev/null | grep -q '^Active: *yes'; then
    NET=default
else
    # Say why (a subnet in use, an orphaned bridge, a missing package) rather than go on quietly.
    echo "demo: the default network is not active; trying net-start default:" >&2
    if target/release/ferrovirt net-start default >&2; then
        NET=default
    else
        echo "demo: the VM runs without a network (see the error above)" >&2
    fi
fi

step "ferrovirt install --name demo ... --network $NET"
target/release/ferrovirt install --name demo --memory 256 --vcpus 2 --import \
    --disk "path=$DEMO/root.img,format=raw" --network "$NET" --graphics none \
    --boot "kernel=$REPO/target/demo-guest/vmlinuz,initrd=$REPO/target/demo-guest/initrd.img,kernel_args=$ARGS"

if [ "$INTERACTIVE" = 0 ]; then
    # The daemon sees QEMU go a moment after the console closes.
    i=0
    while [ "$(target/release/ferrovirt domstate demo 2>/dev/null)" = running ] && [ $i -lt 50 ]; do
        i=$((i + 1))
        sleep 0.1
    done
fi

step "ferrovirt list --all"
target/release/ferrovirt list --all
if [ "$INTERACTIVE" = 1 ]; then
    cat <<MSG

ferrovirtd keeps running (pid $(cat "$DEMO/ferrovirtd.pid")). Try:
  export FERROVIRT_SOCKET=$FERROVIRT_SOCKET
  target/release/ferrovirt console demo      # Ctrl-] detaches
  target/release/ferrovirt dominfo demo
  target/release/ferrovirt net-dhcp-leases default
  target/release/ferrovirt destroy demo; target/release/ferrovirt net-destroy default; kill $(cat "$DEMO/ferrovirtd.pid")
MSG
else
    # Leave the host as it was: take the demo's network down before stopping the daemon.
    target/release/ferrovirt net-destroy default >/dev/null 2>&1 || true
    kill "$(cat "$DEMO/ferrovirtd.pid")"
    echo "demo finished; network and daemon stopped (state kept in $DEMO)"
fi
