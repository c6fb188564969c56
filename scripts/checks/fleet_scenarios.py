#!/usr/bin/env python3
"""Fleet check: rerank-server replicas, each in its own network namespace with its own address, behind HAProxy
(deploy/haproxy/haproxy.cfg, unchanged), under steady load of unary gRPC, RerankStream and HTTP calls; then
rolling restart, kill -9, a partition, overload across the fleet, and clients that balance themselves (grpcio
with a service config, over fixed addresses and over DNS while a replica is added). Every call's outcome is
counted; each scenario's criteria are checked and the script exits 1 if one fails.

Run through scripts/checks/fleet-check.sh (root; it installs HAProxy and dnsmasq, builds the binaries and the Python
client's venv). Writes its report (JSON and a Markdown table) to --out.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NET = "10.77.0"
BALANCER_IP = f"{NET}.254"
BRIDGE = "rrfleet0"
PORT = 50051


def now_ms():
    return int(time.time() * 1000)


def run(*command, check=True):
    return subprocess.run(command, check=check, capture_output=True, text=True)


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, OSError):
        return None, ""


def dns_answers(name, server=("127.0.0.1", 5353)):
    """How many A records `server` returns for `name` (0 when it does not answer)."""
    question = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    query = struct.pack(">HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.sendto(query, server)
            answer = sock.recv(4096)
        except OSError:
            return 0
    return struct.unpack(">H", answer[6:8])[0] if len(answer) >= 12 else 0


def wait_until(what, condition, timeout, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Replica:
    def __init__(self, fleet, index):
        self.fleet, self.index = fleet, index
        self.name, self.ns, self.ip = f"r{index}", f"rrfleet{index}", f"{NET}.{index}"
        self.proc = None
        self.log = open(os.path.join(fleet.out, f"replica-{index}.log"), "ab")

    def create_namespace(self):
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", f"{self.ns}h", "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        run("ip", "link", "set", f"{self.ns}h", "master", BRIDGE, "up")
        run("ip", "-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run("ip", "-n", self.ns, "link", "set", "eth0", "up")
        run("ip", "-n", self.ns, "link", "set", "lo", "up")

    def start(self):
        env = dict(os.environ, **self.fleet.replica_env, RERANK_HOST=self.ip, RERANK_PORT=str(PORT))
        # `ip netns exec` execs the server in the namespace: the pid is the server's.
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, self.fleet.server_bin], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def health(self):
        return http_get(f"http://{self.ip}:{PORT}/health", timeout=1.0)[0]

    def wait_serving(self, timeout=120):
        wait_until(f"{self.name} SERVING", lambda: self.health() == 200, timeout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=60):
        return self.proc.wait(timeout=timeout)

    def link(self, state):
        run("ip", "-n", self.ns, "link", "set", "eth0", state)

    def grpc_calls(self):
        """Unary gRPC calls this replica has answered (any outcome), from its /metrics."""
        status, text = http_get(f"http://{self.ip}:{PORT}/metrics")
        if status != 200:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('rerank_requests_total{endpoint="grpc",'))


class Fleet:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        shutil.rmtree(self.out, ignore_errors=True)
        os.makedirs(self.out)
        self.server_bin, self.load_bin = args.server, args.fleetload
        self.replica_env = {
            "RERANK_MODEL_ID": os.path.join(ROOT, "tests/fixtures/bert-tiny-1label"),
            "RERANK_THREADS": "1",
            "RERANK_TOKENIZER_WORKERS": "1",
            "RERANK_TRUSTED_PROXIES": f'["{BALANCER_IP}"]',
            "RERANK_DRAIN_DELAY": args.drain_delay,
            "RERANK_MAX_CONNECTION_AGE": args.max_connection_age,
            "RUST_LOG": os.environ.get("FLEET_RUST_LOG", "info"),
        }
        self.replicas = {i: Replica(self, i) for i in range(1, 5)}
        self.haproxy = None
        self.dnsmasq = None
        self.hosts_file = os.path.join(self.out, "fleet.hosts")
        self.stats_socket = os.path.join(self.out, "haproxy.sock")
        self.balancer = f"127.0.0.1:{args.balancer_port}"

    # --- network and processes ----------------------------------------------------------------------
    def setup(self):
        self.teardown_network()
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{BALANCER_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for replica in self.replicas.values():
            replica.create_namespace()

    def teardown_network(self):
        for replica in self.replicas.values():
            run("ip", "netns", "del", replica.ns, check=False)
        run("ip", "link", "del", BRIDGE, check=False)

    def teardown(self):
        for process in [self.haproxy, self.dnsmasq] + [r.proc for r in self.replicas.values()]:
            if process and process.poll() is None:
                process.kill()
                process.wait()
        self.teardown_network()

    def start_haproxy(self):
        env = dict(os.environ, LB_BIND=self.balancer, LB_STATS_SOCKET=self.stats_socket,
                   LB_PIDFILE=os.path.join(self.out, "haproxy.pid"),
                   **{f"LB_REPLICA_{i}": f"{NET}.{i}:{PORT}" for i in (1, 2, 3)})
        log = open(os.path.join(self.out, "haproxy.log"), "ab")
        self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", os.path.join(ROOT, "deploy/haproxy/haproxy.cfg")],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until("HAProxy's stats socket", self.stats_answer, 30)

    def stats_answer(self):
        try:
            return bool(self.balancer_states())
        except OSError:
            return False

    def balancer_states(self):
        """Each replica's state as HAProxy sees it (status column of `show stat`: UP, DOWN, UP 1/2, ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.stats_socket)
            sock.sendall(b"show stat replicas 4 -1\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            fields = dict(zip(header, line.split(",")))
            if fields.get("svname", "").startswith("r"):
                states[fields["svname"]] = fields["status"]
        return states

    def wait_balancer(self, name, up, timeout=30):
        """Waits until HAProxy has `name` in rotation (up) or out of it; returns when, in unix ms."""
        in_rotation = lambda: self.balancer_states().get(name, "").startswith("UP")  # noqa: E731
        wait_until(f"HAProxy marks {name} {'UP' if up else 'DOWN'}", lambda: in_rotation() == up, timeout,
                   step=0.02)
        return now_ms()

    def start_dns(self, names):
        self.write_hosts(names)
        self.dnsmasq = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-daemon", "--port=5353", "--listen-address=127.0.0.1",
             "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts_file}",
             "--local-ttl=1", "--log-facility=-", "--user=root"],
            stdout=open(os.path.join(self.out, "dnsmasq.log"), "ab"), stderr=subprocess.STDOUT)
        wait_until("dnsmasq answering", lambda: dns_answers("replicas.fleet") > 0, 10)

    def write_hosts(self, replicas):
        with open(self.hosts_file, "w") as f:
            for index in replicas:
                f.write(f"{NET}.{index} replicas.fleet\n")
        if self.dnsmasq:
            self.dnsmasq.send_signal(signal.SIGHUP)

    # --- load -----------------------------------------------------------------------------------------
    def load(self, name, target=None, **options):
        report = os.path.join(self.out, f"{name}.json")
        command = [self.load_bin, "--target", target or self.balancer, "--report", report,
                   "--duration", "3600s", "--deadline", f"{self.args.deadline}s"]
        for key, value in options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        process = subprocess.Popen(command, stderr=open(os.path.join(self.out, f"{name}.log"), "ab"))
        return Load(process, report)

    def grpc_client(self, name, target, rate):
        report = os.path.join(self.out, f"{name}.json")
        command = [self.args.python, os.path.join(ROOT, "scripts/checks/fleet_grpc_client.py"), "--target", target,
                   "--rate", str(rate), "--duration", "3600", "--deadline", str(self.args.deadline),
                   "--report", report, "--stubs", self.args.stubs]
        process = subprocess.Popen(command, stderr=open(os.path.join(self.out, f"{name}.log"), "ab"))
        return Load(process, report)


