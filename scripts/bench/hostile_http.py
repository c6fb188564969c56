#!/usr/bin/env python3
"""Hostile clients against ONE running rerank-server, measured (nothing is asserted; the tests in tests/hostile.rs
assert the behaviours): stalled request bodies, one client opening hundreds of streams, 10,001 connections, and
thousands of malformed bodies with the server's memory before and after. Prints one line per scenario.

    python3 scripts/bench/hostile_http.py --addr 127.0.0.1:50051 --pid <server pid> --stubs DIR [--only NAME ...]

--stubs: the folder `python -m grpc_tools.protoc -Iproto --python_out=DIR --grpc_python_out=DIR
proto/rerank/v1/rerank.proto` wrote into (scripts/checks/fleet-check.sh makes one in .ci-cache/fleet-venv/stubs).
The well-behaved client of each scenario connects from 127.0.0.2, the hostile one from 127.0.0.1, so the server
sees two clients (max_client_share applies per client address).

Scenarios:
  stalled_bodies    512 HTTP/1.1 connections send headers announcing a 100 kB body, 10 bytes of it, and stall;
                    then 20 calls from the other client; then how the stalled ones end.
  stream_hog        one client opens 6 connections x 100 RerankStreams, each sends `start` and nothing more;
                    how many the server holds, how many it refuses, and 20 calls from the other client.
  connections       10,000 keep-alive connections each make one request and stay open; the 10,001st; then
                    requests on 200 of the 10,000.
  malformed_bodies  2,000 of each of 11 malformed bodies (200 connections at a time); statuses, and the server's
                    RSS before and after.
"""
import argparse
import asyncio
import json
import random
import statistics
import sys
import time

GOOD, HOSTILE = "127.0.0.2", "127.0.0.1"


