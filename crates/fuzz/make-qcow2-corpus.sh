#!/bin/sh
# Regenerates the qcow2 seed corpus with qemu-img/qemu-io: tiny images (512-byte clusters) that
# cover data, zero and compressed clusters, internal snapshots, a dirty bitmap, a backing name,
# v2 and v3, zlib and zstd. Run from crates/fuzz; commit the result.
set -eu
out=corpus/qcow2
mkdir -p "$out"
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
q() { qemu-img "$@" >/dev/null; }
io() { f=$1; shift; for c in "$@"; do qemu-io -f qcow2 -c "$c" "$f" >/dev/null; done; }
o=cluster_size=512

q create -f qcow2 -o $o "$t/data.qcow2" 64K
io "$t/data.qcow2" "write -P 0xaa 0 4k" "write -P 0x55 40k 1k" "write -z 8k 2k"
cp "$t/data.qcow2" "$out/data-v3.qcow2"

q create -f qcow2 -o $o,compat=0.10 "$t/v2.qcow2" 64K
io "$t/v2.qcow2" "write -P 0x11 0 2k"
cp "$t/v2.qcow2" "$out/data-v2.qcow2"

q create -f qcow2 -o $o "$t/snap.qcow2" 64K
io "$t/snap.qcow2" "write -P 0x01 0 2k"
q snapshot -c first "$t/snap.qcow2"
io "$t/snap.qcow2" "write -P 0x02 1k 2k"
q snapshot -c second "$t/snap.qcow2"
cp "$t/snap.qcow2" "$out/snapshots.qcow2"

q create -f raw "$t/src.raw" 64K
qemu-io -f raw -c "write -P 0x33 0 16k" "$t/src.raw" >/dev/null
q convert -c -O qcow2 -o $o "$t/src.raw" "$out/compressed-zlib.qcow2"
q convert -c -O qcow2 -o $o,compression_type=zstd "$t/src.raw" "$out/compressed-zstd.qcow2"

q create -f qcow2 -o $o "$t/bitmap.qcow2" 64K
q bitmap --add "$t/bitmap.qcow2" dirty0
io "$t/bitmap.qcow2" "write -P 0x44 4k 4k"
cp "$t/bitmap.qcow2" "$out/bitmap.qcow2"

q create -f qcow2 -o $o "$t/base.qcow2" 64K
q create -f qcow2 -o $o -b base.qcow2 -F qcow2 "$t/overlay.qcow2"
io "$t/overlay.qcow2" "write -P 0x66 2k 1k"
cp "$t/overlay.qcow2" "$out/overlay-backing-name.qcow2"
