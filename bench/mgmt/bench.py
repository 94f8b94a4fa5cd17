#!/usr/bin/env python3
"""ferrovirtd vs libvirtd in the same run, the two sides alternating within every phase so the
load of the shared host falls on both alike. Run by run.sh (which starts both daemons).

1. One operation at a time: list, define+undefine, start and destroy of the same QEMU TCG guest
   (ferrovirt API and CLI; virsh, one process per operation).
2. List under 1, 50 and 200 concurrent clients (see concurrency.py for the client kinds):
   throughput, p50 and p99, ROUNDS rounds per point, medians of the rounds.
3. List latency while 10 starts of QEMU TCG guests are in flight (both daemons' qemu driver,
   the same guest), ROUNDS rounds.
4. Daemon RSS, fresh and idle after all of this.
"""

import json
import os
import statistics
import subprocess
import threading
import time

import concurrency as cc

FV = os.environ["FV_CLI"]
SOCK = os.environ["FERROVIRT_SOCKET"]
WORK = os.environ["BENCH_WORK"]
KERNEL = os.environ["GUEST_KERNEL"]
INITRD = os.environ["GUEST_INITRD"]
FV_PID = int(os.environ["FV_DAEMON_PID"])
LV_PID = int(os.environ.get("LV_DAEMON_PID", "0"))
N_FAST = int(os.environ.get("N_FAST", "30"))
N_VM = int(os.environ.get("N_VM", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = float(os.environ.get("LOAD_SECONDS", "2.5"))
BURST = 10
URI = "qemu:///system"
VIRSH = ("virsh", "-c", URI)

results = {"rounds": ROUNDS, "load_seconds": SECONDS, "loadavg": []}
if LV_PID:
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)


def note_load(what):
    la = os.getloadavg()
    results["loadavg"].append({"at": what, "1min": round(la[0], 2), "5min": round(la[1], 2)})
    print(f"-- {what}: load average {la[0]:.2f} (1 min) {la[1]:.2f} (5 min)", flush=True)


def api(method, path, body=b"", ctype=None):
    http = cc.FvHttp(SOCK, keep_alive=False)
    try:
        status, data = http.request(method, path.encode(), body, ctype)
    finally:
        http.close()
    if status >= 400:
        raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
    return data


def run(*args, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stderr}")
    return r


def ms(fn):
    t = time.perf_counter()
    fn()
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
    return {"median_ms": round(statistics.median(s), 2),
            "p90_ms": round(s[max(0, int(len(s) * 0.9) - 1)], 2), "n": len(s)}


def record(key, samples):
    results[key] = summary(samples)
    print(f"{key:<52} median {results[key]['median_ms']:>8.2f} ms   p90 {results[key]['p90_ms']:>8.2f} ms"
          f"  (n={len(samples)})", flush=True)


def vm_processes(prefix):
    """PIDs of QEMU processes whose guest name starts with `prefix` (either daemon's)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu-system" in cmd and b"guest=" + prefix.encode() in cmd:
            pids.append(int(p))
    return pids


def wait_no_vms(prefix):
    deadline = time.monotonic() + 60
    while vm_processes(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = vm_processes(prefix)
    if left:
        raise RuntimeError(f"QEMU processes of {prefix}* still there: {left}")


def alternate(round_no, fv_step, lv_step):
    """Both sides once, ferrovirt first in even rounds and libvirt first in odd ones."""
    steps = [fv_step, lv_step] if round_no % 2 == 0 else [lv_step, fv_step]
    for step in steps:
        if step:
            step()


# --- set-up: RSS when fresh, ten defined domains on each side for list to list ---
results["ferrovirtd_idle_rss_kib_fresh"] = rss_kib(FV_PID)
for i in range(10):
    api("POST", "/v1/domains", fv_toml(f"idle{i}", "test").encode(), "application/toml")
if LV_PID:
    results["libvirtd_idle_rss_kib_fresh"] = rss_kib(LV_PID)
    for leftover in ["lv-du", "lv-q"] + [f"lvidle{i}" for i in range(10)] + [f"lvburst{i}" for i in range(BURST)]:
        run(*VIRSH, "destroy", leftover, check=False)
        run(*VIRSH, "undefine", leftover, check=False)
    for i in range(10):
        x = os.path.join(WORK, f"lvidle{i}.xml")
        with open(x, "w") as f:
            f.write(lv_xml(f"lvidle{i}"))
        run(*VIRSH, "define", x)
note_load("start")

# --- 1. one operation at a time ---
record("api list (ferrovirtd)", [ms(lambda: api("GET", "/v1/domains?all=true")) for _ in range(N_FAST)])
record("cli ferrovirt list --all", [ms(lambda: run(FV, "list", "--all")) for _ in range(N_FAST)])
if LV_PID:
    record("cli virsh list --all", [ms(lambda: run(*VIRSH, "list", "--all")) for _ in range(N_FAST)])

body = fv_toml("bench-du", "test").encode()
record("api define+undefine (ferrovirtd, test)",
       [ms(lambda: (api("POST", "/v1/domains", body, "application/toml"), api("DELETE", "/v1/domains/bench-du")))
        for _ in range(N_FAST)])
deffile = os.path.join(WORK, "du.toml")
with open(deffile, "w") as f:
    f.write(fv_toml("cli-du", "test"))
record("cli ferrovirt define + undefine (2 processes)",
       [ms(lambda: (run(FV, "define", deffile), run(FV, "undefine", "cli-du"))) for _ in range(N_FAST)])
if LV_PID:
    xml = os.path.join(WORK, "lv-du.xml")
    with open(xml, "w") as f:
        f.write(lv_xml("lv-du"))
    record("cli virsh define + undefine (1 process)",
           [ms(lambda: run(*VIRSH, f"define {xml}; undefine lv-du")) for _ in range(N_FAST)])

api("POST", "/v1/domains", fv_toml("bench-q", "qemu").encode(), "application/toml")
if LV_PID:
    q = os.path.join(WORK, "lv-q.xml")
    with open(q, "w") as f:
        f.write(lv_xml("lv-q"))
    run(*VIRSH, "define", q)
samples = {k: [] for k in ("fv api start", "fv api destroy", "fv cli start", "fv cli destroy",
                           "virsh start", "virsh destroy")}


def fv_start_destroy():
    samples["fv api start"].append(ms(lambda: api("POST", "/v1/domains/bench-q/start")))
    time.sleep(0.3)
    samples["fv api destroy"].append(ms(lambda: api("POST", "/v1/domains/bench-q/destroy")))
    wait_no_vms("bench-q")
    samples["fv cli start"].append(ms(lambda: run(FV, "start", "bench-q")))
    time.sleep(0.3)
    samples["fv cli destroy"].append(ms(lambda: run(FV, "destroy", "bench-q")))
    wait_no_vms("bench-q")


def lv_start_destroy():
    samples["virsh start"].append(ms(lambda: run(*VIRSH, "start", "lv-q")))
    time.sleep(0.3)
    samples["virsh destroy"].append(ms(lambda: run(*VIRSH, "destroy", "lv-q")))
    wait_no_vms("lv-q")


for r in range(N_VM):
    alternate(r, fv_start_destroy, lv_start_destroy if LV_PID else None)
record("api start (ferrovirtd, qemu TCG)", samples["fv api start"])
record("api destroy (ferrovirtd, qemu TCG)", samples["fv api destroy"])
record("cli ferrovirt start (qemu TCG)", samples["fv cli start"])
record("cli ferrovirt destroy (qemu TCG)", samples["fv cli destroy"])
if LV_PID:
    record("cli virsh start (qemu TCG)", samples["virsh start"])
    record("cli virsh destroy (qemu TCG)", samples["virsh destroy"])
note_load("after one-at-a-time operations")

# --- 2. list under concurrent clients ---
KINDS = [
    ("persistent", cc.fv_list_persistent(SOCK), cc.lv_list_persistent(URI) if LV_PID else None),
    ("fresh", cc.fv_list_fresh(SOCK), cc.lv_list_fresh(URI) if LV_PID else None),
    ("process", cc.process_each(FV, "list", "--all"), cc.process_each(*VIRSH, "list", "--all") if LV_PID else None),
]
SIDE_NAMES = {"persistent": ("ferrovirtd keep-alive GET", "libvirtd listAllDomains"),
              "fresh": ("ferrovirtd connect+GET", "libvirt open+listAllDomains"),
              "process": ("ferrovirt list --all", "virsh list --all")}


def median_of(rounds):
    return {"clients": rounds[0]["clients"],
            "throughput_per_s": round(statistics.median(r["throughput_per_s"] for r in rounds), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rounds), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in rounds), 3),
            "requests": sum(r["requests"] for r in rounds), "errors": sum(r["errors"] for r in rounds),
            "rounds": rounds}


concurrent = {}
for kind, fv_make, lv_make in KINDS:
    fv_name, lv_name = SIDE_NAMES[kind]
    seconds = SECONDS * (1.6 if kind == "process" else 1)
    for c in cc.CLIENTS:
        per = {"ferrovirtd": [], "libvirtd": []}

        def fv_step():
            r = cc.load(fv_make, c, seconds)
            cc.show(fv_name, r)
            per["ferrovirtd"].append(r)

        def lv_step():
            r = cc.load(lv_make, c, seconds)
            cc.show(lv_name, r)
            per["libvirtd"].append(r)

        for r in range(ROUNDS):
            alternate(r, fv_step, lv_step if LV_PID else None)
        point = {side: median_of(rs) for side, rs in per.items() if rs}
        if LV_PID:
            f, lv = point["ferrovirtd"], point["libvirtd"]
            point["throughput_ratio_fv_over_lv"] = round(f["throughput_per_s"] / max(lv["throughput_per_s"], 0.1), 2)
            point["p99_ratio_lv_over_fv"] = round(lv["p99_ms"] / max(f["p99_ms"], 0.001), 2)
        concurrent.setdefault(kind, []).append(point)
        m = point["ferrovirtd"]
        line = f"{kind:>10} {c:>3} clients, medians: ferrovirtd {m['throughput_per_s']:.0f}/s p50 {m['p50_ms']:.2f} p99 {m['p99_ms']:.2f}"
        if LV_PID:
            m = point["libvirtd"]
            line += (f" | libvirtd {m['throughput_per_s']:.0f}/s p50 {m['p50_ms']:.2f} p99 {m['p99_ms']:.2f}"
                     f" | throughput x{point['throughput_ratio_fv_over_lv']}, p99 /{point['p99_ratio_lv_over_fv']}")
        print(line, flush=True)
    note_load(f"after {kind} clients")
results["concurrent list"] = concurrent

# --- 3. list latency while 10 starts are in flight ---
for i in range(BURST):
    api("POST", "/v1/domains", fv_toml(f"burst{i}", "qemu").encode(), "application/toml")
    if LV_PID:
        x = os.path.join(WORK, f"lvburst{i}.xml")
        with open(x, "w") as f:
            f.write(lv_xml(f"lvburst{i}"))
        run(*VIRSH, "define", x)


# The same stretch of time for both stacks: the first second of the starts (one stack's starts
# may all return within it while the other's take many seconds).
FIRST = 1.0


def burst(list_call, start_calls):
    """Start every domain at once (one thread and connection each) while one client lists in a
    loop on its own connection: the list latencies until the last start returned, those within
    the first second, and how long the starts took."""
    lat, early, errors = [], [], []
    go = threading.Barrier(len(start_calls) + 2)
    done = threading.Event()
    begun = [0.0]

    def lister():
        go.wait()
        begun[0] = time.perf_counter()
        while not done.is_set() or time.perf_counter() - begun[0] < FIRST:
            t = time.perf_counter()
            list_call()
            ms_taken = (time.perf_counter() - t) * 1000
            if not done.is_set():
                lat.append(ms_taken)
            if t - begun[0] < FIRST:
                early.append(ms_taken)

    def starter(call):
        go.wait()
        try:
            call()
        except Exception as e:
            errors.append(str(e))

    threads = [threading.Thread(target=starter, args=(c,)) for c in start_calls]
    lt = threading.Thread(target=lister)
    for t in threads + [lt]:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    makespan = (time.perf_counter() - t0) * 1000
    done.set()
    lt.join()
    if errors:
        raise RuntimeError(f"starts failed: {errors[:3]}")
    s, e = sorted(lat), sorted(early)
    return {"list_requests": len(s), "list_p50_ms": round(cc.percentile(s, 0.5), 3),
            "list_p99_ms": round(cc.percentile(s, 0.99), 3), "list_max_ms": round(s[-1], 3) if s else 0,
            "first_second_lists": len(e), "first_second_p50_ms": round(cc.percentile(e, 0.5), 3),
            "first_second_p99_ms": round(cc.percentile(e, 0.99), 3),
            "first_second_max_ms": round(e[-1], 3) if e else 0, "starts_ms": round(makespan, 1)}


def parallel(calls):
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


bursts = {"ferrovirtd": [], "libvirtd": []}


def fv_burst():
    http = cc.FvHttp(SOCK)
    starts = [lambda i=i: api("POST", f"/v1/domains/burst{i}/start") for i in range(BURST)]
    r = burst(lambda: http.request("GET", cc.LIST_PATH), starts)
    http.close()
    print(f"  ferrovirtd: 10 starts in {r['starts_ms']:.0f} ms; list during them p50 {r['list_p50_ms']:.2f} ms"
          f" p99 {r['list_p99_ms']:.2f} ms max {r['list_max_ms']:.2f} ms ({r['list_requests']} lists);"
          f" first second p50 {r['first_second_p50_ms']:.2f} p99 {r['first_second_p99_ms']:.2f}"
          f" max {r['first_second_max_ms']:.2f} ms", flush=True)
    bursts["ferrovirtd"].append(r)
    parallel([lambda i=i: api("POST", f"/v1/domains/burst{i}/destroy") for i in range(BURST)])
    wait_no_vms("burst")


def lv_burst():
    conns = [libvirt.open(URI) for _ in range(BURST)]
    doms = [conns[i].lookupByName(f"lvburst{i}") for i in range(BURST)]
    lister = libvirt.open(URI)
    r = burst(lambda: lister.listAllDomains(0), [d.create for d in doms])
    print(f"  libvirtd:   10 starts in {r['starts_ms']:.0f} ms; list during them p50 {r['list_p50_ms']:.2f} ms"
          f" p99 {r['list_p99_ms']:.2f} ms max {r['list_max_ms']:.2f} ms ({r['list_requests']} lists);"
          f" first second p50 {r['first_second_p50_ms']:.2f} p99 {r['first_second_p99_ms']:.2f}"
          f" max {r['first_second_max_ms']:.2f} ms", flush=True)
    bursts["libvirtd"].append(r)
    parallel([d.destroy for d in doms])
    wait_no_vms("lvburst")
    for c in conns + [lister]:
        c.close()


for r in range(ROUNDS):
    alternate(r, fv_burst, lv_burst if LV_PID else None)
results["list during 10 starts"] = {
    side: {k: round(statistics.median(x[k] for x in rs), 2) for k in rs[0]} | {"rounds": rs}
    for side, rs in bursts.items() if rs}
note_load("after list during starts")

# --- 4. clean up, then RSS when idle again ---
for i in range(BURST):
    api("DELETE", f"/v1/domains/burst{i}")
api("DELETE", "/v1/domains/bench-q")
for i in range(10):
    api("DELETE", f"/v1/domains/idle{i}")
if LV_PID:
    for name in ["lv-q"] + [f"lvidle{i}" for i in range(10)] + [f"lvburst{i}" for i in range(BURST)]:
        run(*VIRSH, "undefine", name)
time.sleep(2)
results["ferrovirtd_idle_rss_kib_after_load"] = rss_kib(FV_PID)
if LV_PID:
    results["libvirtd_idle_rss_kib_after_load"] = rss_kib(LV_PID)
# Past tokio's 10 s keep-alive of idle blocking-pool threads.
time.sleep(13)
results["ferrovirtd_idle_rss_kib_15s_after_load"] = rss_kib(FV_PID)
if LV_PID:
    results["libvirtd_idle_rss_kib_15s_after_load"] = rss_kib(LV_PID)
for k in [k for k in results if "rss" in k]:
    print(f"{k:<40} {results[k] / 1024:.1f} MiB")

with open(os.path.join(os.environ.get("BENCH_OUT", WORK), "results.json"), "w") as f:
    json.dump(results, f, indent=1)
