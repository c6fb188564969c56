#!/usr/bin/env python3
"""Reference side of scripts/checks/gpu-check.sh, run on the GPU machine with torch, transformers and
sentence-transformers:

    python3 scripts/checks/gpu_reference.py models OUT      # seeded real-shape models + reference logits (fp32)
    python3 scripts/checks/gpu_reference.py baseline OUT    # torch fp16 model-only throughput on the same shapes
    python3 scripts/checks/gpu_reference.py crossencoder OUT  # CrossEncoder.predict fp16 on text, the same workloads

DEVICE (default cuda), PAIRS (default 4096) and MODELS (default "minilm xlmr-base") may be set for a dry run
of the plumbing on a CPU.

Models: MiniLM-L6 shape (BERT 384 x 6, the BERT fixture's WordPiece tokenizer) and XLM-R base shape
(bge-reranker-base: 768 x 12, the XLM-R fixture's SentencePiece tokenizer), seeded, with the classifier scaled
so logits are of unit size. Reference logits come from sentence-transformers' CrossEncoder in fp32 on the texts
of the committed fixture cases, written in the fixtures' JSON format.
"""
import json
import os
import pathlib
import random
import shutil
import sys
import time

import torch
from sentence_transformers import CrossEncoder
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          XLMRobertaConfig, XLMRobertaForSequenceClassification)

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("DEVICE", "cuda")
PAIRS = int(os.environ.get("PAIRS", "4096"))
MODELS = os.environ.get("MODELS", "minilm xlmr-base").split()
FIXTURES = ROOT / "tests" / "fixtures"
SHAPES = {
    "minilm": ("bert-tiny-1label", lambda: BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, num_labels=1, architectures=["BertForSequenceClassification"]))),
    "xlmr-base": ("xlmr-tiny-1label", lambda: XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, num_labels=1, architectures=["XLMRobertaForSequenceClassification"]))),
}


def build(name: str, out: pathlib.Path) -> pathlib.Path:
    fixture, make = SHAPES[name]
    torch.manual_seed(20261126)
    model = make().eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.startswith("classifier") and param_name.endswith("weight"):
                param.normal_(0.0, 0.3 if name == "minilm" else 0.02)
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(FIXTURES / fixture / "tokenizer.json", directory / "tokenizer.json")
    tokenizer_config = json.loads((FIXTURES / fixture / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 512
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def reference(directory: pathlib.Path, fixture: str, out: pathlib.Path):
    ce = CrossEncoder(str(directory), device=DEVICE, max_length=512)
    ce.model.float()
    texts = json.loads((FIXTURES / "expected" / f"{fixture}.json").read_text())
    cases = []
    for case in texts["cases"]:
        pairs = [(case["query"], d) for d in case["documents"]]
        logits = ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=64, convert_to_numpy=True)
        cases.append({"name": case["name"], "query": case["query"], "documents": case["documents"],
                      "logits": [[float(x)] for x in logits]})
    out.write_text(json.dumps({"cases": cases}, ensure_ascii=False))


def models(out: pathlib.Path, names=None):
    for name, (fixture, _) in SHAPES.items():
        if name not in (names or MODELS):
            continue
        directory = build(name, out)
        reference(directory, fixture, out / f"{name}.expected.json")
        print(f"built {directory}")


def synchronize():
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def one_token_words(tokenizer) -> list[str]:
    """As loadgen's --tokenizer: lowercase vocabulary words that encode to exactly one token alone."""
    words = sorted({piece.lstrip("\u2581") for piece in tokenizer.get_vocab()})
    words = [w for w in words if w and w.isascii() and w.isalpha() and w.islower()]
    return [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1][:4000]


def workload_pairs(words: list[str], workload: str, rng: random.Random) -> list[tuple[str, str]]:
    """loadgen's workloads: 16-word queries with 32..480-word documents (mixed), or 237 (fixed256)."""
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))
    pairs = []
    while len(pairs) < PAIRS:
        query = text(16)
        for _ in range(100):
            pairs.append((query, text(237 if workload == "fixed256" else rng.randint(32, 480))))
    return pairs[:PAIRS]


def crossencoder(out: pathlib.Path):
    """sentence-transformers' CrossEncoder.predict on text (its own tokenization and padding), fp16, batch 128:
    what a user would run instead of the server."""
    rows = []
    for name in MODELS:
        ce = CrossEncoder(str(out / name), device=DEVICE, max_length=512)
        if DEVICE != "cpu":
            ce.model.half()
        words = one_token_words(ce.tokenizer)
        for workload in ["mixed", "fixed256"]:
            pairs = workload_pairs(words, workload, random.Random(11))
            ce.predict(pairs[:256], batch_size=128, show_progress_bar=False)  # warm-up
            started = time.perf_counter()
            ce.predict(pairs, batch_size=128, show_progress_bar=False)
            synchronize()
            rate = len(pairs) / (time.perf_counter() - started)
            rows.append({"model": name, "workload": workload, "pairs_per_s": rate})
            print(f"crossencoder {name} {workload}: {rate:,.0f} pairs/s")
        del ce
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    (out / "crossencoder.json").write_text(json.dumps(rows))


def baseline(out: pathlib.Path):
    """torch fp16, SDPA, pre-tokenized random ids, sorted by length, batches of 128: model-only pairs/s."""
    rows = []
    generator = torch.Generator().manual_seed(7)
    for name in MODELS:
        model = AutoModelForSequenceClassification.from_pretrained(
            out / name, torch_dtype=torch.float16 if DEVICE != "cpu" else torch.float32,
            attn_implementation="sdpa").to(DEVICE).eval()
        for workload in ["mixed", "fixed256"]:
            n = PAIRS
            if workload == "mixed":
                lengths = (16 + 3 + torch.randint(32, 481, (n,), generator=generator)).clamp(max=512).tolist()
            else:
                lengths = [256] * n
            lengths.sort(reverse=True)
            batches = []
            for start in range(0, n, 128):
                chunk = lengths[start:start + 128]
                width = max(chunk)
                ids = torch.randint(5, 3000, (len(chunk), width), generator=generator)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for i, length in enumerate(chunk):
                    mask[i, :length] = 1
                batches.append((ids.to(DEVICE), mask.to(DEVICE)))
            with torch.inference_mode():
                for ids, mask in batches:  # every shape once before timing
                    model(input_ids=ids, attention_mask=mask)
                synchronize()
                started = time.perf_counter()
                for ids, mask in batches:
                    model(input_ids=ids, attention_mask=mask)
                synchronize()
                elapsed = time.perf_counter() - started
            rows.append({"model": name, "workload": workload, "pairs_per_s": n / elapsed})
            print(f"torch fp16 {name} {workload}: {n / elapsed:,.0f} pairs/s")
        del model
        if DEVICE != "cpu":
            torch.cuda.empty_cache()
    (out / "baseline.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    command, out = sys.argv[1], pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if command == "models":
        models(out, sys.argv[3:])
    elif command == "crossencoder":
        crossencoder(out)
    else:
        baseline(out)