class Load:
    def __init__(self, process, report):
        self.process, self.report = process, report
        self.cpu = 0.0

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = 0
        self.cpu = usage.ru_utime + usage.ru_stime
        with open(self.report) as f:
            report = json.load(f)
        began = report["began_unix_ms"]
        return [Call(kind, began + start, began + end, outcome) for kind, start, end, outcome in report["calls"]]


class Call:
    __slots__ = ("kind", "start", "end", "outcome")

    def __init__(self, kind, start, end, outcome):
        self.kind, self.start, self.end, self.outcome = kind, start, end, outcome

    @property
    def ok(self):
        return self.outcome == "ok"

    @property
    def ms(self):
        return self.end - self.start


def cpu_seconds(pid):
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counts(calls):
    table = {}
    for call in calls:
        table.setdefault(call.kind, {}).setdefault(call.outcome, 0)
        table[call.kind][call.outcome] += 1
    return table


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def failures(calls):
    return [c for c in calls if not c.ok]


# --- scenarios ---------------------------------------------------------------------------------------------
def steady_load(fleet, name):
    a = fleet.args
    return fleet.load(name, unary_rate=a.unary_rate, stream_rate=a.stream_rate, http_rate=a.http_rate)


def rolling_restart(fleet):
    """(a) Every replica in turn: SIGTERM, wait for exit, start, wait SERVING and back in rotation."""
    a = fleet.args
    load = steady_load(fleet, "rolling-balancer")
    direct = fleet.grpc_client("rolling-direct", "ipv4:" + ",".join(f"{NET}.{i}:{PORT}" for i in (1, 2, 3)),
                               a.unary_rate)
    time.sleep(a.settle)
    steps = []
    for index in (1, 2, 3):
        replica = fleet.replicas[index]
        began = now_ms()
        replica.signal(signal.SIGTERM)
        out_of_rotation = fleet.wait_balancer(replica.name, up=False)
        code = replica.wait_exit()
        exited = now_ms()
        replica.start()
        replica.wait_serving()
        back = fleet.wait_balancer(replica.name, up=True)
        steps.append({"replica": replica.name, "exit_code": code, "out_of_rotation_ms": out_of_rotation - began,
                      "exited_ms": exited - began, "back_in_rotation_ms": back - began})
        time.sleep(a.settle)
    calls, direct_calls = load.stop(), direct.stop()
    result = {"steps": steps, "balancer": counts(calls), "direct": counts(direct_calls)}
    result["checks"] = {
        "0 failed unary, HTTP or stream calls through HAProxy": not failures(calls),
        "0 failed calls of the grpcio client (round_robin, health checks, retries)": not failures(direct_calls),
        "every replica exited 0": all(s["exit_code"] == 0 for s in steps),
        "each replica out of rotation before its drain_delay ended":
            all(s["out_of_rotation_ms"] < seconds(a.drain_delay) * 1000 for s in steps),
    }
    return result


