//! The decoder body the LLM rerankers share (Qwen2, Qwen3, Gemma: `qwen2.rs`, `qwen3.rs`, `gemma.rs` say which
//! variant and which score): RMSNorm, rotary positions, grouped-query causal attention, a gated MLP, over packed
//! sequences; the score is one row of the output projection at each sequence's last token. Prompt prefixes are
//! reused across pairs by wrapping it in `PrefixReuse`.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::model::ops::{self, Bias, FeedForwardActivation, Linear, RmsNorm, Target, Weights};
use crate::model::prefix_cache::KeysValues;
use crate::model::prefix_reuse::PrefixRun;
use crate::model::PackedBatch;

/// The fields of a decoder `config.json` (Qwen2, Qwen3, Gemma) the decoder needs, as transformers writes them (v4 and v5).
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 5 keeps rope_theta here.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Gemma checkpoints may name the MLP activation here instead (it wins where set).
    #[serde(default)]
    pub hidden_activation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn default_act() -> String {
    "silu".into()
}

impl DecoderConfig {
    fn mlp_activation(&self) -> &str {
        self.hidden_activation
            .as_deref()
            .unwrap_or(&self.hidden_act)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.rope_theta)
            .unwrap_or(1_000_000.0)
    }

    /// Why this configuration cannot be served as written, if it cannot: what the decoder does not implement.
    pub fn unsupported(&self) -> Option<String> {
        let scaled = self.rope_scaling.as_ref().is_some_and(|s| {
            !s.is_null() && s.get("rope_type").and_then(|t| t.as_str()) != Some("default")
        }) || self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
            .is_some_and(|t| t != "default");
        if scaled {
            Some("rope scaling other than the default".into())
        } else if self.use_sliding_window {
            Some("sliding-window attention (use_sliding_window)".into())
        } else if FeedForwardActivation::from_config(self.mlp_activation()).is_none() {
            Some(format!(
                "hidden_act {:?} (silu, gelu or gelu_pytorch_tanh)",
                self.mlp_activation()
            ))
        } else if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            Some("attention heads that are not a multiple of the key/value heads".into())
        } else {
            None
        }
    }
}

struct Layer {
    input_norm: RmsNorm,
    /// Q | K | V in one GEMM.
    qkv: Linear,
    /// Qwen3's per-head norms of queries and keys.
    qk_norms: Option<(RmsNorm, RmsNorm)>,
    o: Linear,
    post_norm: RmsNorm,
    /// gate | up in one GEMM.
    gate_up: Linear,
    down: Linear,
}

/// The decoder and a one-row head: the score of a sequence is head · final_norm(h_last).
pub struct Decoder {
    embeddings: Tensor,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    /// [1, hidden], fp32.
    head: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    /// The gate's activation: SiLU (SwiGLU, Qwen), GELU tanh (GeGLU, Gemma).
    activation: FeedForwardActivation,
    /// Gemma scales embeddings by √hidden.
    embedding_scale: Option<f64>,
    /// Bytes of one token's keys and values over all layers (fp32).
    kv_bytes_per_token: usize,
    target: Target,
}

/// Where the decoder generations differ, each set by its file: Qwen2 has q/k/v biases and no q/k norms, Qwen3
/// the other way round; Gemma has neither, norms that scale by 1 + weight, and embeddings scaled by √hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub qkv_bias: bool,
    pub qk_norms: bool,
    pub norms_plus_one: bool,
    pub scaled_embeddings: bool,
}

/// Which row(s) of the output projection make the score.
pub enum ScoreHead {
    /// The causal LM's logit(positive) - logit(negative) (or logit(positive) alone): token ids.
    TokenLogits {
        positive: u32,
        negative: Option<u32>,
    },
    /// A converted checkpoint's stored one-row `score` layer.
    Stored,
}

