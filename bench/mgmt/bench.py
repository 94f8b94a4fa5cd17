#!/usr/bin/env python3
"""ferrovirtd vs libvirtd: API/CLI latency of list, define+undefine, start, destroy (test and
qemu drivers, the same TCG guest for both stacks), and the daemons' memory. Run by run.sh."""

import json
import os

import concurrency
import socket
import statistics
import subprocess
import sys
import time

FV = os.environ["FV_CLI"]
SOCK = os.environ["FERROVIRT_SOCKET"]
WORK = os.environ["BENCH_WORK"]
KERNEL = os.environ["GUEST_KERNEL"]
INITRD = os.environ["GUEST_INITRD"]
FV_PID = int(os.environ["FV_DAEMON_PID"])
LV_PID = int(os.environ.get("LV_DAEMON_PID", "0"))
N_FAST = int(os.environ.get("N_FAST", "30"))
N_VM = int(os.environ.get("N_VM", "10"))


def api(method, path, body=b"", ctype=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    s.sendall(head.encode() + b"\r\n" + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    status = int(data.split(b" ", 2)[1])
    if status >= 400:
        raise RuntimeError(f"{method} {path}: {data!r}")
    return data


def timed(fn, n):
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def run(*args, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stderr}")
    return r


def ms_of(*args):
    t = time.perf_counter()
    run(*args)
    return (time.perf_counter() - t) * 1000


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fv_toml(name, driver):
    if driver == "test":
        return f'name = "{name}"\ntype = "test"\nmemory_mib = 256\n[os]\nkernel = "{KERNEL}"\n'
    return (f'name = "{name}"\ntype = "qemu"\naccel = "tcg"\nmemory_mib = 256\n[os]\nkernel = "{KERNEL}"\n'
            f'initrd = "{INITRD}"\ncmdline = "console=ttyS0 quiet"\n')


def lv_xml(name):
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{KERNEL}</kernel><initrd>{INITRD}</initrd>"
            f"<cmdline>console=ttyS0 quiet</cmdline></os><on_poweroff>destroy</on_poweroff>"
            f"<devices><serial type='pty'/><console type='pty'/></devices></domain>")


def summary(samples):
    s = sorted(samples)
    return {"median_ms": round(statistics.median(s), 2), "p90_ms": round(s[int(len(s) * 0.9) - 1 if len(s) > 1 else 0], 2), "n": len(s)}


results = {}


def record(key, samples):
    results[key] = summary(samples)
    print(f"{key:<52} median {results[key]['median_ms']:>8.2f} ms   p90 {results[key]['p90_ms']:>8.2f} ms  (n={len(samples)})", flush=True)


results["ferrovirtd_idle_rss_kib_fresh"] = rss_kib(FV_PID)

# Ten defined domains, so list has something to list (both stacks).
for i in range(10):
    api("POST", "/v1/domains", fv_toml(f"idle{i}", "test").encode(), "application/toml")

# --- ferrovirtd API (one HTTP request per connection, as the CLI does) ---
record("api list (ferrovirtd)", timed(lambda: api("GET", "/v1/domains?all=true"), N_FAST))
body = fv_toml("bench-du", "test").encode()
record("api define+undefine (ferrovirtd, test)",
       timed(lambda: (api("POST", "/v1/domains", body, "application/toml"), api("DELETE", "/v1/domains/bench-du")), N_FAST))
api("POST", "/v1/domains", fv_toml("bench-t", "test").encode(), "application/toml")


def start_destroy_api(name):
    def measure():
        t = time.perf_counter()
        api("POST", f"/v1/domains/{name}/start")
        start = (time.perf_counter() - t) * 1000
        time.sleep(0.2)
        t = time.perf_counter()
        api("POST", f"/v1/domains/{name}/destroy")
        return start, (time.perf_counter() - t) * 1000
    pairs = [measure() for _ in range(N_VM if name != "bench-t" else N_FAST)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


s, d = start_destroy_api("bench-t")
record("api start (ferrovirtd, test)", s)
record("api destroy (ferrovirtd, test)", d)
api("POST", "/v1/domains", fv_toml("bench-q", "qemu").encode(), "application/toml")
s, d = start_destroy_api("bench-q")
record("api start (ferrovirtd, qemu TCG)", s)
record("api destroy (ferrovirtd, qemu TCG)", d)

# --- CLI, one process per operation (as virsh is measured) ---
deffile = os.path.join(WORK, "du.toml")
with open(deffile, "w") as f:
    f.write(fv_toml("cli-du", "test"))
record("cli ferrovirt list --all", timed(lambda: run(FV, "list", "--all"), N_FAST))
record("cli ferrovirt define + undefine (2 processes)",
       timed(lambda: (run(FV, "define", deffile), run(FV, "undefine", "cli-du")), N_FAST))


def start_destroy_cli(cmd, name, n):
    starts, destroys = [], []
    for _ in range(n):
        starts.append(ms_of(*cmd, "start", name))
        time.sleep(0.5)
        destroys.append(ms_of(*cmd, "destroy", name))
        time.sleep(0.3)
    return starts, destroys


s, d = start_destroy_cli((FV,), "bench-q", N_VM)
record("cli ferrovirt start (qemu TCG)", s)
record("cli ferrovirt destroy (qemu TCG)", d)
results["ferrovirtd_rss_kib_after_workload"] = rss_kib(FV_PID)

# --- list under 1, 50 and 200 concurrent clients ---
results["concurrent list, ferrovirtd API"] = concurrency.run_all(
    "ferrovirtd API GET /v1/domains", lambda: concurrency.api_list(SOCK), concurrency.api_per_client)
results["concurrent list, ferrovirt CLI"] = concurrency.run_all(
    "ferrovirt list --all (process each)", concurrency.command(FV, "list", "--all"),
    concurrency.process_per_client)
results["ferrovirtd_rss_kib_after_concurrency"] = rss_kib(FV_PID)

# --- libvirt on the same guest ---
if LV_PID:
    V = ("virsh", "-c", "qemu:///system")
    for leftover in ["lv-du", "lv-q"] + [f"lvidle{i}" for i in range(10)]:
        run(*V, "destroy", leftover, check=False)
        run(*V, "undefine", leftover, check=False)
    for i in range(10):
        x = os.path.join(WORK, f"lvidle{i}.xml")
        with open(x, "w") as f:
            f.write(lv_xml(f"lvidle{i}"))
        run(*V, "define", x)
    record("cli virsh list --all", timed(lambda: run(*V, "list", "--all"), N_FAST))
    results["concurrent list, virsh"] = concurrency.run_all(
        "virsh list --all (process each)", concurrency.command(*V, "list", "--all"),
        concurrency.process_per_client)
    xml = os.path.join(WORK, "lv-du.xml")
    with open(xml, "w") as f:
        f.write(lv_xml("lv-du"))
    record("cli virsh define + undefine (1 process)", timed(lambda: run(*V, f"define {xml}; undefine lv-du"), N_FAST))
    q = os.path.join(WORK, "lv-q.xml")
    with open(q, "w") as f:
        f.write(lv_xml("lv-q"))
    run(*V, "define", q)
    starts, destroys = start_destroy_cli(V, "lv-q", N_VM)
    record("cli virsh start (qemu TCG)", starts)
    record("cli virsh destroy (qemu TCG)", destroys)
    results["libvirtd_rss_kib_after_workload"] = rss_kib(LV_PID)
    run(*V, "undefine", "lv-q")
    for i in range(10):
        run(*V, "undefine", f"lvidle{i}")

print(json.dumps(results, indent=1))
with open(os.path.join(os.environ.get("BENCH_OUT", WORK), "results.json"), "w") as f:
    json.dump(results, f, indent=1)
