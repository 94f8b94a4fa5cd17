#!/usr/bin/env python3
"""Boot-to-exit benchmark: ferrovmm against QEMU microvm on the same tiny PVH guest.

Runs both alternately, N times each, and prints median wall time, CPU time
(user+sys) and peak RSS of each, and the ratios. Both must print the guest's
marker, or the run counts as a failure.
"""
import argparse
import os
import statistics
import sys
import time

MARKER = b"FERROVIRT-BENCH-MARKER"
TIME = "/usr/bin/time"


def run_once(cmd):
    # Peak RSS comes from GNU time: a child spawned straight from Python would
    # report Python's own RSS, which Linux carries across exec into ru_maxrss.
    timed = [TIME, "-f", "%M", "-o", "/tmp/bench-rss"] + cmd
    start = time.perf_counter()
    pid = os.posix_spawn(timed[0], timed, os.environ,
                         file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                       (os.POSIX_SPAWN_OPEN, 1, "/tmp/bench-stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                                       (os.POSIX_SPAWN_OPEN, 2, "/tmp/bench-stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    with open("/tmp/bench-stdout", "rb") as f:
        out = f.read()
    if MARKER not in out:
        with open("/tmp/bench-stderr", "rb") as f:
            err = f.read()
        sys.exit(f"{cmd[0]} did not print the marker (status {status}):\n{out[-500:]!r}\n{err[-500:]!r}")
    with open("/tmp/bench-rss") as f:
        rss_kib = int(f.read().split()[-1])
    return wall * 1000, (usage.ru_utime + usage.ru_stime) * 1000, rss_kib / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ferrovmm", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--memory", type=int, default=128)
    args = ap.parse_args()

    commands = {
        "ferrovmm": [args.ferrovmm, "--name", "bench", "--kernel", args.guest, "--memory", str(args.memory),
                     "--serial", "stdio"],
        "qemu microvm": [args.qemu, "-accel", "kvm", "-M", "microvm", "-nodefaults", "-no-reboot", "-display",
                         "none", "-serial", "stdio", "-m", str(args.memory), "-kernel", args.guest],
    }
    results = {name: [] for name in commands}
    run_once(commands["ferrovmm"])  # warm the page cache
    run_once(commands["qemu microvm"])
    for _ in range(args.runs):
        for name, cmd in commands.items():
            results[name].append(run_once(cmd))

    print(f"tiny PVH guest, {args.memory} MiB, {args.runs} runs each, alternating; medians")
    print(f"{'VMM':<14} {'wall ms':>9} {'CPU ms':>9} {'peak RSS MiB':>13}")
    med = {}
    for name, rows in results.items():
        med[name] = [statistics.median(col) for col in zip(*rows)]
        w, c, r = med[name]
        print(f"{name:<14} {w:>9.1f} {c:>9.1f} {r:>13.1f}")
    f, q = med["ferrovmm"], med["qemu microvm"]
    print(f"{'qemu/ferrovmm':<14} {q[0] / f[0]:>8.1f}x {q[1] / f[1]:>8.1f}x {q[2] / f[2]:>12.1f}x")


if __name__ == "__main__":
    main()
