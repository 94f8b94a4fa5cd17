#!/usr/bin/env bash
# Compares `ferrovirt img bench` (crates/disk/src/ops/bench.rs) with `qemu-img bench`
# on the same qcow2 images in the same run: 4 KiB strided ("random") reads and writes
# and 64 KiB sequential writes, on fresh and fully allocated images, with and without
# a backing file. Both tools get the same options (-c -d -s -S -w, cache=writeback).
# qemu-img bench has no random mode: request i goes to (i * step) mod size, so the
# 4 KiB cases use a step of 1 MiB + 4 KiB to scatter requests over the image.
#
# Usage: bench/disk/run.sh [reps]      (env: BENCH_DIR, IMG_SIZE, DEPTH, CACHE=writeback|none)
set -euo pipefail

REPS=${1:-7}
SIZE=${IMG_SIZE:-256M}
DEPTH=${DEPTH:-16}
CACHE=${CACHE:-writeback}   # or none (O_DIRECT)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${BENCH_DIR:-$(mktemp -d /tmp/ferrovirt-diskbench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

command -v qemu-img >/dev/null || { echo "qemu-img is missing (apt-get install qemu-utils)" >&2; exit 1; }
(cd "$ROOT" && cargo build -q --release -p ferrovirt-disk --example ferrovirt-img)
OURS="$ROOT/target/release/examples/ferrovirt-img"

cd "$WORK"
echo "preparing images ($SIZE) in $WORK ..." >&2
qemu-img create -q -f qcow2 fresh.qcow2 "$SIZE"
qemu-img create -q -f qcow2 full.qcow2 "$SIZE"
qemu-io -c "write -P 0x5a 0 $SIZE" full.qcow2 >/dev/null
qemu-img create -q -f qcow2 base.qcow2 "$SIZE"
qemu-io -c "write -P 0x3c 0 $SIZE" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov-fresh.qcow2
cp ov-fresh.qcow2 ov-full.qcow2
qemu-io -c "write -P 0x5a 0 $SIZE" ov-full.qcow2 >/dev/null
BYTES=$(qemu-img info --output=json fresh.qcow2 | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

printf '%-34s %10s %10s %11s %11s %7s\n' case "qemu s" "ours s" "qemu IOPS" "ours IOPS" ratio
for template in fresh full ov-fresh ov-full; do
  for pattern in read4k write4k write64k; do
    case $pattern in
      read4k)  opts=(-c 20000 -s 4096 -S 1052672) ;;
      write4k) opts=(-w -c 20000 -s 4096 -S 1052672) ;;
      write64k) count=$((BYTES / 65536)); opts=(-w -c "$count" -s 65536 -S 65536) ;;
    esac
    count=$(printf '%s\n' "${opts[@]}" | awk 'p{print; exit} /^-c$/{p=1}')
    q=(); o=()
    for ((r = 0; r < REPS; r++)); do
      cp --reflink=auto "$template.qcow2" work.qcow2
      q+=("$(qemu-img bench -f qcow2 -t "$CACHE" --pattern=0xa5 -d "$DEPTH" "${opts[@]}" work.qcow2 | secs)")
      cp --reflink=auto "$template.qcow2" work.qcow2
      o+=("$("$OURS" bench -f qcow2 -t "$CACHE" --pattern=0xa5 -d "$DEPTH" "${opts[@]}" work.qcow2 | secs)")
    done
    qm=$(printf '%s\n' "${q[@]}" | median)
    om=$(printf '%s\n' "${o[@]}" | median)
    awk -v c="$template/$pattern" -v q="$qm" -v o="$om" -v n="$count" 'BEGIN {
      printf "%-34s %10.3f %10.3f %11.0f %11.0f %6.2fx\n", c, q, o, n / q, n / o, q / o }'
  done
done
echo "ratio = ours throughput / qemu-img bench throughput (median of $REPS runs each, depth $DEPTH, cache=$CACHE)"
