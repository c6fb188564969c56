#!/usr/bin/env python3
"""Soak: one release server on the real-size MiniLM model at about 70% of its measured capacity for a long run,
with unary gRPC, streams (some cancelled, some never read), HTTP, and HTTP clients that disconnect mid-call.
Every minute: RSS, open file descriptors, threads, p50/p99 of the calls answered OK, and failures other than the
deliberate ones. Writes soak.json, soak.md (the table) and soak.png (the plot) to --out and exits 1 when a
criterion does not hold:
  - after the first 5 minutes RSS stays within +-10% of its median over those minutes (the band a leak leaves);
  - descriptors and threads flat (no growth from minute 5 to the end beyond a small fixed slack);
  - p99 stable (no minute after the 5th above twice the median of the per-minute p99s);
  - no failure other than the deliberately cancelled, disconnected or unread calls.
The table also gives, per minute, the server's CPU time and the CPU time the hypervisor took from this machine
(steal), so that a slow minute can be told apart from a slow server. The load generator retries a gRPC call
whose first attempt never left it (queued on a connection the server was closing at max_connection_age), as
gRPC clients do; those retries are counted.
Run through scripts/soak.sh.
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

DELIBERATE = {"cancelled_by_client", "unread_dropped"}


def proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def cpu_seconds(pid):
    """The server's CPU time and the machine's steal time so far, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
        steal = int(f.readline().split()[8])
    return (int(fields[11]) + int(fields[12])) / tick, steal / tick


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    wanted = ["avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx2"]
    return model, [f for f in wanted if f in flags]