def kill9(fleet):
    """(b) kill -9 of one replica under load."""
    a = fleet.args
    replica = fleet.replicas[2]
    load = steady_load(fleet, "kill9")
    time.sleep(a.settle)
    killed = now_ms()
    replica.signal(signal.SIGKILL)
    down = fleet.wait_balancer(replica.name, up=False)
    replica.wait_exit()
    time.sleep(a.settle)
    replica.start()
    replica.wait_serving()
    fleet.wait_balancer(replica.name, up=True)
    time.sleep(a.settle)
    calls = load.stop()
    failed = failures(calls)
    # The kernel resets the dead process's connections at once; 100 ms covers the balancer reading the resets.
    late = [c for c in failed if c.start > killed + 100]
    result = {
        "balancer": counts(calls),
        "failed": len(failed),
        "failed_by_kind": counts(failed),
        "out_of_rotation_ms": down - killed,
        "failures_from_kill_ms": [min(c.end for c in failed) - killed, max(c.end for c in failed) - killed]
        if failed else None,
        "calls_started_after_the_kill_that_failed": len(late),
    }
    result["checks"] = {
        "only calls in flight at the kill failed": not late,
        "out of rotation within the check interval (inter + fastinter + timeouts, 3.5 s)": down - killed <= 3500,
        "calls after the kill succeed": all(c.ok for c in calls if c.start > killed + 100),
    }
    return result