def rss_kb(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def post_bytes(path, body, extra=""):
    return (f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def http_call(addr, body, local=GOOD):
    host, port = addr
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
    writer.write(post_bytes("/v2/rerank", body))
    status, _ = await read_response(reader)
    writer.close()
    return status, time.monotonic() - started


def rerank_body(documents=8):
    rng = random.Random(3)
    words = "harbour market river city bread fish fruit old new north trade bridge winter price".split()
    return json.dumps({"query": "old harbour market",
                       "documents": [" ".join(rng.choice(words) for _ in range(40)) for _ in range(documents)]}).encode()


def summary(latencies):
    latencies = sorted(latencies)
    return f"p50 {ms(statistics.median(latencies))}, max {ms(latencies[-1])}"


async def stalled_bodies(ctx):
    stalled = []
    for _ in range(512):
        reader, writer = await asyncio.open_connection(ctx.host, ctx.port, local_addr=(HOSTILE, 0))
        writer.write(b"POST /v2/rerank HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000\r\n\r\n{\"query\": ")
        stalled.append((reader, writer, time.monotonic()))
    await asyncio.sleep(0.5)
    body = rerank_body()
    results = [await http_call((ctx.host, ctx.port), body) for _ in range(20)]
    statuses = sorted({status for status, _ in results})
    out(f"stalled_bodies: 512 stalled bodies open; 20 HTTP calls from another client: statuses {statuses}, "
        f"{summary([t for _, t in results])}")

    async def ending(reader, started):
        try:
            status, _ = await asyncio.wait_for(read_response(reader), 120)
            closed = await asyncio.wait_for(reader.read(1), 120) == b""
            return status, time.monotonic() - started, closed
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return None, time.monotonic() - started, True

    ends = await asyncio.gather(*(ending(r, t) for r, _, t in stalled))
    counts = {}
    for status, _, _ in ends:
        counts[status] = counts.get(status, 0) + 1
    out(f"    the 512 stalled: statuses {counts}, answered after {summary([t for _, t, _ in ends])}, "
        f"{sum(c for _, _, c in ends)} closed by the server")
    for _, writer, _ in stalled:
        writer.close()


async def stream_hog(ctx):
    import grpc
    channels = [grpc.aio.insecure_channel(f"{ctx.host}:{ctx.port}",
                                          options=[("grpc.default_authority", "rerank"), ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(6)]
    start = ctx.pb.RerankStreamRequest(start=ctx.pb.RerankStart(query="harbour"))
    release = asyncio.Event()
    outcomes = {}

    async def requests():
        yield start
        await release.wait()

    async def hog(channel):
        call = ctx.grpc.RerankerServiceStub(channel).RerankStream(requests(), timeout=120)
        try:
            async for _ in call:
                pass
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        outcomes[code] = outcomes.get(code, 0) + 1

    tasks = [asyncio.create_task(hog(channels[i % 6])) for i in range(600)]
    await asyncio.sleep(3)
    held = ctx.metric("rerank_calls_in_progress")
    refused_share = ctx.metric('rerank_admission_refusals_total{reason="client_share"}')
    body = rerank_body()
    results = [await http_call((ctx.host, ctx.port), body) for _ in range(20)]
    statuses = sorted({status for status, _ in results})
    out(f"stream_hog: 600 streams (6 connections x 100) started by one client: the server holds {held:.0f} "
        f"calls, {refused_share:.0f} refused for its share so far; 20 HTTP calls from another client: statuses "
        f"{statuses}, {summary([t for _, t in results])}")
    release.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out(f"    the hog's stream outcomes before it gave up: {outcomes}")
    for channel in channels:
        await channel.close()


async def connections(ctx):
    opened = []
    health = b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
    started = time.monotonic()
    async def answered(reader):
        try:
            return (await read_response(reader))[0]
        except (ConnectionError, asyncio.IncompleteReadError):
            return "closed"

    outcomes = {}
    for batch in range(0, 10_000, 500):
        pending = []
        for _ in range(500):
            reader, writer = await asyncio.open_connection(ctx.host, ctx.port, local_addr=(HOSTILE, 0))
            writer.write(health)
            pending.append((reader, writer))
        for status in await asyncio.gather(*(answered(r) for r, _ in pending)):
            outcomes[status] = outcomes.get(status, 0) + 1
        opened.extend(pending)
    async def metric(name):
        # Over a connection already open: with 10,000 open, a new one is refused.
        reader, writer = opened[0]
        writer.write(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
        _, body = await read_response(reader)
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    out(f"connections: 10,000 keep-alive connections opened in {time.monotonic() - started:.1f} s, answers "
        f"{outcomes}; open at the server {await metric('rerank_connections_open'):.0f}; server RSS "
        f"{rss_kb(ctx.pid)} kB")
    surplus_started = time.monotonic()
    reader, writer = await asyncio.open_connection(ctx.host, ctx.port, local_addr=(GOOD, 0))
    writer.write(health)
    try:
        data = await asyncio.wait_for(reader.read(100), 10)
        fate = "closed at once" if data == b"" else f"answered {data[:12]!r}"
    except (ConnectionError, asyncio.TimeoutError) as error:
        fate = f"reset ({type(error).__name__})"
    out(f"    the 10,001st connection: {fate} after {ms(time.monotonic() - surplus_started)}")
    sample = random.Random(1).sample(opened, 200)
    latencies, served = [], 0
    for reader, writer in sample:
        t = time.monotonic()
        writer.write(health)
        if await answered(reader) == 200:
            served += 1
            latencies.append(time.monotonic() - t)
    out(f"    200 requests on the first 10,000: {served} answered 200, {summary(latencies)}; refused connections: "
        f"{await metric('rerank_connections_refused_total'):.0f}")
    for _, writer in opened:
        writer.close()


MALFORMED = {
    "malformed JSON": b'{"query": "q", "documents": [',
    "wrong types": b'{"query": 5, "documents": "a"}',
    "invalid UTF-8": b'{"query": "\xff\xfe", "documents": ["a"]}',
    "deep nesting": b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b', "query": "q", "documents": ["a"]}',
    "huge number": b'{"query": "q", "documents": ["a"], "top_n": 1e400}',
    "integer past u64": b'{"query": "q", "documents": ["a"], "top_n": 99999999999999999999999}',
    "duplicate keys": b'{"query": "q", "query": "r", "documents": ["a"]}',
    "empty documents": b'{"query": "q", "documents": []}',
    "over max_message_bytes": b'{"query": "' + b"q" * (40 << 20) + b'"}',
    "unknown model": b'{"model": "other", "query": "q", "documents": ["a"]}',
    "unknown fields": b'{"query": "q", "documents": ["a"], "return_citations": true, "x": {"y": [1]}}',
}
# Sent with Transfer-Encoding: chunked, so the server learns only as it reads that the body is too large.
CHUNKED = {"chunked past max_message_bytes": b"q" * (40 << 20)}


def chunked_bytes(path, body, chunk=1 << 20):
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    parts = [head.encode()]
    for i in range(0, len(body), chunk):
        piece = body[i:i + chunk]
        parts.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


async def malformed_bodies(ctx):
    before = rss_kb(ctx.pid)
    statuses = {}
    cases = [(name, post_bytes("/v2/rerank", body)) for name, body in MALFORMED.items()]
    cases += [(name, chunked_bytes("/v2/rerank", body)) for name, body in CHUNKED.items()]
    for name, request in cases:
        count = 20 if len(request) > 1 << 20 else 2000

        async def one():
            try:
                reader, writer = await asyncio.open_connection(ctx.host, ctx.port, local_addr=(HOSTILE, 0))
                writer.write(request)
                status, reply = await read_response(reader)
                writer.close()
                json.loads(reply)
                return status
            except (ConnectionError, asyncio.IncompleteReadError):
                return "closed"

        seen = {}
        for batch in range(0, count, 200):
            for status in await asyncio.gather(*(one() for _ in range(min(200, count - batch)))):
                seen[status] = seen.get(status, 0) + 1
        statuses[name] = (count, seen, rss_kb(ctx.pid))
    out("malformed_bodies: case: sent -> answers, server RSS after the case")
    for name, (count, seen, rss) in statuses.items():
        out(f"    {name}: {count} -> {json.dumps(seen)}, RSS {rss} kB")
    after = rss_kb(ctx.pid)
    out(f"    server RSS {before} kB before, {after} kB after ({after - before:+d} kB); server healthy: "
        f"{(await http_call((ctx.host, ctx.port), rerank_body()))[0]}")


SCENARIOS = {"stalled_bodies": stalled_bodies, "stream_hog": stream_hog, "connections": connections,
             "malformed_bodies": malformed_bodies}


def out(line):
    print(line, flush=True)


class Context:
    def __init__(self, args):
        self.host, port = args.addr.rsplit(":", 1)
        self.port = int(port)
        self.pid = args.pid
        sys.path.insert(0, args.stubs)
        from rerank.v1 import rerank_pb2, rerank_pb2_grpc
        self.pb, self.grpc = rerank_pb2, rerank_pb2_grpc

    def metric(self, sample):
        import urllib.request
        text = urllib.request.urlopen(f"http://{self.host}:{self.port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--stubs", required=True)
    parser.add_argument("--only", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    ctx = Context(args)
    for name in args.only:
        await SCENARIOS[name](ctx)


if __name__ == "__main__":
    asyncio.run(main())
