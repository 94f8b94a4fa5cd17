"""GET /v1/domains under concurrent clients: throughput and p50/p99 latency with 1, 50 and 200
clients, each request on a fresh connection (as the CLI does). Used by bench.py; can run alone:
  FERROVIRT_SOCKET=... FV_CLI=target/release/ferrovirt python3 bench/mgmt/concurrency.py [virsh]
"""

import os
import socket
import subprocess
import threading
import time

CLIENTS = (1, 50, 200)


def api_list(sock_path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(b"GET /v1/domains?all=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(data[:200])


def command(*args):
    def call():
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return call


def load(fn, clients, per_client):
    """Run `fn` per_client times in each of `clients` threads, all started together."""
    samples, errors = [], [0]
    lock = threading.Lock()
    go = threading.Event()

    def worker():
        mine = []
        go.wait()
        for _ in range(per_client):
            t = time.perf_counter()
            try:
                fn()
                mine.append((time.perf_counter() - t) * 1000)
            except Exception:
                with lock:
                    errors[0] += 1
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    s = sorted(samples) or [0.0]
    pct = lambda p: round(s[min(len(s) - 1, int(len(s) * p))], 2)
    return {"clients": clients, "requests": len(samples), "errors": errors[0],
            "throughput_per_s": round(len(samples) / wall, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def run_all(name, fn, per_client_of):
    out = []
    for c in CLIENTS:
        r = load(fn, c, per_client_of(c))
        print(f"{name:<40} {c:>3} clients: {r['throughput_per_s']:>8.1f}/s  p50 {r['p50_ms']:>8.2f} ms"
              f"  p99 {r['p99_ms']:>8.2f} ms  ({r['requests']} requests, {r['errors']} errors)", flush=True)
        out.append(r)
    return out


def api_per_client(c):
    return {1: 400, 50: 20, 200: 5}[c]


def process_per_client(c):
    return {1: 20, 50: 2, 200: 1}[c]


if __name__ == "__main__":
    import sys
    sock = os.environ["FERROVIRT_SOCKET"]
    run_all("ferrovirtd API GET /v1/domains", lambda: api_list(sock), api_per_client)
    run_all("ferrovirt list --all (process each)", command(os.environ["FV_CLI"], "list", "--all"), process_per_client)
    if "virsh" in sys.argv[1:]:
        run_all("virsh list --all (process each)", command("virsh", "-c", "qemu:///system", "list", "--all"),
                process_per_client)
