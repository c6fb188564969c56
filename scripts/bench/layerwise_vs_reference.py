#!/usr/bin/env python3
"""Times bge-reranker-v2-minicpm-layerwise's scoring as FlagEmbedding's LayerWiseFlagLLMReranker runs it (its
inputs and batching reproduced with transformers over scripts/fixtures/minicpm_reference.py, torch fp32 and bf16)
and a running rerank-server on identical (query, passage) pairs in one process; prints pairs/s, the ratios and
the largest score differences from the reference fp32.

    python3 scripts/bench/layerwise_vs_reference.py --model models/minicpm-layerwise-reranker \
        --server fp32=127.0.0.1:50091 [--cutoff-layer 28] [--rounds 2] [--requests 1 --documents 6]

The pairs: `--requests` queries of 16 words, each with `--documents` passages of 32..320 words from the tokenizer's
one-token words (seeded). The reference: BOS + "A: {query}" (at most 384 tokens), "\\n" + "B: {passage}" (at most
512), the pair cut from the passage's end, then "\\n" and the question (FlagEmbedding's defaults: max_length 512);
batches of `--batch` pairs sorted by length, left-padded; the score is the cutoff layer's logit at the last
position, compared as its sigmoid with the server's score. The server runs with its defaults (no max_length), which
give FlagEmbedding's limits, and stops at the same layer. Systems alternate round by round; each figure is the
median round.
"""
import argparse
import pathlib
import random
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fixtures"))
import minicpm_reference  # noqa: E402
from decoder_vs_transformers import one_token_words  # noqa: E402
from side_by_side import Server, max_diff  # noqa: E402

TASK = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by providing "
        "a prediction of either 'Yes' or 'No'.")
MAX_LENGTH = 512


class Reference:
    """FlagEmbedding's layerwise reranker inputs and batching, over the written-out architecture."""

    def __init__(self, model_dir: pathlib.Path, dtype, batch: int, layer: int):
        minicpm_reference.register()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        ids = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.sep, self.task = ids("\n"), ids(TASK)
        self.batch, self.layer = batch, layer

    def encode(self, query: str, passage: str) -> list:
        tok = lambda text, limit: self.tokenizer(text, add_special_tokens=False, max_length=limit,
                                                 truncation=True)["input_ids"]
        first = [self.tokenizer.bos_token_id] + tok(f"A: {query}", MAX_LENGTH * 3 // 4)
        second = self.sep + tok(f"B: {passage}", MAX_LENGTH)
        overflow = max(0, len(first) + len(second) - (MAX_LENGTH + len(self.sep) + len(self.task)))
        return first + second[:len(second) - overflow] + self.sep + self.task

    def scores(self, pairs: list) -> list:
        rows = [self.encode(q, p) for q, p in pairs]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, cutoff_layers=[self.layer])[0][:, -1]
        return torch.sigmoid(logits.float()).tolist()

    def run(self, requests: list) -> tuple:
        pairs = [(q, d) for q, docs in requests for d in docs]
        # FlagEmbedding sorts by length before it batches, and puts the scores back in order.
        order = sorted(range(len(pairs)), key=lambda i: -len(self.encode(*pairs[i])))
        started = time.perf_counter()
        flat = [0.0] * len(pairs)
        for at in range(0, len(order), self.batch):
            chunk = order[at:at + self.batch]
            for i, score in zip(chunk, self.scores([pairs[i] for i in chunk])):
                flat[i] = score
        elapsed = time.perf_counter() - started
        out, at = [], 0
        for _, docs in requests:
            out.append(flat[at:at + len(docs)])
            at += len(docs)
        return elapsed, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=pathlib.Path)
    parser.add_argument("--server", action="append", default=[], help="label=host:port, repeatable")
    parser.add_argument("--cutoff-layer", type=int, default=28)
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--documents", type=int, default=6)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-bf16", action="store_true", help="skip the reference in bf16")
    args = parser.parse_args()

    systems = {"reference fp32": Reference(args.model, torch.float32, args.batch, args.cutoff_layer)}
    if not args.no_bf16:
        systems["reference bf16"] = Reference(args.model, torch.bfloat16, args.batch, args.cutoff_layer)
    words = one_token_words(systems["reference fp32"].tokenizer)
    rng = random.Random(args.seed)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    requests = [(text(16), [text(rng.randint(32, 320)) for _ in range(args.documents)])
                for _ in range(args.requests)]
    pairs = sum(len(d) for _, d in requests)
    tokens = sum(len(systems["reference fp32"].encode(q, d)) for q, docs in requests for d in docs)
    servers = {f"ours {label}": Server(address) for label, address in (s.split("=", 1) for s in args.server)}

    warm = [(requests[0][0], requests[0][1][:1])]
    for system in systems.values():
        system.run(warm)
    for server in servers.values():
        server.run(warm, 1)
    times = {name: [] for name in [*systems, *servers]}
    scores = {}
    for _ in range(args.rounds):
        for name, system in systems.items():
            elapsed, scores[name] = system.run(requests)
            times[name].append(elapsed)
        for name, server in servers.items():
            elapsed, scores[name] = server.run(requests, args.clients)
            times[name].append(elapsed)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {pairs} pairs ({args.requests} queries x "
          f"{args.documents} passages of 32..320 words, {tokens / pairs:.0f} tokens a pair), cutoff layer "
          f"{args.cutoff_layer}, {args.rounds} rounds, median round")
    reference = "reference fp32"
    rates = {name: pairs / statistics.median(t) for name, t in times.items()}
    print("| system | pairs/s | vs reference fp32 | vs reference bf16 | max abs score diff vs fp32 |")
    print("|---|---|---|---|---|")
    for name, rate in rates.items():
        vs_bf16 = f"{rate / rates['reference bf16']:.2f}x" if "reference bf16" in rates else "-"
        print(f"| {name} | {rate:.3f} | {rate / rates[reference]:.2f}x | {vs_bf16} | "
              f"{max_diff(scores[name], scores[reference]):.2e} |")


if __name__ == "__main__":
    main()
