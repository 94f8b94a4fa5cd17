"""Concurrent clients against ferrovirtd and libvirtd, measured the same way on both sides.

Each client is a process of its own, forked from the harness (the same Python harness for both
daemons; processes, not threads, so that no client waits for another's interpreter lock: with
200 threads the lock's 5 ms switch interval, not the daemon, made the tail). A load point runs
all clients together for a fixed time; every request's latency is kept, and throughput is
completed requests / wall time. Used by bench.py.

Client kinds (one list of the 10 defined domains per request):
  persistent  each client keeps one connection: HTTP/1.1 keep-alive `GET /v1/domains?all=true`
              on the Unix socket, vs one libvirt connection (`qemu:///system`) per client doing
              `listAllDomains()` -- how a management application talks to each daemon.
  fresh       a new connection per request: connect + GET + close, vs `libvirt.open()` +
              `listAllDomains()` + `close()` (libvirt's connection handshake is several RPCs).
  process     a new CLI process per request: `ferrovirt list --all` vs `virsh list --all`.
"""

import multiprocessing
import socket
import subprocess
import time

CLIENTS = (1, 50, 200)
# Clients are forked processes: the parent has no threads and no libvirt connection then.
CTX = multiprocessing.get_context("fork")
LIST_PATH = b"/v1/domains?all=true"


class FvHttp:
    """A minimal HTTP/1.1 client on ferrovirtd's Unix socket (keep-alive, Content-Length or
    chunked answers)."""

    def __init__(self, sock_path, keep_alive=True):
        self.sock_path = sock_path
        self.keep_alive = keep_alive
        self.s = None
        self.buf = b""

    def _connect(self):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(self.sock_path)
        self.buf = b""

    def close(self):
        if self.s:
            self.s.close()
            self.s = None

    def _fill(self):
        chunk = self.s.recv(65536)
        if not chunk:
            raise ConnectionError("ferrovirtd closed the connection")
        self.buf += chunk

    def _take_line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def request(self, method, path, body=b"", ctype=None):
        """(status, body); raises on a transport error."""
        if self.s is None:
            self._connect()
        conn = b"keep-alive" if self.keep_alive else b"close"
        head = b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: %s\r\nContent-Length: %d\r\n" % (
            method.encode(), path, conn, len(body))
        if ctype:
            head += b"Content-Type: " + ctype.encode() + b"\r\n"
        self.s.sendall(head + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        header, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = header.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            fields[k.strip().lower()] = v.strip().lower()
        if fields.get(b"transfer-encoding") == b"chunked":
            data = b""
            while True:
                size = int(self._take_line().split(b";")[0], 16)
                if size == 0:
                    self._take_line()
                    break
                data += self._take(size)
                self._take_line()
        else:
            data = self._take(int(fields.get(b"content-length", b"0")))
        if not self.keep_alive or fields.get(b"connection") == b"close":
            self.close()
        return status, data


def fv_list_persistent(sock_path):
    """A client factory: one keep-alive connection per client."""
    def make():
        http = FvHttp(sock_path)

        def call():
            status, body = http.request("GET", LIST_PATH)
            if status != 200:
                raise RuntimeError(body[:200])
        return call, http.close
    return make


def fv_list_fresh(sock_path):
    def make():
        def call():
            http = FvHttp(sock_path, keep_alive=False)
            try:
                status, body = http.request("GET", LIST_PATH)
            finally:
                http.close()
            if status != 200:
                raise RuntimeError(body[:200])
        return call, lambda: None
    return make


def lv_list_persistent(uri):
    import libvirt

    def make():
        conn = libvirt.open(uri)

        def call():
            conn.listAllDomains(0)
        return call, conn.close
    return make


def lv_list_fresh(uri):
    import libvirt

    def make():
        def call():
            conn = libvirt.open(uri)
            try:
                conn.listAllDomains(0)
            finally:
                conn.close()
        return call, lambda: None
    return make


def process_each(*args):
    def make():
        def call():
            subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return call, lambda: None
    return make


def percentile(sorted_samples, p):
    if not sorted_samples:
        return 0.0
    return sorted_samples[min(len(sorted_samples) - 1, int(len(sorted_samples) * p))]


def load(make, clients, seconds):
    """`clients` processes (forked: one client each, no interpreter lock shared between them),
    each with its own client from `make()` set up before the clock starts, call it in a loop
    for `seconds`; a call still running then is waited for and counted."""
    ready = CTX.Barrier(clients + 1)
    out = CTX.SimpleQueue()

    def worker():
        try:
            call, close = make()
        except Exception:
            call = None
        try:
            ready.wait(timeout=300)
        except Exception:
            pass
        if call is None:
            out.put(([], 0.0, 0.0, 1))
            return
        samples, failed = [], 0
        # perf_counter is CLOCK_MONOTONIC: comparable between the processes.
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            try:
                call()
                samples.append((time.perf_counter() - t) * 1000)
            except Exception:
                failed += 1
        t1 = time.perf_counter()
        try:
            close()
        except Exception:
            pass
        out.put((samples, t0, t1, failed))

    procs = [CTX.Process(target=worker, daemon=True) for _ in range(clients)]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    parts = [out.get() for _ in procs]
    for p in procs:
        p.join()
    samples = sorted(x for part in parts for x in part[0])
    started = [p[1] for p in parts if p[0]]
    wall = (max(p[2] for p in parts) - min(started)) if started else seconds
    return {"clients": clients, "requests": len(samples), "errors": sum(p[3] for p in parts),
            "throughput_per_s": round(len(samples) / wall, 1),
            "p50_ms": round(percentile(samples, 0.50), 3), "p99_ms": round(percentile(samples, 0.99), 3)}


def show(name, r):
    print(f"  {name:<34} {r['clients']:>3} clients: {r['throughput_per_s']:>9.1f}/s  p50 {r['p50_ms']:>8.2f} ms"
          f"  p99 {r['p99_ms']:>8.2f} ms  ({r['requests']} requests, {r['errors']} errors)", flush=True)
