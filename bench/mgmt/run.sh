#!/bin/sh
# Management-plane benchmark: ferrovirtd vs libvirtd 9.0 (Debian's libvirt-daemon-system, virsh,
# python3-libvirt) on the same host and the same TCG guest, in the same run, the two sides
# alternating in every phase (bench.py says what is measured). Needs root, the release build.
#   bench/mgmt/run.sh                  # ROUNDS=3 LOAD_SECONDS=2.5 N_FAST=30 N_VM=10
#   NO_LIBVIRT=1 bench/mgmt/run.sh     # ferrovirt only
# Results: printed, and bench/mgmt/results.json.
#
# The host is left as found: when libvirt is not installed, this script installs it (services
# not started by apt), runs its own libvirtd and virtlogd, and at the end stops them and purges
# exactly the packages it installed (and the users, groups and folders they created). libvirtd
# starts no network (no bridge, dnsmasq, firewall rules or ip_forward change); ip_forward is
# restored anyway. The host's links, firewall ruleset, ip_forward and libvirt processes are
# compared before and after, and a difference is reported.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export CARGO_INCREMENTAL=0
cargo build --release -q -p ferrovirtd -p ferrovirt
WORK=$(mktemp -d /tmp/fvbench.XXXXXX)
chmod 755 "$WORK"
FV_PID=""; LV_PID=""; LOG_PID=""; POLICY_RC=""
PKG_DIRS="/etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /run/libvirt"
FORWARD_WAS=$(cat /proc/sys/net/ipv4/ip_forward)
LIBVIRT_PROCS='^(libvirtd|virtlogd|virtlockd|virtqemud|virtnetworkd)$'

# What must be the same after the run.
host_state() {
    echo "# links"; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort
    echo "# ip_forward $(cat /proc/sys/net/ipv4/ip_forward)"
    echo "# nft ruleset"; { command -v nft >/dev/null && nft list ruleset 2>/dev/null; } || true
    echo "# iptables"; { command -v iptables-save >/dev/null && iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9:]*\]//'; } || true
    echo "# libvirt processes"; ps -eo comm= | grep -E "$LIBVIRT_PROCS" | sort || true
    echo "# libvirt's dnsmasq"; ps -eo args= | grep '[d]nsmasq.*libvirt' || true
}
host_state >"$WORK/host-before"

# Waits (bounded) for a pid to be gone.
wait_gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 200 ]; do i=$((i+1)); sleep 0.05; done; }

install_libvirt() {
    PKGS="libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu python3-libvirt"
    # The packages apt would bring in (the dpkg lock then keeps anyone else from installing
    # in between): these, and only these, are purged at the end.
    # (An upgrade of a package the host had is not ours to purge: only packages new to the host.)
    dpkg-query -W -f='${db:Status-Status} ${Package}\n' | awk '$1 == "installed" {print $2}' | sort >"$WORK/pkgs-before"
    apt-get install -s --no-install-recommends $PKGS | sed -n 's/^Inst \([^ :]*\).*/\1/p' | sort |
        comm -23 - "$WORK/pkgs-before" >"$WORK/pkgs-new"
    getent passwd | cut -d: -f1 | sort >"$WORK/users-before"
    getent group | cut -d: -f1 | sort >"$WORK/groups-before"
    for d in $PKG_DIRS; do [ -e "$d" ] || echo "$d"; done >"$WORK/dirs-new"
    # No init system here to start services, and none should be started: deny invoke-rc.d.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC=1
    fi
    echo "run.sh: installing libvirt for the comparison: $(tr '\n' ' ' <"$WORK/pkgs-new")" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 $PKGS >"$WORK/apt-install.log" 2>&1 ||
        { cat "$WORK/apt-install.log" >&2; exit 1; }
    [ -n "$POLICY_RC" ] && rm -f /usr/sbin/policy-rc.d && POLICY_RC=""
    cp "$WORK/pkgs-new" "$WORK/pkgs-ours"
}

