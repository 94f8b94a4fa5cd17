#!/usr/bin/env bash
# Whole-image operations, ferrovirt img against QEMU's tools on copies of the same
# images in the same run (wall time, median of REPS; ratio = QEMU's time / ours):
#   - internal snapshot create and delete on a 1 GiB qcow2 with 50 % allocated,
#   - commit of a 256 MiB overlay into its 1 GiB backing file,
#   - sequential read over NBD: `qemu-img convert` of a 512 MiB export served by
#     `ferrovirt img nbd` and by `qemu-nbd`.
#
# Usage: bench/disk/ops.sh [reps]      (env: BENCH_DIR)
set -euo pipefail

REPS=${1:-5}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${BENCH_DIR:-$(mktemp -d /tmp/ferrovirt-diskops.XXXXXX)}
mkdir -p "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

for t in qemu-img qemu-io qemu-nbd; do
  command -v $t >/dev/null || { echo "$t is missing (apt-get install qemu-utils)" >&2; exit 1; }
done
(cd "$ROOT" && cargo build -q --release -p ferrovirt-disk --example ferrovirt-img)
IMG="$ROOT/target/release/examples/ferrovirt-img"

cd "$WORK"
echo "preparing images in $WORK ..." >&2
qemu-img create -q -f qcow2 half.qcow2 1G
qemu-io -c "write -P 0x5a 0 512M" half.qcow2 >/dev/null
cp half.qcow2 half-snap.qcow2
qemu-img snapshot -c s half-snap.qcow2
qemu-io -c "write -P 0x6b 0 128M" half-snap.qcow2 >/dev/null
qemu-img create -q -f qcow2 base.qcow2 1G
qemu-io -c "write -P 0x3c 0 1G" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2
qemu-io -c "write -P 0x5a 128M 256M" ov.qcow2 >/dev/null
qemu-img create -q -f qcow2 export.qcow2 512M
qemu-io -c "write -P 0x77 0 512M" export.qcow2 >/dev/null

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# time_of CMD...: seconds the command takes
time_of() { local t0; t0=$(now); "$@" >/dev/null; awk -v a="$t0" -v b="$(now)" 'BEGIN {print b - a}'; }
row() {
  awk -v c="$1" -v q="$2" -v o="$3" 'BEGIN { printf "%-44s %9.3f %9.3f %7.2fx\n", c, q, o, q / o }'
}

printf '%-44s %9s %9s %8s\n' case "qemu s" "ours s" ratio

q=(); o=()
for ((r = 0; r < REPS; r++)); do
  cp --reflink=auto half.qcow2 w.qcow2; sync
  q+=("$(time_of qemu-img snapshot -c s w.qcow2)")
  cp --reflink=auto half.qcow2 w.qcow2; sync
  o+=("$(time_of "$IMG" snapshot -c s w.qcow2)")
done
row "snapshot create (1 GiB, 512 MiB allocated)" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${o[@]}" | median)"

q=(); o=()
for ((r = 0; r < REPS; r++)); do
  cp --reflink=auto half-snap.qcow2 w.qcow2; sync
  q+=("$(time_of qemu-img snapshot -d s w.qcow2)")
  cp --reflink=auto half-snap.qcow2 w.qcow2; sync
  o+=("$(time_of "$IMG" snapshot -d s w.qcow2)")
done
row "snapshot delete (1 GiB, 512 MiB allocated)" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${o[@]}" | median)"

q=(); o=()
for ((r = 0; r < REPS; r++)); do
  cp --reflink=auto base.qcow2 wb.qcow2
  cp --reflink=auto ov.qcow2 wo.qcow2; qemu-img rebase -u -b wb.qcow2 -F qcow2 wo.qcow2; sync
  q+=("$(time_of qemu-img commit wo.qcow2)")
  cp --reflink=auto base.qcow2 wb.qcow2
  cp --reflink=auto ov.qcow2 wo.qcow2; qemu-img rebase -u -b wb.qcow2 -F qcow2 wo.qcow2; sync
  o+=("$(time_of "$IMG" commit wo.qcow2)")
done
row "commit (256 MiB overlay into 1 GiB)" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${o[@]}" | median)"

wait_sock() { local i; for ((i = 0; i < 400; i++)); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
qemu-nbd -r -t -f qcow2 -k "$WORK/q.sock" export.qcow2 & PIDS+=($!)
"$IMG" nbd --read-only --socket "$WORK/o.sock" export.qcow2 & PIDS+=($!)
wait_sock "$WORK/q.sock"; wait_sock "$WORK/o.sock"
q=(); o=()
for ((r = 0; r < REPS; r++)); do
  rm -f out.raw
  q+=("$(time_of qemu-img convert -O raw "nbd+unix:///?socket=$WORK/q.sock" out.raw)")
  rm -f out.raw
  o+=("$(time_of qemu-img convert -O raw "nbd+unix:///?socket=$WORK/o.sock" out.raw)")
done
row "NBD sequential read (convert 512 MiB)" "$(printf '%s\n' "${q[@]}" | median)" "$(printf '%s\n' "${o[@]}" | median)"
