"""GTE's multilingual encoder (model_type "new", NewForSequenceClassification: Alibaba-NLP/gte-multilingual-reranker-base),
written out in plain torch from the modeling code the checkpoint publishes as remote code, for fp32 inference only.

The published code cannot be fetched here, so the fixtures are scored with this module registered with transformers'
Auto classes: sentence-transformers' CrossEncoder then loads the fixture directory, tokenizes and applies its activation
exactly as it does for the real checkpoint. What the published code computes, step by step:

- embeddings: word embedding + token-type embedding (row 0 when the tokenizer gives no type ids; none when
  type_vocab_size is 0) → LayerNorm; positions only through rotary embeddings (position_embedding_type "rope");
- rotary: rotate-half form over each head, positions 0..n-1 per sequence, inverse frequencies 1/θ^(2i/d); with
  rope_scaling {"type": "ntk", "factor": f} the cache is built at construction for max_position_embeddings·f positions,
  which switches to the scaled frequencies for every length: 1/(θ·f)^(2i/d) / f^(2/d), or, with "mixed_b": b,
  1/θ^(2i/d) / exp(a·(i+1)^b) with a = ln f / (d/2)^b;
- each layer is post-norm: x = attn_ln(x + o_proj(attention(qkv_proj(x)))), x = mlp_ln(x + down_proj(act(gate) · up))
  with [up | gate] = up_gate_proj(x) (no bias), attention (sdpa, the default) scaled by 1/√d with padded keys masked;
- head: pooler = tanh(dense(first token)), then classifier.

Only what these checkpoints use is written out: absolute positions, RMSNorm layers and the log-n attention scale are
refused, as the server refuses them.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.configuration_utils import PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput


class NewConfig(PretrainedConfig):
    model_type = "new"

    def __init__(self, vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
                 max_position_embeddings=2048, type_vocab_size=1, initializer_range=0.02, layer_norm_type="layer_norm",
                 layer_norm_eps=1e-12, position_embedding_type="rope", rope_theta=10000.0, rope_scaling=None,
                 classifier_dropout=None, pack_qkv=True, unpad_inputs=False, use_memory_efficient_attention=False,
                 logn_attention_scale=False, logn_attention_clip1=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.hidden_act = intermediate_size, hidden_act
        self.hidden_dropout_prob, self.attention_probs_dropout_prob = hidden_dropout_prob, attention_probs_dropout_prob
        self.max_position_embeddings, self.type_vocab_size = max_position_embeddings, type_vocab_size
        self.initializer_range, self.layer_norm_type, self.layer_norm_eps = initializer_range, layer_norm_type, layer_norm_eps
        self.position_embedding_type, self.rope_theta = position_embedding_type, rope_theta
        self.rope_scaling, self.classifier_dropout, self.pack_qkv = rope_scaling, classifier_dropout, pack_qkv
        self.unpad_inputs, self.use_memory_efficient_attention = unpad_inputs, use_memory_efficient_attention
        self.logn_attention_scale, self.logn_attention_clip1 = logn_attention_scale, logn_attention_clip1


def inverse_frequencies(config) -> torch.Tensor:
    dim = config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, dim, 2).float() / dim
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / (config.rope_theta ** exponents)
    kind = scaling.get("type") or scaling.get("rope_type")
    assert kind == "ntk", f"rope scaling {kind!r}"
    factor, mixed_b = scaling["factor"], scaling.get("mixed_b")
    if mixed_b is None:
        return 1.0 / ((config.rope_theta * factor) ** exponents) / factor ** (2 / dim)
    a = torch.tensor(factor).log() / (dim / 2) ** mixed_b
    return 1.0 / (config.rope_theta ** exponents) / (a * torch.arange(1, dim // 2 + 1).float() ** mixed_b).exp()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.type_vocab_size = config.type_vocab_size

    def forward(self, input_ids, token_type_ids):
        x = self.word_embeddings(input_ids)
        if self.type_vocab_size > 0:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(types)
        return self.LayerNorm(x)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.heads, self.pack_qkv = config.num_attention_heads, config.pack_qkv
        if self.pack_qkv:
            self.qkv_proj = nn.Linear(h, 3 * h)
        else:
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)

    def forward(self, x, bias, cos, sin):
        b, n, h = x.shape
        if self.pack_qkv:
            q, k, v = self.qkv_proj(x).split(h, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(b, n, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # The published code's default attention (sdpa): softmax(q·kᵀ/√d + bias)·v.
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(context.transpose(1, 2).reshape(b, n, h))


class GatedMlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.inner = config.intermediate_size
        self.up_gate_proj = nn.Linear(config.hidden_size, 2 * self.inner, bias=False)
        self.down_proj = nn.Linear(self.inner, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        up, gate = self.up_gate_proj(x).split(self.inner, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention, self.mlp = Attention(config), GatedMlp(config)
        self.attn_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, bias, cos, sin):
        x = self.attn_ln(x + self.attention(x, bias, cos, sin))
        return self.mlp_ln(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class NewModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.position_embedding_type == "rope" and config.layer_norm_type == "layer_norm"
        assert not config.logn_attention_scale
        self.config = config
        self.embeddings, self.encoder, self.pooler = Embeddings(config), Encoder(config), Pooler(config)

    def forward(self, input_ids, attention_mask, token_type_ids):
        x = self.embeddings(input_ids, token_type_ids)
        angles = torch.arange(input_ids.shape[1]).float()[:, None] * inverse_frequencies(self.config)[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias, cos, sin)
        return self.pooler(x)


class NewForSequenceClassification(PreTrainedModel):
    config_class = NewConfig
    base_model_prefix = "new"

    def __init__(self, config):
        super().__init__(config)
        self.new = NewModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return SequenceClassifierOutput(logits=self.classifier(self.new(input_ids, attention_mask, token_type_ids)))


def register():
    """Makes AutoConfig and AutoModelForSequenceClassification resolve model_type "new" to these classes."""
    AutoConfig.register("new", NewConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(NewConfig, NewForSequenceClassification, exist_ok=True)
