#!/bin/sh
# ferrovmm snapshot save and restore against QEMU (issue 10). Prints medians, p95 and ratios.
# QEMU runs with -accel kvm when it can start that way here, else TCG (said in the output).
# Snapshots go to SNAPSHOT_DIR (default /dev/shm: the VMMs' work, not this shared disk's
# writeback, which moves a 64 MiB write between 0.1 and 1 s here); set it to a disk path to
# include the disk.
set -eu
cd "$(dirname "$0")/../.."
RUNS="${RUNS:-20}"
cargo build --release -q -p ferrovmm
cargo run --release -q -p ferrovmm --example snapshot_bench_guest -- target/snapshot-bench-guest.elf 64
# QEMU with a working -accel kvm keeps running (until timeout ends it, status 124);
# without KVM it exits at once with an error.
ACCEL=kvm
status=0
timeout 3 qemu-system-x86_64 -accel kvm -M microvm -nodefaults -display none -m 16 \
    -kernel target/snapshot-bench-guest.elf -S </dev/null >/dev/null 2>&1 || status=$?
if [ "$status" -ne 124 ]; then
    echo "QEMU cannot use KVM here: it runs with TCG"
    ACCEL=tcg
fi
exec python3 bench/snapshot/snapshot_bench.py --ferrovmm target/release/ferrovmm \
    --guest target/snapshot-bench-guest.elf --accel "$ACCEL" --runs "$RUNS" \
    --dir "${SNAPSHOT_DIR:-/dev/shm}"