def partition(fleet):
    """(c) One replica's link cut under load, then restored."""
    a = fleet.args
    replica = fleet.replicas[3]
    load = steady_load(fleet, "partition")
    time.sleep(a.settle)
    cut = now_ms()
    replica.link("down")
    down = fleet.wait_balancer(replica.name, up=False)
    time.sleep(a.partition_hold)
    restored = now_ms()
    replica.link("up")
    up = fleet.wait_balancer(replica.name, up=True)
    time.sleep(a.settle)
    calls = load.stop()
    failed = failures(calls)
    deadline_ms = a.deadline * 1000
    after_down = [c for c in calls if c.start > down + 500]
    result = {
        "balancer": counts(calls),
        "failed_by_kind": counts(failed),
        "out_of_rotation_ms": down - cut,
        "back_in_rotation_ms": up - restored,
        "longest_call_ms": max(c.ms for c in calls),
        "longest_failed_call_ms": max((c.ms for c in failed), default=0),
    }
    result["checks"] = {
        "no call outlived its deadline (+1 s)": max(c.ms for c in calls) <= deadline_ms + 1000,
        "out of rotation within 5 s of the cut": down - cut <= 5000,
        "back in rotation within 5 s of the link": up - restored <= 5000,
        "calls started after it left rotation succeed": all(c.ok for c in after_down),
    }
    return result


def overload(fleet):
    """(d) Capacity measured closed loop, then 3x that as open-loop arrivals."""
    a = fleet.args
    heavy = {"documents": a.heavy_documents, "min_words": 60, "max_words": 120}
    probe = fleet.load("capacity", closed=a.capacity_workers, **heavy)
    time.sleep(a.overload_seconds)
    calls = probe.stop()
    span = (max(c.end for c in calls) - min(c.start for c in calls)) / 1000
    capacity = sum(c.ok for c in calls) / span
    rate = 3 * capacity
    # Enough HTTP/2 connections that every call in flight has a stream (100 per connection through HAProxy,
    # as through the server itself): a call queued in the client for a stream would time its wait, not the
    # fleet's answer.
    connections = int(rate / 2 * a.deadline / 80) + 1
    load = fleet.load("overload", unary_rate=rate / 2, http_rate=rate / 2, grpc_connections=connections, **heavy)
    servers = [fleet.replicas[i].proc.pid for i in (1, 2, 3)] + [fleet.haproxy.pid]
    cpu_before = [cpu_seconds(pid) for pid in servers]
    time.sleep(a.overload_seconds)
    cpu = [cpu_seconds(pid) - before for pid, before in zip(servers, cpu_before)]
    calls = load.stop()
    ended = [c for c in calls if c.start >= min(x.start for x in calls)]
    span = (max(c.end for c in ended) - min(c.start for c in ended)) / 1000
    goodput = sum(c.ok for c in ended) / span
    refused = [c.ms for c in ended if c.outcome in ("ResourceExhausted", "http_429")]
    admitted = [c for c in ended if c.outcome not in ("ResourceExhausted", "http_429")]
    result = {
        "capacity_calls_per_s": round(capacity, 1),
        "offered_calls_per_s": round(rate, 1),
        "goodput_calls_per_s": round(goodput, 1),
        "goodput_vs_capacity": round(goodput / capacity, 3),
        "outcomes": counts(ended),
        "refusals": len(refused),
        "refusal_p50_ms": percentile(refused, 50),
        "refusal_p99_ms": percentile(refused, 99),
        "ok_p50_ms": percentile([c.ms for c in ended if c.ok], 50),
        "ok_p99_ms": percentile([c.ms for c in ended if c.ok], 99),
        # Admitted (not refused) but not answered OK: a deadline missed while the CPU was shared with the load
        # and the balancer, or a call cut with its connection.
        "admitted_not_ok": len(failures(admitted)),
        "admitted_not_ok_share": round(len(failures(admitted)) / max(1, len(admitted)), 4),
        # Where the 2 cores went during the overload run (CPU seconds).
        "cpu_s": {"replicas": round(sum(cpu[:3]), 1), "haproxy": round(cpu[3], 1), "load": round(load.cpu, 1),
                  "wall": a.overload_seconds},
    }
    result["checks"] = {
        "goodput >= 70% of capacity": goodput >= 0.7 * capacity,
        "refusals p99 <= 250 ms through the balancer": bool(refused) and percentile(refused, 99) <= 250,
    }
    return result


