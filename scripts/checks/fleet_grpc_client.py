#!/usr/bin/env python3
"""Client-side balancing without a proxy: plain grpcio with a service config (round_robin over the replicas,
client-side health checking, retries of UNAVAILABLE) sending unary Rerank calls at a steady rate. Every
call's start, end and outcome go to a JSON report in fleetload's format.

    python3 scripts/checks/fleet_grpc_client.py --target ipv4:10.77.0.1:50051,10.77.0.2:50051 --rate 20 \
        --duration 60 --report client.json --stubs DIR
    # DNS, as a headless Kubernetes Service: --target dns://127.0.0.1:5353/replicas.fleet:50051

--stubs is the folder python -m grpc_tools.protoc -Iproto --python_out=DIR --grpc_python_out=DIR
proto/rerank/v1/rerank.proto wrote into. Stops after --duration or on SIGTERM/SIGINT, waits for the calls in flight
(each has a deadline), then writes the report.
"""
import argparse
import json
import random
import signal
import sys
import threading
import time

import grpc

# What a demanding user would configure: round robin over every address the target resolves to, no calls to a
# replica whose health (Watch on rerank.v1.RerankerService) is not SERVING, and a retry on another replica
# when a call meets UNAVAILABLE (a connection closed by a drain, a replica that just went away).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "rerank.v1.RerankerService"},
    "methodConfig": [
        {
            "name": [{"service": "rerank.v1.RerankerService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

WORDS = ("harbour market river city bread fish fruit people sell old new north south trade history bridge "
         "winter summer price quality fresh local famous street morning evening").split()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--report", required=True)
    parser.add_argument("--stubs", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    from rerank.v1 import rerank_pb2, rerank_pb2_grpc  # noqa: E402 (generated at run time)

    options = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # Resolve again soon after a connection closes (max_connection_age), as a DNS-balanced client must.
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
        # An ipv4: target lists several addresses, which would otherwise become the :authority header, and
        # commas are not valid there (HTTP/2 servers reset such streams).
        ("grpc.default_authority", "rerank-server"),
    ]
    channel = grpc.insecure_channel(args.target, options=options)
    stub = rerank_pb2_grpc.RerankerServiceStub(channel)
    rng = random.Random(7)
    began = time.monotonic()
    began_unix_ms = int(time.time() * 1000)
    records, lock, seen = [], threading.Lock(), set()
    in_flight = threading.Semaphore(0)
    started = 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def ms(at):
        return int((at - began) * 1000)

    def done(future, start):
        end = time.monotonic()
        try:
            reply = future.result()
            outcome = "ok" if len(reply.results) == args.documents else "incomplete"
        except grpc.RpcError as error:
            outcome = error.code().name.title().replace("_", "")
            with lock:
                if error.details() not in seen:
                    seen.add(error.details())
                    print(f"fleet_grpc_client: {outcome}: {error.details()}", file=sys.stderr)
        with lock:
            records.append(["unary", ms(start), ms(end), outcome])
        in_flight.release()

    period = 1.0 / args.rate
    next_at = time.monotonic()
    while not stop.is_set() and time.monotonic() - began < args.duration:
        request = rerank_pb2.RerankRequest(
            query=" ".join(rng.choice(WORDS) for _ in range(8)),
            documents=[" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
                       for _ in range(args.documents)],
        )
        start = time.monotonic()
        future = stub.Rerank.future(request, timeout=args.deadline)
        future.add_done_callback(lambda f, start=start: done(f, start))
        started += 1
        next_at += period
        stop.wait(max(0.0, next_at - time.monotonic()))
    stopped_at = ms(time.monotonic())
    for _ in range(started):
        in_flight.acquire(timeout=args.deadline + 5)
    with lock:
        report = {"target": args.target, "deadline_ms": int(args.deadline * 1000), "stopped_at_ms": stopped_at,
                  "began_unix_ms": began_unix_ms, "calls": list(records)}
    with open(args.report, "w") as f:
        json.dump(report, f)
    print(f"fleet_grpc_client: {len(records)} calls recorded in {args.report}", file=sys.stderr)
    channel.close()


if __name__ == "__main__":
    main()
