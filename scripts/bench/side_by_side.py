#!/usr/bin/env python3
"""Times sentence-transformers' CrossEncoder (torch fp32 and bf16) and running rerank-server(s) on identical
(query, document) pairs in one process, and prints pairs/s, the ratios and the largest score differences.

    python3 scripts/bench/side_by_side.py --model models/minilm-reranker --server fp32=127.0.0.1:50051 \
        [--server bf16=127.0.0.1:50052] [--rounds 3]

The pairs: `--requests` queries of 16 words, each with `--documents` documents of 32..480 words drawn from the
whole-word entries of the model directory's vocabulary (seeded). CrossEncoder.predict runs them with batch size
32; each server gets the same requests from `--clients` concurrent gRPC clients. Systems alternate round by
round so that drift of a shared machine falls on all of them; each figure is the median round.
"""
import argparse
import json
import pathlib
import random
import statistics
import threading
import sys
import time

import grpc
import torch
from sentence_transformers import CrossEncoder

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lib"))
from rerank_grpc import Api, connect  # noqa: E402

WORDS_FALLBACK = "market river city bread fish fruit people sell old new north south trade history bridge".split()


def vocabulary_words(model_dir: pathlib.Path) -> list:
    """Alphabetic whole words of the model's WordPiece vocabulary (or a small fallback list)."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]
        if len(words) > 1000:
            return sorted(words)
    return WORDS_FALLBACK


def make_requests(words: list, requests: int, documents: int, seed: int) -> list:
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    return [(text(16), [text(rng.randint(32, 480)) for _ in range(documents)]) for _ in range(requests)]


class Server:
    """A rerank-server reached through gRPC reflection (no generated stubs)."""

    def __init__(self, address: str):
        self.api = Api(connect(address))

    def scores(self, query: str, documents: list) -> list:
        return self.api.scores(query, documents, timeout=600)

    def run(self, requests: list, clients: int) -> tuple:
        """Sends every request from `clients` threads; returns (seconds, scores per request)."""
        results = [None] * len(requests)
        next_request = iter(range(len(requests)))
        lock = threading.Lock()
        errors = []

        def client():
            while True:
                with lock:
                    i = next(next_request, None)
                if i is None:
                    return
                try:
                    results[i] = self.scores(*requests[i])
                except grpc.RpcError as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise SystemExit(f"server call failed: {errors[0]}")
        return elapsed, results


def crossencoder_run(model: CrossEncoder, requests: list) -> tuple:
    pairs = [(q, d) for q, docs in requests for d in docs]
    started = time.perf_counter()
    scores = model.predict(pairs, batch_size=32, show_progress_bar=False, convert_to_numpy=True)
    elapsed = time.perf_counter() - started
    flat = [float(s) for s in scores]
    out, at = [], 0
    for _, docs in requests:
        out.append(flat[at:at + len(docs)])
        at += len(docs)
    return elapsed, out


def max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=pathlib.Path)
    parser.add_argument("--server", action="append", default=[], help="label=host:port, repeatable")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-bf16", action="store_true", help="skip CrossEncoder bf16")
    args = parser.parse_args()

    # GTE multilingual's and jina-reranker-v2's architectures are remote code on the Hub: CrossEncoder loads the
    # written-out copies.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fixtures"))
    model_type = json.loads((args.model / "config.json").read_text()).get("model_type")
    if model_type == "new":
        import gte_reference
        gte_reference.register()
    elif model_type == "jina-xlm-roberta-flash-reference":
        import jina_reference
        jina_reference.register()
    requests = make_requests(vocabulary_words(args.model), args.requests, args.documents, args.seed)
    pairs = sum(len(d) for _, d in requests)
    systems = {"CrossEncoder fp32": CrossEncoder(str(args.model), device="cpu")}
    if not args.no_bf16:
        bf16 = CrossEncoder(str(args.model), device="cpu")
        bf16.model.to(torch.bfloat16)
        systems["CrossEncoder bf16"] = bf16
    servers = {}
    for spec in args.server:
        label, address = spec.split("=", 1)
        servers[f"ours {label}"] = Server(address)

    warm = [(requests[0][0], requests[0][1][:8])]
    for model in systems.values():
        crossencoder_run(model, warm)
    for server in servers.values():
        server.run(warm, 1)

    times = {name: [] for name in [*systems, *servers]}
    scores = {}
    for _ in range(args.rounds):
        for name, model in systems.items():
            elapsed, scores[name] = crossencoder_run(model, requests)
            times[name].append(elapsed)
        for name, server in servers.items():
            elapsed, scores[name] = server.run(requests, args.clients)
            times[name].append(elapsed)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {pairs} pairs "
          f"({args.requests} queries x {args.documents} documents of 32..480 words), {args.rounds} rounds, "
          f"median round")
    reference = "CrossEncoder fp32"
    rates = {name: pairs / statistics.median(t) for name, t in times.items()}
    print(f"| system | pairs/s | vs CrossEncoder fp32 | vs CrossEncoder bf16 | max abs score diff vs fp32 |")
    print(f"|---|---|---|---|---|")
    for name, rate in rates.items():
        vs_bf16 = f"{rate / rates['CrossEncoder bf16']:.2f}x" if "CrossEncoder bf16" in rates else "-"
        print(f"| {name} | {rate:.1f} | {rate / rates[reference]:.2f}x | {vs_bf16} | "
              f"{max_diff(scores[name], scores[reference]):.2e} |")


if __name__ == "__main__":
    main()