impl Decoder {
    pub fn load(
        vb: Weights,
        config: &DecoderConfig,
        variant: Variant,
        head: ScoreHead,
    ) -> Result<Self> {
        let body = vb.pp("model");
        let (h, head_dim) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        let eps = config.rms_norm_eps;
        let norm = |vb: Weights, dim: usize| vb.rms_norm(dim, eps, variant.norms_plus_one);
        let embeddings = body
            .pp("embed_tokens")
            .tensor((config.vocab_size, h), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| load_layer(&body.pp("layers").pp(i), config, variant, norm))
            .collect::<Result<Vec<_>>>()?;
        let head = match head {
            ScoreHead::Stored => vb.pp("score").residual_tensor((1, h), "weight")?,
            ScoreHead::TokenLogits { positive, negative } => {
                // Tied checkpoints store no lm_head: the output projection is the embedding table.
                // (Gemma configs leave the tie implicit: no stored output projection means the tie.)
                let table = if config.tie_word_embeddings || !vb.contains("lm_head.weight") {
                    embeddings.clone()
                } else {
                    vb.pp("lm_head").tensor((config.vocab_size, h), "weight")?
                };
                let row = |id: u32| ops::residual(&table.narrow(0, id as usize, 1)?);
                match negative {
                    Some(negative) => (row(positive)? - row(negative)?)?,
                    None => row(positive)?,
                }
            }
        };
        Ok(Self {
            embeddings,
            layers,
            final_norm: norm(body.pp("norm"), h)?,
            head,
            heads,
            kv_heads,
            head_dim,
            rope_theta: config.rope_theta(),
            activation: FeedForwardActivation::from_config(config.mlp_activation()).ok_or_else(
                || candle_core::Error::Msg(format!("activation {:?}", config.mlp_activation())),
            )?,
            embedding_scale: variant.scaled_embeddings.then(|| (h as f64).sqrt()),
            kv_bytes_per_token: config.num_hidden_layers * 2 * kv_heads * head_dim * 4,
            target: vb.target(),
        })
    }

    /// One decoder layer over packed tokens; in the last layer (`last_rows`), only each sequence's last token
    /// goes on past attention. x: fp32 residual stream [tokens, hidden].
    fn layer(
        &self,
        layer: &Layer,
        x: &Tensor,
        rotary: &(Tensor, Tensor),
        cu_seqlens: &[usize],
        last_rows: Option<&Tensor>,
        prefix: Option<&KeysValues>,
    ) -> Result<(Tensor, KeysValues)> {
        let tokens = x.dim(0)?;
        let (q_width, kv_width) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let normed = self.target.gemm_input(&layer.input_norm.forward(x)?)?;
        let qkv = ops::linear(&layer.qkv, &normed)?;
        let part = |from: usize, width: usize, heads: usize| {
            qkv.narrow(1, from, width)?
                .reshape((tokens, heads, self.head_dim))
        };
        let (q, k) = (
            part(0, q_width, self.heads)?,
            part(q_width, kv_width, self.kv_heads)?,
        );
        let (q, k) = match &layer.qk_norms {
            Some((q_norm, k_norm)) => (q_norm.forward(&q)?, k_norm.forward(&k)?),
            None => (q, k),
        };
        let (q, k) = (ops::rotate(&q, rotary)?, ops::rotate(&k, rotary)?);
        let v = ops::residual(&part(q_width + kv_width, kv_width, self.kv_heads)?)?;
        let cached = prefix.map(|kv| (&kv.0, &kv.1));
        let context = ops::causal_attention(&q, &k, &v, cu_seqlens, last_rows.is_some(), cached)?;
        let x = match last_rows {
            Some(rows) => x.index_select(rows, 0)?,
            None => x.clone(),
        };
        let attended = ops::linear(&layer.o, &self.target.gemm_input(&context)?)?;
        let x = (x + ops::residual(&attended)?)?;
        let normed = self.target.gemm_input(&layer.post_norm.forward(&x)?)?;
        let gate_up = ops::linear(&layer.gate_up, &normed)?;
        let gated = ops::gated_activation(&gate_up, ops::ActivatedHalf::First, self.activation)?;
        let x = (x + ops::residual(&ops::linear(&layer.down, &gated)?)?)?;
        Ok((x, (k, v)))
    }
}

impl PrefixRun for Decoder {
    fn kv_bytes_per_token(&self) -> usize {
        self.kv_bytes_per_token
    }

