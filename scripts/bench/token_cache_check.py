#!/usr/bin/env python3
"""What the document token cache saves: the same request (a query and N documents) sent again and again to
one or more running servers, alternating between them, printing the median tokenization time the server
reports (usage.tokenize_ns) for the first call and for the repeats, and the total time.

    pip install grpcio grpcio-reflection protobuf
    python3 scripts/bench/token_cache_check.py cache=localhost:50051 nocache=localhost:50052 [--documents 32 --rounds 10]

Start one server with the default token_cache_bytes and one with RERANK_TOKEN_CACHE_BYTES=0 for the comparison.
"""
import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lib"))
from rerank_grpc import Api, connect  # noqa: E402

WORDS = ("the river flows through the old city past the market where people sell bread fish and fruit while "
         "the harbour wall was rebuilt after the storm and visitors came from the north and the south").split()


def rerank_call(address):
    api = Api(connect(address))
    return lambda query, docs: api.rerank(api.RerankRequest(query=query, documents=docs)).usage


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("servers", nargs="+", help="label=host:port")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    docs = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(200 + i)) for i in range(args.documents)]
    calls = {label: rerank_call(address) for label, address in (s.split("=", 1) for s in args.servers)}
    first = {label: call("where is the market", docs) for label, call in calls.items()}
    repeats = {label: [] for label in calls}
    for _ in range(args.rounds):
        for label, call in calls.items():
            repeats[label].append(call("where is the market", docs))
    print(f"{args.documents} documents of 200..{199 + args.documents} words, {args.rounds} repeats each, alternating")
    print(f"{'server':<12} {'first tokenize ms':>18} {'repeat tokenize ms':>19} {'repeat total ms':>16}")
    for label in calls:
        tokenize = statistics.median(u.tokenize_ns for u in repeats[label]) / 1e6
        total = statistics.median(u.total_ns for u in repeats[label]) / 1e6
        print(f"{label:<12} {first[label].tokenize_ns / 1e6:18.2f} {tokenize:19.2f} {total:16.2f}")


if __name__ == "__main__":
    main()
