#!/usr/bin/env python3
"""Builds a real-size SentencePiece Unigram tokenizer for tokenization benchmarks (not committed: a few MB).

    pip install transformers sentencepiece faker
    python3 scripts/make_bench_tokenizer.py models/xlmr-bench-tokenizer

XLM-R's own tokenizer (250,002 pieces) cannot be fetched here, so this trains one of the same kind: SentencePiece
Unigram with the NFKC rule (nmt_nfkc, the precompiled normalisation map), XLM-R's special ids and pair template,
32,000 pieces of up to 16 characters, on a seeded corpus of ten languages (Faker's word lists: English, German,
French, Spanish, Italian, Portuguese, Russian, Chinese, Japanese, Arabic). Pieces per word and trie matches per
position are then of a real vocabulary's order, which the 600-piece test fixture's are not. Deterministic.

It also writes documents.json: 2,000 seeded documents (1,000 English, 1,000 from all ten languages) that the
tokenizer bench reads.
"""
import io
import json
import pathlib
import sys

import sentencepiece as spm
import sentencepiece.sentencepiece_model_pb2 as sp_model
from faker import Faker
from transformers import XLMRobertaTokenizer

LOCALES = ["en_US", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "ru_RU", "zh_CN", "ja_JP", "ar_AA"]


def corpus(sentences_per_locale: int) -> list[str]:
    lines = []
    for i, locale in enumerate(LOCALES):
        fake = Faker(locale)
        fake.seed_instance(1000 + i)
        lines += [fake.sentence(nb_words=14) for _ in range(sentences_per_locale)]
    return lines


def documents() -> dict:
    english, mixed = Faker("en_US"), [Faker(locale) for locale in LOCALES]
    english.seed_instance(7)
    for i, fake in enumerate(mixed):
        fake.seed_instance(70 + i)
    return {
        "english": [english.text(max_nb_chars=1200) for _ in range(1000)],
        "multilingual": [mixed[i % len(mixed)].text(max_nb_chars=1200) for i in range(1000)],
    }


def main(out: pathlib.Path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(20000)), model_writer=model, vocab_size=32000, model_type="unigram",
        normalization_rule_name="nmt_nfkc", bos_id=0, pad_id=1, eos_id=2, unk_id=3, num_threads=2,
        character_coverage=0.9995, max_sentencepiece_length=16, input_sentence_size=200000,
        shuffle_input_sentence=False, minloglevel=2)
    proto = sp_model.ModelProto()
    proto.ParseFromString(model.getvalue())
    vocab = [(p.piece, p.score) for p in proto.pieces] + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=512,
                                    _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "documents.json").write_text(json.dumps(documents(), ensure_ascii=False), encoding="utf-8")
    print(f"{out}: {len(vocab)} pieces")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(pathlib.Path(sys.argv[1]))
