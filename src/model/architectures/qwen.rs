//! The Qwen2/Qwen3 decoder as a reranker: RMSNorm, rotary positions, grouped-query causal attention (q/k norms in
//! Qwen3, q/k/v biases in Qwen2), SwiGLU, over packed sequences; the score is one row of the output projection at
//! each sequence's last token (see `decoder_rerankers.rs` for which row and which prompt).

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::model::ops::{self, Bias, FeedForwardActivation, Linear, RmsNorm, Target, Weights};
use crate::model::prefix_cache::{self, KeysValues, PrefixCache, PrefixCacheStats, MIN_PREFIX};
use crate::model::{CrossEncoder, PackedBatch};

/// The fields of a Qwen3 `config.json` the decoder needs, as transformers writes them (v4 and v5).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
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

impl Qwen3Config {
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
pub struct Qwen3Reranker {
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
    /// Prompt prefixes computed by earlier batches (see `prefix_cache`).
    prefix_cache: PrefixCache,
    /// The most leading tokens of one sequence the cache keeps.
    cacheable_tokens: usize,
    target: Target,
}

/// The decoder generation: Qwen2 has q/k/v biases and no q/k norms, Qwen3 the other way round; Gemma has
/// neither, norms that scale by 1 + weight, and embeddings scaled by √hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen2,
    Qwen3,
    Gemma,
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

impl Qwen3Reranker {
    pub fn load(
        vb: Weights,
        config: &Qwen3Config,
        family: Family,
        head: ScoreHead,
    ) -> Result<Self> {
        let body = vb.pp("model");
        let (h, head_dim) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        let eps = config.rms_norm_eps;
        let norm = |vb: Weights, dim: usize| vb.rms_norm(dim, eps, family == Family::Gemma);
        let embeddings = body
            .pp("embed_tokens")
            .tensor((config.vocab_size, h), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| load_layer(&body.pp("layers").pp(i), config, family, norm))
            .collect::<Result<Vec<_>>>()?;
        let head = match head {
            ScoreHead::Stored => vb.pp("score").fp32_tensor((1, h), "weight")?,
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
            embedding_scale: (family == Family::Gemma).then(|| (h as f64).sqrt()),
            prefix_cache: PrefixCache::new(prefix_cache::DEFAULT_BUDGET),
            cacheable_tokens: PrefixCache::new(prefix_cache::DEFAULT_BUDGET).tokens_within(
                // fp32 keys and values of every layer.
                config.num_hidden_layers * 2 * kv_heads * head_dim * 4,
            ),
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

impl Qwen3Reranker {
    /// A cached run `ids` start with; a cache that fails (a device out of memory) costs only the reuse.
    fn lookup(&self, ids: &[u32]) -> Option<(usize, Vec<KeysValues>)> {
        self.prefix_cache.lookup(ids).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "prefix cache lookup failed; computing the whole prompt");
            None
        })
    }

    /// Keeps a computed run for later batches; a failure to keep it costs only the reuse.
    fn keep(&self, ids: &[u32], layers: Vec<KeysValues>) {
        if let Err(e) = self.prefix_cache.insert(ids, layers, false) {
            tracing::warn!(error = %e, "prefix cache insert failed");
        }
    }
}

/// One decoder layer's weights, `model.layers.{i}`; Q, K and V fused, gate and up fused.
fn load_layer(
    layer: &Weights,
    config: &Qwen3Config,
    family: Family,
    norm: impl Fn(Weights, usize) -> Result<RmsNorm>,
) -> Result<Layer> {
    let (h, head_dim, inner) = (
        config.hidden_size,
        config.head_dim(),
        config.intermediate_size,
    );
    let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
    let (attn, mlp) = (layer.pp("self_attn"), layer.pp("mlp"));
    let qkv_bias = match family == Family::Qwen2 || config.attention_bias {
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
        qk_norms: match family {
            Family::Qwen3 => Some((
                attn.pp("q_norm").rms_norm(head_dim, eps, false)?,
                attn.pp("k_norm").rms_norm(head_dim, eps, false)?,
            )),
            Family::Qwen2 | Family::Gemma => None,
        },
        o: attn.pp("o_proj").linear(heads * head_dim, h, Bias::None)?,
        post_norm: norm(layer.pp("post_attention_layernorm"), h)?,
        gate_up: mlp.fused_linear(&[("gate_proj", inner), ("up_proj", inner)], h, Bias::None)?,
        down: mlp.pp("down_proj").linear(inner, h, Bias::None)?,
    })
}

