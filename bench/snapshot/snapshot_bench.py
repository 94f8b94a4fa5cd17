#!/usr/bin/env python3
"""Snapshot (save) and restore of a paused tiny guest: ferrovmm against QEMU on the same run.

Each round, alternating the two VMMs: boot the guest (256 MiB, 64 MiB of it written),
wait for its marker, pause it, and time
- save: ferrovmm `PUT /vm/snapshot` / QEMU `migrate` to `exec:cat > FILE` (bandwidth
  limit lifted, as `virsh save` does), until the VMM says it is done;
- restore: from spawning the process until the guest runs again: ferrovmm
  `--restore DIR --resume` until `GET /vm` says running / QEMU `-incoming exec:cat FILE`,
  `cont` once the state is loaded, until `query-status` says running.
Prints medians, p95 and the ratios QEMU/ferrovmm.
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MARKER = b"FERROVIRT-BENCH-READY"
DEADLINE_S = 60


def wait_until(cond, what):
    end = time.monotonic() + DEADLINE_S
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.0005)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=DEADLINE_S)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE_S)
        s.connect(self.path)
        self.sock = s


def api(sock, method, path, body=None):
    c = UnixHTTP(sock)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"} if body is not None else {})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status >= 300:
        sys.exit(f"{method} {path}: {r.status} {data!r}")
    return json.loads(data) if data else None


def try_api(sock, method, path):
    try:
        return api(sock, method, path)
    except OSError:
        return None


class Qmp:
    def __init__(self, path):
        self.s = wait_until(lambda: self._connect(path), "QEMU's QMP socket")
        self.f = self.s.makefile("rwb")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    @staticmethod
    def _connect(path):
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE_S)
            s.connect(path)
            return s
        except OSError:
            return None

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                sys.exit(f"QMP {name}: {reply['error']}")

    def close(self):
        self.s.close()


def marker_in(path):
    try:
        with open(path, "rb") as f:
            return MARKER in f.read()
    except OSError:
        return False


def fresh(path):
    """A console file from an earlier round would hold the marker already."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def stop(proc):
    proc.kill()
    proc.wait()


def ferrovmm_round(args, d):
    sock, serial, snap = f"{d}/f.sock", f"{d}/f.serial", f"{d}/fsnap"
    fresh(serial)
    vm = subprocess.Popen([args.ferrovmm, "--name", "bench", "--kernel", args.guest, "--memory", "256",
                           "--serial", f"file={serial}", "--api-socket", sock],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_until(lambda: marker_in(serial) and os.path.exists(sock), "ferrovmm's guest")
    api(sock, "PUT", "/vm/pause")
    t = time.perf_counter()
    api(sock, "PUT", "/vm/snapshot", {"path": snap})
    save = time.perf_counter() - t
    api(sock, "PUT", "/vm/stop")
    vm.wait(DEADLINE_S)
    rsock = f"{d}/r.sock"
    t = time.perf_counter()
    vm = subprocess.Popen([args.ferrovmm, "--restore", snap, "--resume", "--api-socket", rsock,
                           "--serial", "none"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_until(lambda: (try_api(rsock, "GET", "/vm") or {}).get("state") == "running",
               "the restored ferrovmm to run")
    restore = time.perf_counter() - t
    api(rsock, "PUT", "/vm/stop")
    vm.wait(DEADLINE_S)
    size = sum(os.stat(f"{snap}/{n}").st_blocks * 512 for n in ("state", "memory"))
    shutil.rmtree(snap)
    return save * 1000, restore * 1000, size / 2**20


def qemu_cmd(args, d, qmp, extra):
    return [args.qemu, "-accel", args.accel, "-M", "microvm", "-nodefaults", "-no-reboot",
            "-display", "none", "-m", "256", "-kernel", args.guest,
            "-qmp", f"unix:{qmp},server=on,wait=off"] + extra


def qemu_round(args, d):
    serial, qsock, state = f"{d}/q.serial", f"{d}/q.sock", f"{d}/qsnap"
    fresh(serial)
    vm = subprocess.Popen(qemu_cmd(args, d, qsock, ["-serial", f"file:{serial}"]),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    q = Qmp(qsock)
    wait_until(lambda: marker_in(serial), "QEMU's guest")
    q.cmd("stop")
    q.cmd("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
    t = time.perf_counter()
    q.cmd("migrate", uri=f"exec:cat > {state}")
    st = wait_until(lambda: (lambda s: s if s in ("completed", "failed") else None)(
        q.cmd("query-migrate").get("status")), "QEMU's save")
    save = time.perf_counter() - t
    if st != "completed":
        sys.exit("QEMU's save failed")
    q.close()
    stop(vm)
    rsock = f"{d}/qr.sock"
    t = time.perf_counter()
    vm = subprocess.Popen(qemu_cmd(args, d, rsock, ["-serial", "null", "-incoming", f"exec:cat {state}"]),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    q = Qmp(rsock)
    wait_until(lambda: q.cmd("query-status")["status"] == "paused", "QEMU to load the state")
    q.cmd("cont")
    wait_until(lambda: q.cmd("query-status")["status"] == "running", "QEMU to run")
    restore = time.perf_counter() - t
    q.close()
    stop(vm)
    size = os.stat(state).st_blocks * 512
    os.unlink(state)
    return save * 1000, restore * 1000, size / 2**20


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ferrovmm", required=True)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    ap.add_argument("--accel", default="kvm")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where snapshots are written (default: a temp dir)")
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix="snapbench-", dir=args.dir)
    try:
        results = {"ferrovmm": [], "qemu": []}
        ferrovmm_round(args, d)  # warm caches
        qemu_round(args, d)
        for _ in range(args.runs):
            results["ferrovmm"].append(ferrovmm_round(args, d))
            results["qemu"].append(qemu_round(args, d))
    finally:
        shutil.rmtree(d, ignore_errors=True)

    print(f"tiny guest, 256 MiB RAM (64 MiB written), paused; QEMU -accel {args.accel} -M microvm; "
          f"{args.runs} rounds, alternating")
    print(f"{'VMM':<10} {'save ms':>9} {'p95':>7} {'restore ms':>11} {'p95':>7} {'on disk MiB':>12}")
    med = {}
    for name, rows in results.items():
        save, restore, size = zip(*rows)
        med[name] = (statistics.median(save), statistics.median(restore))
        print(f"{name:<10} {med[name][0]:>9.1f} {p95(save):>7.1f} {med[name][1]:>11.1f} {p95(restore):>7.1f} "
              f"{statistics.median(size):>12.1f}")
    f, q = med["ferrovmm"], med["qemu"]
    print(f"{'qemu/ours':<10} {q[0] / f[0]:>8.1f}x {'':>7} {q[1] / f[1]:>10.1f}x")


if __name__ == "__main__":
    main()