purge_libvirt() {
    [ -s "$WORK/pkgs-ours" ] || return 0
    if ps -eo comm= | grep -qE "$LIBVIRT_PROCS"; then
        echo "run.sh: another libvirt daemon is running now; packages left installed: $(tr '\n' ' ' <"$WORK/pkgs-ours")" >&2
        return 0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q -o DPkg::Lock::Timeout=300 \
        $(cat "$WORK/pkgs-ours") >"$WORK/apt-purge.log" 2>&1 || cat "$WORK/apt-purge.log" >&2
    getent passwd | cut -d: -f1 | sort | comm -13 "$WORK/users-before" - | while read -r u; do userdel "$u"; done
    getent group | cut -d: -f1 | sort | comm -13 "$WORK/groups-before" - | while read -r g; do groupdel "$g"; done
    while read -r d; do rm -rf "$d"; done <"$WORK/dirs-new"
    echo "run.sh: purged $(wc -l <"$WORK/pkgs-ours") packages this script had installed" >&2
}

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
    [ -n "$POLICY_RC" ] && rm -f /usr/sbin/policy-rc.d
    purge_libvirt
    echo "$FORWARD_WAS" > /proc/sys/net/ipv4/ip_forward
    host_state >"$WORK/host-after"
    if diff "$WORK/host-before" "$WORK/host-after" >"$WORK/host-diff"; then
        echo "run.sh: host state after the run: links, nft/iptables rules, ip_forward and libvirt processes as before" >&2
    else
        echo "run.sh: the host changed during the run (other users' links/rules count too):" >&2
        cat "$WORK/host-diff" >&2
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The guest: Debian's cloud kernel + a busybox initramfs, readable by libvirt's qemu user.
sh guest/make-test-guest.sh "$WORK/guest" >/dev/null
chmod 644 "$WORK/guest/"*

# No `default` network: the benchmark's guests need none, and the host keeps its bridges and sysctls.
FERROVIRT_NO_DEFAULT_NETWORK=1 target/release/ferrovirtd --state-dir "$WORK/fv-state" --run-dir "$WORK/fv-run" 2>"$WORK/ferrovirtd.log" &
FV_PID=$!
export FERROVIRT_SOCKET="$WORK/fv-run/ferrovirtd.sock"
i=0; while ! target/release/ferrovirt list >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && { cat "$WORK/ferrovirtd.log"; exit 1; }; sleep 0.05; done

PY=python3
if [ -z "${NO_LIBVIRT:-}" ]; then
    # Debian's python3-libvirt is for Debian's python.
    PY=/usr/bin/python3
    if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null || ! $PY -c 'import libvirt' 2>/dev/null; then
        install_libvirt
    fi
    if ps -eo comm= | grep -qE "$LIBVIRT_PROCS"; then
        echo "run.sh: a libvirt daemon is already running; stop it first (this script starts its own)" >&2; exit 1
    fi
    # No systemd here: start virtlogd and libvirtd by hand (in the foreground, so $! is theirs).
    # On a PVM host libvirtd re-probes QEMU's capabilities on every define and start (20-45 s
    # each time): /dev/kvm is usable, but QEMU's KVM probe fails, so the cached capabilities
    # never match. In libvirtd's namespace /dev/kvm is a file nobody may open (an openable
    # stand-in such as /dev/null has the same effect): libvirt probes TCG once and caches it.
    # Both stacks run the guest with TCG, so this is the fair setup.
    virtlogd >"$WORK/virtlogd.log" 2>&1 &
    LOG_PID=$!
    # libvirtd runs in a mount namespace of its own where its networks' autostart folder is empty:
    # it starts no `default` network (virbr0, firewall chains, ip_forward), as ours starts none.
    mkdir -p "$WORK/no-autostart"
    HIDE_KVM=""
    if [ -e /sys/module/kvm_pvm ] && [ -e /dev/kvm ]; then
        : >"$WORK/no-kvm"
        chmod 000 "$WORK/no-kvm"
        HIDE_KVM="mount --bind '$WORK/no-kvm' /dev/kvm &&"
    fi
    # libvirt's per-domain /dev (qemu.conf `namespaces`) cannot carry that stand-in over (it
    # fails the start): QEMU runs in libvirtd's namespace instead, a little less work for libvirt.
    cp /etc/libvirt/qemu.conf "$WORK/qemu.conf"
    echo 'namespaces = []' >>"$WORK/qemu.conf"
    unshare -m --propagation private sh -c "$HIDE_KVM
        mount --bind '$WORK/qemu.conf' /etc/libvirt/qemu.conf &&
        { [ ! -d /etc/libvirt/qemu/networks/autostart ] || mount --bind '$WORK/no-autostart' /etc/libvirt/qemu/networks/autostart; } &&
        exec libvirtd" >"$WORK/libvirtd.log" 2>&1 &
    LV_PID=$!
    i=0; while ! virsh -c qemu:///system version >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 600 ] && { cat "$WORK/libvirtd.log"; exit 1; }; sleep 0.05; done
    # libvirtd probes QEMU's capabilities at its first use: do it before anything is timed.
    virsh -c qemu:///system capabilities >/dev/null
fi

echo "run.sh: uptime at start: $(uptime)"
FV_CLI="$ROOT/target/release/ferrovirt" BENCH_WORK="$WORK" BENCH_OUT="$ROOT/bench/mgmt" \
GUEST_KERNEL="$WORK/guest/vmlinuz" GUEST_INITRD="$WORK/guest/initrd.img" \
FV_DAEMON_PID="$FV_PID" LV_DAEMON_PID="${LV_PID:-0}" $PY bench/mgmt/bench.py
echo "run.sh: uptime at end: $(uptime)"
