#!/bin/sh
# ferrovmm boot benchmark against QEMU microvm (issue: VMM core). Prints medians and ratios.
set -eu
cd "$(dirname "$0")/../.."
command -v /usr/bin/time >/dev/null || { echo "needs GNU time: apt-get install time" >&2; exit 1; }
RUNS="${RUNS:-20}"
cargo build --release -q -p ferrovmm
cargo run --release -q -p ferrovmm --example bench_guest -- target/bench-guest.elf
exec python3 bench/vmm/boot_bench.py --ferrovmm target/release/ferrovmm --guest target/bench-guest.elf --runs "$RUNS"
