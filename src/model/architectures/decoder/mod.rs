//! The decoder body the LLM rerankers share (Qwen2, Qwen3, Gemma: `qwen2.rs`, `qwen3.rs`, `gemma.rs` say which
//! variant and which score): RMSNorm, rotary positions, grouped-query causal attention, a gated MLP, over packed
//! sequences; the score is one row of the output projection at each sequence's last token. Prompt prefixes are
//! reused across pairs by wrapping it in `PrefixReuse`.

use candle_core::{Result, Tensor};

use crate::model::ops::{self, Bias, FeedForwardActivation, Linear, RmsNorm, Target, Weights};
use crate::model::prefix_cache::KeysValues;
use crate::model::prefix_reuse::PrefixRun;
use crate::model::PackedBatch;

mod config;
mod exits;

pub use config::DecoderConfig;
use exits::{leading, ExitScores, Heads};

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

/// The decoder and its score rows: the score of a sequence is head · final_norm(h_last), h the output of the last
/// layer or of the layer the sequence exits after.
pub struct Decoder {
    embeddings: Tensor,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    heads_out: Heads,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    /// The gate's activation: SiLU (SwiGLU, Qwen), GELU tanh (GeGLU, Gemma).
    activation: FeedForwardActivation,
    /// Gemma scales embeddings by √hidden, MiniCPM by scale_emb.
    embedding_scale: Option<f64>,
    /// MiniCPM scales each residual branch by scale_depth / √layers.
    residual_scale: Option<f64>,
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
    /// Layerwise rerankers: `lm_head.{i}.linear_head`, one row per layer from `first` (1-based) to the last.
    PerLayer { first: usize, default: usize },
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
        let heads_out = match head {
            ScoreHead::PerLayer { first, default } => {
                let rows = (first..=config.num_hidden_layers)
                    .map(|layer| {
                        vb.pp("lm_head")
                            .pp(layer - first)
                            .pp("linear_head")
                            .residual_tensor((1, h), "weight")
                    })
                    .collect::<Result<Vec<_>>>()?;
                Heads::PerLayer {
                    first,
                    rows,
                    default,
                }
            }
            ScoreHead::Stored => Heads::Last(vb.pp("score").residual_tensor((1, h), "weight")?),
            ScoreHead::TokenLogits { positive, negative } => {
                // Tied checkpoints store no lm_head: the output projection is the embedding table.
                // (Gemma configs leave the tie implicit: no stored output projection means the tie.)
                let table = if config.tie_word_embeddings || !vb.contains("lm_head.weight") {
                    embeddings.clone()
                } else {
                    vb.pp("lm_head").tensor((config.vocab_size, h), "weight")?
                };
                let row = |id: u32| ops::residual(&table.narrow(0, id as usize, 1)?);
                Heads::Last(match negative {
                    Some(negative) => (row(positive)? - row(negative)?)?,
                    None => row(positive)?,
                })
            }
        };
        Ok(Self {
            embeddings,
            layers,
            final_norm: norm(body.pp("norm"), h)?,
            heads_out,
            heads,
            kv_heads,
            head_dim,
            rope_theta: config.rope_theta(),
            activation: FeedForwardActivation::from_config(config.mlp_activation()).ok_or_else(
                || candle_core::Error::Msg(format!("activation {:?}", config.mlp_activation())),
            )?,
            embedding_scale: match variant.scaled_embeddings {
                true => Some((h as f64).sqrt()),
                false => config.scale_emb,
            },
            residual_scale: config
                .scale_depth
                .map(|depth| depth / (config.num_hidden_layers.max(1) as f64).sqrt()),
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
        let x = (x + self.branch(ops::residual(&attended)?)?)?;
        let normed = self.target.gemm_input(&layer.post_norm.forward(&x)?)?;
        let gate_up = ops::linear(&layer.gate_up, &normed)?;
        let gated = ops::gated_activation(&gate_up, ops::ActivatedHalf::First, self.activation)?;
        let x = (x + self.branch(ops::residual(&ops::linear(&layer.down, &gated)?)?)?)?;
        Ok((x, (k, v)))
    }

    /// A residual branch as it joins the stream (MiniCPM scales it).
    fn branch(&self, t: Tensor) -> Result<Tensor> {
        match self.residual_scale {
            Some(scale) => t * scale,
            None => Ok(t),
        }
    }

    /// Each sequence's exit layer (1-based), and how many layers the batch runs: all of them for one head or
    /// for a run without scores (its keys and values are kept for later batches, which may go deeper).
    fn exits(&self, batch: &PackedBatch, scores: bool) -> Result<(Vec<usize>, usize)> {
        let all = self.layers.len();
        let Heads::PerLayer { first, default, .. } = &self.heads_out else {
            return Ok((vec![all; batch.size()], all));
        };
        let exits = (0..batch.size())
            .map(|i| match batch.exit_layer(i) as usize {
                0 => *default,
                layer => layer,
            })
            .collect::<Vec<_>>();
        if let Some(bad) = exits.iter().find(|&&l| l < *first || l > all) {
            candle_core::bail!("layer {bad} has no score head (layers {first} to {all})");
        }
        let depth = match scores {
            true => exits.iter().copied().max().unwrap_or(all),
            false => all,
        };
        Ok((exits, depth))
    }

    /// The scores of the sequences that exit after `layer` (1-based): `rows` are their rows of `x`.
    fn exit_scores(&self, x: &Tensor, rows: &[u32], layer: usize) -> Result<Tensor> {
        let head = match &self.heads_out {
            Heads::Last(head) => head,
            Heads::PerLayer {
                first, rows: heads, ..
            } => heads.get(layer.wrapping_sub(*first)).ok_or_else(|| {
                candle_core::Error::Msg(format!("no score head for layer {layer}"))
            })?,
        };
        let picked = x.index_select(&self.target.ids(rows)?, 0)?;
        self.final_norm.forward(&picked)?.matmul(&head.t()?)
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
        let last_rows: Vec<u32> = batch.cu_seqlens[1..]
            .iter()
            .map(|&end| (end as u32).saturating_sub(1))
            .collect();
        let last = self.target.ids(&last_rows)?;
        let sequence_rows: Vec<u32> = (0..batch.size() as u32).collect();
        let capture = capture.min(batch.lengths().next().unwrap_or(0));
        let (exits, depth) = self.exits(batch, scores)?;
        let mut scored = ExitScores {
            sequences: Vec::new(),
            pieces: Vec::new(),
        };
        let mut captured = Vec::new();
        if scores && depth == 0 {
            // No layer to run: the embeddings' last rows are scored.
            scored.take(self, &x, &exits, 0, &last_rows)?;
        }
        for (i, layer) in self.layers.iter().take(depth).enumerate() {
            // Past the last layer's attention only the last token of each sequence matters for its score (and
            // the keys and values are complete before it).
            let at_end = i + 1 == depth;
            let rows = at_end.then_some(&last);
            let cached = prefix.and_then(|kvs| kvs.get(i));
            let (next, (k, v)) = self.layer(layer, &x, &rotary, &batch.cu_seqlens, rows, cached)?;
            x = next;
            if scores {
                // After the last layer run, x holds one row per sequence.
                let rows = if at_end { &sequence_rows } else { &last_rows };
                scored.take(self, &x, &exits, i + 1, rows)?;
            }
            if capture > 0 {
                captured.push(leading(k, v, capture)?);
            }
        }
        if !scores {
            return Ok((None, captured));
        }
        Ok((
            Some(scored.in_batch_order(batch.size(), &self.target)?),
            captured,
        ))
    }

    fn layer_count(&self) -> usize {
        self.layers.len()
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