/// The longest run of leading tokens every sequence of the batch shares, keeping at least one token of each
/// sequence apart (its last token gives its score); for one sequence, all but its last token.
fn common_run(batch: &PackedBatch) -> usize {
    let mut rows = batch.rows().map(|(ids, _)| ids);
    let Some(first) = rows.next() else {
        return 0;
    };
    rows.fold(first.len().saturating_sub(1), |shared, ids| {
        let common = first.iter().zip(ids).take_while(|(a, b)| a == b).count();
        shared.min(common).min(ids.len().saturating_sub(1))
    })
}

impl CrossEncoder for Qwen3Reranker {
    /// The leading tokens every pair of the batch shares (the prompt, the instruction, usually the query) are
    /// computed once, or taken from an earlier batch that computed them (the prefix cache), and each pair's own
    /// tokens attend to their keys and values: causal attention makes the result the same as computing every
    /// pair whole. What a batch computes from the start is kept for the batches after it.
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let shared = common_run(batch);
        let (first, first_types) = batch.rows().next().unwrap_or((&[], &[]));
        // What is worth keeping for the request's other pairs: the first segment (prompt, instruction, query) where
        // the tokenizer marks it with type id 1, else the whole first sequence.
        let segment = first_types.iter().take_while(|&&t| t == 1).count();
        let worth_keeping = match segment >= MIN_PREFIX {
            true => segment,
            false => first.len(),
        }
        .min(self.cacheable_tokens);
        let cached = match shared >= MIN_PREFIX {
            true => self.lookup(&first[..shared]),
            false => None,
        };
        let scores = match cached {
            // Pairs that share more than was cached (a new query after a cached prompt): that part once, kept.
            Some((len, kvs)) if batch.size() > 1 && shared > len => {
                let (part, _) = split_prefix(&split_prefix(batch, len).1, shared - len);
                let (_, more) = self.run(&part, len, Some(&kvs), (false, shared - len))?;
                let longer = extend(&kvs, &more)?;
                self.keep(&first[..shared], longer.clone());
                let (_, suffixes) = split_prefix(batch, shared);
                self.run(&suffixes, shared, Some(&longer), (true, 0))?.0
            }
            Some((len, kvs)) => {
                // One pair: what it computes after the cached run is kept as far as the cache takes it.
                let capture = shared.min(worth_keeping).saturating_sub(len);
                let (_, suffixes) = split_prefix(batch, len);
                let (scores, own) = self.run(&suffixes, len, Some(&kvs), (true, capture))?;
                if capture > 0 {
                    self.keep(&first[..len + capture], extend(&kvs, &own)?);
                }
                scores
            }
            None if shared >= MIN_PREFIX && batch.size() > 1 => {
                let (prefix, suffixes) = split_prefix(batch, shared);
                let (_, kvs) = self.run(&prefix, 0, None, (false, shared))?;
                self.keep(&prefix.input_ids, kvs.clone());
                self.run(&suffixes, shared, Some(&kvs), (true, 0))?.0
            }
            None => {
                // Another batch of the same request will share this pair's prompt.
                let capture = match worth_keeping >= MIN_PREFIX {
                    true => worth_keeping,
                    false => 0,
                };
                let (scores, kvs) = self.run(batch, 0, None, (true, capture))?;
                if capture > 0 {
                    self.keep(&first[..capture], kvs);
                }
                scores
            }
        };
        scores.ok_or_else(|| candle_core::Error::Msg("no scores from the decoder".into()))
    }

    fn clear_prefix_cache(&self) {
        self.prefix_cache.clear();
    }

    fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        Some(self.prefix_cache.stats())
    }
}

/// Each layer's cached keys and values followed by those computed after them.
fn extend(cached: &[KeysValues], computed: &[KeysValues]) -> Result<Vec<KeysValues>> {
    cached
        .iter()
        .zip(computed)
        .map(|((ck, cv), (k, v))| Ok((Tensor::cat(&[ck, k], 0)?, Tensor::cat(&[cv, v], 0)?)))
        .collect()
}

/// The shared prefix as a batch of one sequence, and every sequence's tokens after it.
fn split_prefix(batch: &PackedBatch, shared: usize) -> (PackedBatch, PackedBatch) {
    let rows: Vec<(&[u32], &[u32])> = batch.rows().collect();
    let prefix = PackedBatch::from_sequences(
        rows.iter()
            .take(1)
            .map(|(ids, types)| (&ids[..shared], &types[..shared])),
    );
    let suffixes = PackedBatch::from_sequences(
        rows.iter()
            .map(|(ids, types)| (&ids[shared..], &types[shared..])),
    );
    (prefix, suffixes)
}
