#!/usr/bin/env python3
"""Runs blkbench (ferrovmm's virtio-blk device path) and fio on the same file, alternately."""
import json
import statistics
import subprocess
import sys

binary, path, seconds, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
CASES = [("randread4k", "randread", "4k", 1), ("randread4k", "randread", "4k", 4),
         ("randread4k", "randread", "4k", 16),
         ("seqread128k", "read", "128k", 4), ("seqwrite128k", "write", "128k", 4)]


def device(mode, depth):
    out = subprocess.run([binary, path, mode, str(depth), seconds, "direct"], check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["mb_per_s"], r["lat_median_us"]


def fio(rw, bs, depth):
    out = subprocess.run(["fio", "--name=b", f"--filename={path}", "--direct=1", f"--rw={rw}", f"--bs={bs}",
                          "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={seconds}", "--time_based",
                          "--output-format=json", "--randrepeat=0"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["write"] if rw == "write" else job["read"]
    return side["bw_bytes"] / 1e6, side["clat_ns"]["percentile"]["50.000000"] / 1000


print(f"virtio-blk device path vs fio (libaio, O_DIRECT) on {path}; medians of {repeat} runs of {seconds}s")
print(f"{'case':<22} {'device MB/s':>12} {'fio MB/s':>10} {'ratio':>7} {'device lat us':>14} {'fio lat us':>11} {'added us':>9}")
for mode, rw, bs, depth in CASES:
    dev, ref = [], []
    for _ in range(repeat):
        dev.append(device(mode, depth))
        ref.append(fio(rw, bs, depth))
    d_bw = statistics.median(x[0] for x in dev)
    f_bw = statistics.median(x[0] for x in ref)
    d_lat = statistics.median(x[1] for x in dev)
    f_lat = statistics.median(x[1] for x in ref)
    print(f"{mode + ' qd' + str(depth):<22} {d_bw:>12.1f} {f_bw:>10.1f} {d_bw / f_bw:>6.0%} {d_lat:>14.1f} {f_lat:>11.1f} {d_lat - f_lat:>9.1f}")