def scale_out(fleet):
    """(e) A grpcio client balancing over DNS (as over a headless Service) while a replica is added: the new
    replica gets calls within max_connection_age, as connections close and the client resolves again."""
    a = fleet.args
    fleet.start_dns([1, 2])
    client = fleet.grpc_client("scale-out", f"dns://127.0.0.1:5353/replicas.fleet:{PORT}", a.unary_rate)
    time.sleep(a.settle)
    newcomer = fleet.replicas[4]
    newcomer.start()
    newcomer.wait_serving()
    before = newcomer.grpc_calls() or 0
    added = now_ms()
    fleet.write_hosts([1, 2, 4])
    age = seconds(a.max_connection_age)
    reached = wait_until("the new replica's first calls", lambda: (newcomer.grpc_calls() or 0) > before,
                         timeout=age * 1.1 + 20, step=0.1)
    first_calls = now_ms()
    time.sleep(a.settle)
    share = (newcomer.grpc_calls() or 0) - before
    calls = client.stop()
    result = {
        "direct": counts(calls),
        "first_calls_after_ms": first_calls - added,
        "max_connection_age_ms": int(age * 1000),
        "calls_on_the_new_replica": share,
    }
    result["checks"] = {
        "the new replica gets calls within max_connection_age (+10% jitter, +2 s to resolve)":
            bool(reached) and first_calls - added <= age * 1100 + 2000,
        "0 failed calls while the fleet grew": not failures(calls),
    }
    newcomer.signal(signal.SIGTERM)
    newcomer.wait_exit()
    return result


def seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60}
    for unit in ("ms", "s", "m"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


SCENARIOS = {
    "rolling_restart": rolling_restart,
    "kill9": kill9,
    "partition": partition,
    "overload": overload,
    "scale_out": scale_out,
}


def markdown(results, args):
    lines = [f"fleet check: 3 replicas (+1 added in scale_out) behind HAProxy, load unary {args.unary_rate}/s, "
             f"streams {args.stream_rate}/s, HTTP {args.http_rate}/s, deadline {args.deadline} s", ""]
    for name, result in results.items():
        lines.append(f"## {name}")
        for key, value in result.items():
            if key != "checks":
                lines.append(f"- {key}: {json.dumps(value)}")
        for check, passed in result.get("checks", {}).items():
            lines.append(f"- [{'PASS' if passed else 'FAIL'}] {check}")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--fleetload", required=True)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--out", default="target/fleet-check")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--balancer-port", type=int, default=18050)
    parser.add_argument("--unary-rate", type=float, default=20)
    parser.add_argument("--stream-rate", type=float, default=2)
    parser.add_argument("--http-rate", type=float, default=20)
    parser.add_argument("--deadline", type=float, default=5)
    parser.add_argument("--settle", type=float, default=3, help="seconds of steady load around each event")
    parser.add_argument("--partition-hold", type=float, default=5)
    parser.add_argument("--overload-seconds", type=float, default=15)
    parser.add_argument("--capacity-workers", type=int, default=12)
    parser.add_argument("--heavy-documents", type=int, default=32)
    parser.add_argument("--drain-delay", default="5s")
    parser.add_argument("--max-connection-age", default="15s")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("fleet check: needs root (network namespaces)")
    for tool in ("haproxy", "dnsmasq", "ip"):
        if not shutil.which(tool):
            sys.exit(f"fleet check: {tool} not found (scripts/checks/fleet-check.sh installs it)")
    fleet = Fleet(args)
    results = {}
    try:
        fleet.setup()
        for index in (1, 2, 3):
            fleet.replicas[index].start()
        for index in (1, 2, 3):
            fleet.replicas[index].wait_serving()
        fleet.start_haproxy()
        for index in (1, 2, 3):
            fleet.wait_balancer(f"r{index}", up=True)
        for name in args.scenarios.split(","):
            print(f"== {name}", flush=True)
            results[name] = SCENARIOS[name](fleet)
            print(json.dumps(results[name], indent=1), flush=True)
    finally:
        fleet.teardown()
        with open(os.path.join(fleet.out, "fleet-report.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(fleet.out, "fleet-report.md"), "w") as f:
            f.write(markdown(results, args))
    print(markdown(results, args))
    failed = [f"{name}: {check}" for name, result in results.items()
              for check, passed in result.get("checks", {}).items() if not passed]
    if failed or len(results) != len(args.scenarios.split(",")):
        print("fleet check FAILED:\n  " + "\n  ".join(failed or ["a scenario did not finish"]))
        sys.exit(1)
    print("fleet check: every criterion holds")


if __name__ == "__main__":
    main()