def fleetload(args, port, report, duration, **options):
    command = [args.fleetload, "--target", f"127.0.0.1:{port}", "--report", report, "--duration", duration,
               "--deadline", "30s", "--documents", str(args.documents), "--min-words", "20", "--max-words", "80"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(command)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--fleetload", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--load", type=float, default=0.7, help="share of the measured capacity")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--port", type=int, default=50081)
    parser.add_argument("--out", default="target/soak")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "server.log"), "w")
    server = subprocess.Popen([args.server, "--model-id", args.model, "--host", "127.0.0.1", "--port",
                               str(args.port)], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, RUST_LOG="warn"))
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        # Capacity: closed loop, unary and HTTP in turn, enough workers to keep the engine busy.
        report = os.path.join(args.out, "capacity.json")
        fleetload(args, args.port, report, "60s", closed=6).wait()
        calls = json.load(open(report))["calls"]
        ok = [c for c in calls if c[3] == "ok"]
        span = (max(c[2] for c in calls) - min(c[1] for c in calls)) / 1000
        capacity = len(ok) / span
        # 70% of it, in units of one call's work: unary 35%, HTTP 35%, streams (3 chunks each) 25%, misbehaving
        # clients 5%.
        units = args.load * capacity
        rates = {
            "unary_rate": 0.35 * units,
            "http_rate": 0.35 * units,
            "stream_rate": 0.25 * units / 3,
            "cancel_rate": 0.02 * units,
            "stream_cancel_rate": 0.01 * units,
            "http_disconnect_rate": 0.02 * units,
            "unread_stream_rate": 1 / 30,
        }
        print(f"soak: capacity {capacity:.1f} calls/s of {args.documents} documents; offering {args.load:.0%}: "
              + ", ".join(f"{k} {v:.2f}/s" for k, v in rates.items()), flush=True)
        report = os.path.join(args.out, "soak-calls.json")
        load = fleetload(args, args.port, report, f"{args.minutes * 60}s", stream_chunks=3, **rates)
        began = time.time()
        samples = []
        while load.poll() is None:
            sample = proc_status(server.pid)
            sample["t"] = time.time() - began
            sample["server_cpu_s"], sample["steal_s"] = cpu_seconds(server.pid)
            sample["refused"] = metric(args.port, "rerank_admission_refusals_total")
            samples.append(sample)
            time.sleep(10)
        cache_hits = metric(args.port, "rerank_token_cache_hits_total")
        cache_misses = metric(args.port, "rerank_token_cache_misses_total")
        stalled = metric(args.port, "rerank_stalled_streams_total")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    data = json.load(open(report))
    minutes = []
    for minute in range(args.minutes):
        window = [c for c in data["calls"] if minute * 60000 <= c[1] < (minute + 1) * 60000]
        answered = [c[2] - c[1] for c in window if c[3] == "ok" and c[0] in ("unary", "http")]
        failed = [c for c in window if c[3] != "ok" and c[3] not in DELIBERATE]
        at = [s for s in samples if minute * 60 <= s["t"] < (minute + 1) * 60] or samples[-1:]
        before = [s for s in samples if s["t"] < minute * 60][-1:] or at[:1]
        minutes.append({
            "minute": minute + 1,
            "rss_mb": round(at[-1]["rss_mb"], 1),
            "fds": at[-1]["fds"],
            "threads": at[-1]["threads"],
            "calls": len(window),
            "ok": sum(c[3] == "ok" for c in window),
            "deliberate": sum(c[3] in DELIBERATE for c in window),
            "failed": len(failed),
            "failures": sorted({c[3] for c in failed}),
            "p50_ms": percentile(answered, 50),
            "p99_ms": percentile(answered, 99),
            "server_cpu_s": round(at[-1]["server_cpu_s"] - before[0]["server_cpu_s"], 1),
            "steal_s": round(at[-1]["steal_s"] - before[0]["steal_s"], 1),
        })
    steady = minutes[5:]
    base = minutes[4]
    rss = statistics.median(m["rss_mb"] for m in steady)
    p99s = [m["p99_ms"] for m in minutes if m["p99_ms"] is not None]
    checks = {
        f"RSS after minute 5 within +-10% of its median ({rss:.1f} MB)":
            all(abs(m["rss_mb"] - rss) <= 0.1 * rss for m in steady),
        "descriptors flat (end <= minute 5 + 8)": steady[-1]["fds"] <= base["fds"] + 8,
        "threads flat (end <= minute 5 + 2)": steady[-1]["threads"] <= base["threads"] + 2,
        "p99 stable (no minute after the 5th above 2x the median p99)":
            all(m["p99_ms"] is None or m["p99_ms"] <= 2 * statistics.median(p99s) for m in steady),
        "0 failures other than the deliberate ones": sum(m["failed"] for m in minutes) == 0,
    }
    model, flags = cpu_flags()
    result = {"capacity_calls_per_s": round(capacity, 2), "load": args.load, "rates": rates,
              "cpu": model, "cpu_features": flags, "cores": os.cpu_count(), "kernel": platform.release(),
              "token_cache": {"configured_bytes": 64 << 20, "hits": cache_hits, "misses": cache_misses},
              "stalled_streams_ended_by_server": stalled,
              "retried_unsent_calls": data.get("unsent_retried", 0), "minutes": minutes, "samples": samples,
              "checks": checks}
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = ["| minute | RSS MB | fds | threads | calls | OK | deliberate | failed | p50 ms | p99 ms | server CPU s | "
             "steal s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in minutes:
        table.append(f"| {m['minute']} | {m['rss_mb']} | {m['fds']} | {m['threads']} | {m['calls']} | {m['ok']} | "
                     f"{m['deliberate']} | {m['failed']} | {m['p50_ms']} | {m['p99_ms']} | {m['server_cpu_s']} | "
                     f"{m['steal_s']} |")
    with open(os.path.join(args.out, "soak.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    plot(result, os.path.join(args.out, "soak.png"))
    print("\n".join(table))
    print(f"gRPC calls retried because their first attempt never left the client: {result['retried_unsent_calls']}; "
          f"streams the server ended for not reading: {stalled:.0f}; token cache (64 MiB): "
          f"{cache_hits:.0f} hits, {cache_misses:.0f} misses")
    for check, passed in checks.items():
        print(f"[{'PASS' if passed else 'FAIL'}] {check}")
    if not all(checks.values()):
        sys.exit(1)


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples, minutes = result["samples"], result["minutes"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples])
    axes[0].set_ylabel("RSS (MB)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(t, [s["fds"] for s in samples], label="open descriptors")
    axes[1].plot(t, [s["threads"] for s in samples], label="threads")
    axes[1].legend()
    axes[1].set_ylim(bottom=0)
    m = [x["minute"] for x in minutes]
    axes[2].plot(m, [x["p50_ms"] for x in minutes], marker="o", label="p50")
    axes[2].plot(m, [x["p99_ms"] for x in minutes], marker="o", label="p99")
    axes[2].set_ylabel("latency of OK calls (ms)")
    axes[2].legend()
    axes[2].set_ylim(bottom=0)
    axes[3].bar(m, [x["ok"] for x in minutes], label="OK")
    axes[3].bar(m, [x["deliberate"] for x in minutes], bottom=[x["ok"] for x in minutes],
                label="cancelled, disconnected or unread by the client")
    axes[3].bar(m, [x["failed"] for x in minutes],
                bottom=[x["ok"] + x["deliberate"] for x in minutes], label="failed")
    axes[3].set_ylabel("calls per minute")
    axes[3].set_xlabel("minute")
    axes[3].legend(loc="lower right")
    fig.suptitle(f"rerank-server soak: MiniLM-L6, {result['load']:.0%} of {result['capacity_calls_per_s']} calls/s, "
                 f"{result['cores']} cores ({', '.join(result['cpu_features'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
