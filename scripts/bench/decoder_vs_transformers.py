#!/usr/bin/env python3
"""Times Qwen3-Reranker's published scoring code (transformers, torch fp32 and bf16) and a running rerank-server
on identical (query, document) pairs in one process; prints pairs/s, the ratios and the largest score
differences from the reference fp32.

    python3 scripts/bench/decoder_vs_transformers.py --model models/qwen3-0.6b-reranker --server fp32=127.0.0.1:50081 \
        [--server bf16=127.0.0.1:50082] [--rounds 2] [--requests 2 --documents 8]

The pairs: `--requests` queries of 16 words, each with `--documents` documents of 32..480 words, drawn from the
tokenizer's one-token words (seeded). The reference is the model card's code: the prompt, the body truncated to
max_length (8192) less prefix and suffix, left padding, batches of `--batch` pairs, and softmax over the
logits of "no" and "yes" at the last position. Each server gets the same requests from `--clients` gRPC clients.
Systems alternate round by round; each figure is the median round.
"""
import argparse
import pathlib
import random
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from side_by_side import Server, max_diff  # noqa: E402

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MAX_LENGTH = 8192


class Reference:
    """The model card's scoring code, batched with left padding."""

    def __init__(self, model_dir: pathlib.Path, dtype, batch: int):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.prefix = self.tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(SUFFIX, add_special_tokens=False)
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.batch = batch

    def scores(self, pairs: list) -> list:
        texts = [f"<Instruct>: {INSTRUCTION}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        inputs = self.tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=MAX_LENGTH - len(self.prefix) - len(self.suffix))
        inputs["input_ids"] = [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=MAX_LENGTH)
        with torch.inference_mode():
            last = self.model(**inputs).logits[:, -1, :]
            pair = torch.stack([last[:, self.no], last[:, self.yes]], dim=1).float()
            return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()

    def run(self, requests: list) -> tuple:
        pairs = [(q, d) for q, docs in requests for d in docs]
        started = time.perf_counter()
        flat = []
        for at in range(0, len(pairs), self.batch):
            flat += self.scores(pairs[at:at + self.batch])
        elapsed = time.perf_counter() - started
        out, at = [], 0
        for _, docs in requests:
            out.append(flat[at:at + len(docs)])
            at += len(docs)
        return elapsed, out


def one_token_words(tokenizer) -> list:
    words = sorted({t.lstrip("\u0120") for t in tokenizer.get_vocab()})
    words = [w for w in words if w.isascii() and w.isalpha() and w.islower() and len(w) > 1]
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=pathlib.Path)
    parser.add_argument("--server", action="append", default=[], help="label=host:port, repeatable")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-bf16", action="store_true", help="skip the reference in bf16")
    args = parser.parse_args()

    systems = {"transformers fp32": Reference(args.model, torch.float32, args.batch)}
    if not args.no_bf16:
        systems["transformers bf16"] = Reference(args.model, torch.bfloat16, args.batch)
    words = one_token_words(systems["transformers fp32"].tokenizer)
    rng = random.Random(args.seed)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    requests = [(text(16), [text(rng.randint(32, 480)) for _ in range(args.documents)])
                for _ in range(args.requests)]
    pairs = sum(len(d) for _, d in requests)
    servers = {f"ours {label}": Server(address) for label, address in (s.split("=", 1) for s in args.server)}

    warm = [(requests[0][0], requests[0][1][:2])]
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
          f"{args.documents} documents of 32..480 words), {args.rounds} rounds, median round")
    reference = "transformers fp32"
    rates = {name: pairs / statistics.median(t) for name, t in times.items()}
    print("| system | pairs/s | vs transformers fp32 | vs transformers bf16 | max abs score diff vs fp32 |")
    print("|---|---|---|---|---|")
    for name, rate in rates.items():
        vs_bf16 = f"{rate / rates['transformers bf16']:.2f}x" if "transformers bf16" in rates else "-"
        print(f"| {name} | {rate:.2f} | {rate / rates[reference]:.2f}x | {vs_bf16} | "
              f"{max_diff(scores[name], scores[reference]):.2e} |")


if __name__ == "__main__":
    main()