    /// The layers over `batch`, whose sequences sit at positions `offset..` after the cached keys and values of
    /// a prefix they all share (one pair per layer). Returns each sequence's score (unless `scores` is false) and,
    /// for each layer, the keys and values of the first `capture` tokens of the batch's first sequence (copied out
    /// of the batch's tensors unless they are all of them, so those are freed layer by layer).
    fn run(
        &self,
        batch: &PackedBatch,
        offset: usize,
        prefix: Option<&[KeysValues]>,
        (scores, capture): (bool, usize),
    ) -> Result<(Option<Tensor>, Vec<KeysValues>)> {
        let ids = self.target.ids(&batch.input_ids)?;
        let mut x = ops::residual(&self.embeddings.index_select(&ids, 0)?)?;
        if let Some(scale) = self.embedding_scale {
            x = (x * scale)?;
        }
        let spans = batch.lengths().map(|len| offset..offset + len);
        let rotary = self
            .target
            .rotary_tables(spans, self.head_dim, self.rope_theta)?;
        let last: Vec<u32> = batch.cu_seqlens[1..]
            .iter()
            .map(|&end| (end as u32).saturating_sub(1))
            .collect();
        let last = self.target.ids(&last)?;
        let capture = capture.min(batch.lengths().next().unwrap_or(0));
        let mut captured = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            // Past the last layer's attention only the last token of each sequence matters for its score (and
            // the keys and values are complete before it).
            let rows = (i + 1 == self.layers.len()).then_some(&last);
            let cached = prefix.and_then(|kvs| kvs.get(i));
            let (next, (k, v)) = self.layer(layer, &x, &rotary, &batch.cu_seqlens, rows, cached)?;
            x = next;
            if capture > 0 {
                captured.push(match capture < k.dim(0)? {
                    true => (
                        k.narrow(0, 0, capture)?.copy()?,
                        v.narrow(0, 0, capture)?.copy()?,
                    ),
                    false => (k, v),
                });
            }
        }
        if !scores {
            return Ok((None, captured));
        }
        if self.layers.is_empty() {
            x = x.index_select(&last, 0)?;
        }
        let h = self.final_norm.forward(&x)?;
        Ok((
            Some(h.matmul(&self.head.t()?)?.reshape((batch.size(), 1))?),
            captured,
        ))
    }
}

/// One decoder layer's weights, `model.layers.{i}`; Q, K and V fused, gate and up fused.
fn load_layer(
    layer: &Weights,
    config: &DecoderConfig,
    variant: Variant,
    norm: impl Fn(Weights, usize) -> Result<RmsNorm>,
) -> Result<Layer> {
    let (h, head_dim, inner) = (
        config.hidden_size,
        config.head_dim(),
        config.intermediate_size,
    );
    let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
    let (attn, mlp) = (layer.pp("self_attn"), layer.pp("mlp"));
    let qkv_bias = match variant.qkv_bias || config.attention_bias {
        true => Bias::Stored,
        false => Bias::None,
    };
    let qkv = [
        ("q_proj", heads * head_dim),
        ("k_proj", kv_heads * head_dim),
        ("v_proj", kv_heads * head_dim),
    ];
    let eps = config.rms_norm_eps;
    Ok(Layer {
        input_norm: norm(layer.pp("input_layernorm"), h)?,
        qkv: attn.fused_linear(&qkv, h, qkv_bias)?,
        qk_norms: match variant.qk_norms {
            true => Some((
                attn.pp("q_norm").rms_norm(head_dim, eps, false)?,
                attn.pp("k_norm").rms_norm(head_dim, eps, false)?,
            )),
            false => None,
        },
        o: attn.pp("o_proj").linear(heads * head_dim, h, Bias::None)?,
        post_norm: norm(layer.pp("post_attention_layernorm"), h)?,
        gate_up: mlp.fused_linear(&[("gate_proj", inner), ("up_proj", inner)], h, Bias::None)?,
        down: mlp.pp("down_proj").linear(inner, h, Bias::None)?,
    })
}
