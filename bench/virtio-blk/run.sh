#!/bin/sh
# virtio-blk device path against direct file I/O (fio) on the same raw file, same run.
# Both use O_DIRECT and the same number of requests in flight. Prints medians of
# REPEAT runs and the ratio device/fio.
set -eu
cd "$(dirname "$0")/../.."
command -v fio >/dev/null || { echo "needs fio: apt-get install fio" >&2; exit 1; }
DIR="${BENCH_DIR:-target/bench-blk}"
SIZE_MIB="${SIZE_MIB:-1024}"
SECONDS_EACH="${SECONDS_EACH:-5}"
REPEAT="${REPEAT:-3}"
mkdir -p "$DIR"
FILE="$DIR/disk.raw"
[ -f "$FILE" ] && [ "$(stat -c %s "$FILE")" -eq $((SIZE_MIB << 20)) ] || \
    dd if=/dev/urandom of="$FILE" bs=1M count="$SIZE_MIB" status=none
cargo build --release -q -p ferrovmm --example blkbench
BIN=target/release/examples/blkbench
exec python3 bench/virtio-blk/compare.py "$BIN" "$FILE" "$SECONDS_EACH" "$REPEAT"
