#!/usr/bin/env python3
"""The same rerank requests through gRPC and through each HTTP/JSON API of one running server, alternating,
so both see the same machine state: latency (p50/p99) of a small request (what the transport costs) and of a
100-document request (where the model dominates), and whether every transport returns identical scores.

    pip install grpcio grpcio-reflection protobuf
    python3 scripts/bench/http_vs_grpc.py localhost:50051 [ROUNDS]
"""
import http.client
import json
import statistics
import sys
import time

import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lib"))
from rerank_grpc import Api, connect  # noqa: E402

WORDS = ("the river flows through the old city past the market where people sell bread fish and fruit "
         "while the harbour wall was rebuilt after the storm").split()


def documents(count):
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(32 + (i * 37) % 160)) for i in range(count)]


def grpc_call(address):
    api = Api(connect(address))

    def call(query, docs):
        response = api.rerank(api.RerankRequest(query=query, documents=docs))
        return [(r.index, r.score) for r in response.results]
    return call


def http_call(address, path, body_of, results_of):
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port))  # kept alive across calls

    def call(query, docs):
        connection.request("POST", path, body=json.dumps(body_of(query, docs)),
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {payload}")
        return results_of(payload)
    return call


def transports(address):
    cohere = lambda q, d: {"query": q, "documents": d}  # noqa: E731
    relevance = lambda p: [(r["index"], r["relevance_score"]) for r in p["results"]]  # noqa: E731
    return {
        "gRPC Rerank": grpc_call(address),
        "HTTP /v2/rerank": http_call(address, "/v2/rerank", cohere, relevance),
        "HTTP /v1/rerank": http_call(address, "/v1/rerank", cohere, relevance),
        "HTTP /rerank (TEI)": http_call(address, "/rerank", lambda q, d: {"query": q, "texts": d},
                                        lambda p: [(r["index"], r["score"]) for r in p]),
    }


def measure(calls, query, docs, rounds):
    times = {name: [] for name in calls}
    answers = {}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            answers[name] = call(query, docs)
            times[name].append(time.perf_counter() - started)
    return times, answers


def main(address, rounds):
    calls = transports(address)
    query = "where do people sell fish in the old city"
    for label, docs, count in [("2 short documents", ["fish market", "the old city"], rounds * 5),
                               ("100 documents of 32..190 words", documents(100), rounds)]:
        measure(calls, query, docs, 1)  # warm connections and caches
        times, answers = measure(calls, query, docs, count)
        print(f"\n{label}, {count} calls each, alternating:")
        print(f"  {'transport':<20} {'p50 ms':>9} {'p99 ms':>9}")
        for name, samples in times.items():
            samples = sorted(samples)
            p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
            print(f"  {name:<20} {statistics.median(samples) * 1e3:9.2f} {p99 * 1e3:9.2f}")
        reference = answers["gRPC Rerank"]
        for name, answer in answers.items():
            same = [i for i, _ in answer] == [i for i, _ in reference] and all(
                abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(answer, reference))
            print(f"  {name}: {'same order and scores as gRPC' if same else 'DIFFERS from gRPC'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "localhost:50051", int(sys.argv[2]) if len(sys.argv) > 2 else 10)
