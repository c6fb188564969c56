//! ModernBertForSequenceClassification (e.g. Alibaba-NLP/gte-reranker-modernbert-base): pre-norm layers with rotary
//! positions (a global theta and a local one), global attention every `global_attn_every_n_layers` layers and a
//! sliding window of ±local_attention/2 in the others, a GeGLU MLP, no biases where the config turns them off, a
//! final norm, then `classifier_pooling` (cls or mean) → dense → activation → norm → classifier.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::model::ops::{self, Bias, FeedForwardActivation, LayerNorm, Linear, Target, Weights};
use crate::model::{CrossEncoder, EncoderConfig, EncoderFacts, OwnConfigEncoder, PackedBatch};

pub const ARCHITECTURE: &str = "ModernBertForSequenceClassification";

/// The fields of a ModernBERT `config.json`, as transformers 4 and 5 write them (`norm_eps`, per-layer-type rope).
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_every")]
    pub global_attn_every_n_layers: usize,
    #[serde(default = "default_window")]
    pub local_attention: usize,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// transformers 5: "full_attention" / "sliding_attention" per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// transformers 5: rope_theta per layer type.
    #[serde(default)]
    pub rope_parameters: Option<std::collections::HashMap<String, RopeParameters>>,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_act")]
    pub classifier_activation: String,
    #[serde(default = "default_pooling")]
    pub classifier_pooling: String,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_every() -> usize {
    3
}
fn default_window() -> usize {
    128
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pooling() -> String {
    "cls".into()
}

impl EncoderConfig for ModernBertConfig {
    fn facts(&self) -> EncoderFacts {
        EncoderFacts::gated(
            (self.hidden_size, self.intermediate_size),
            self.max_position_embeddings,
            self.vocab_size,
            self.pad_token_id,
        )
    }

    /// What this implementation cannot follow, if anything.
    fn unsupported(&self) -> Option<String> {
        let known = |name: &str| FeedForwardActivation::from_config(name).is_some();
        if !known(&self.hidden_activation) || !known(&self.classifier_activation) {
            Some(format!(
                "activations {:?} / {:?}",
                self.hidden_activation, self.classifier_activation
            ))
        } else if !matches!(self.classifier_pooling.as_str(), "cls" | "mean") {
            Some(format!("classifier_pooling {:?}", self.classifier_pooling))
        } else {
            None
        }
    }
}

impl ModernBertConfig {
    /// Whether layer i attends globally (else in the sliding window).
    fn is_global(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(layer).is_some_and(|t| t == "full_attention"),
            None => layer.is_multiple_of(self.global_attn_every_n_layers.max(1)),
        }
    }

    /// The rotary theta of global or local layers (a local layer without its own theta uses the global one).
    fn theta(&self, global: bool) -> f64 {
        let from_types = |kind: &str| self.rope_parameters.as_ref()?.get(kind)?.rope_theta;
        let global_theta = from_types("full_attention")
            .or(self.global_rope_theta)
            .unwrap_or(160_000.0);
        if global {
            global_theta
        } else {
            from_types("sliding_attention")
                .or(self.local_rope_theta)
                .unwrap_or(global_theta)
        }
    }
}

struct Layer {
    /// None in the first layer (transformers' Identity).
    attn_norm: Option<LayerNorm>,
    qkv: Linear,
    out: Linear,
    mlp_norm: LayerNorm,
    /// input | gate in one GEMM.
    wi: Linear,
    wo: Linear,
    global: bool,
}

pub struct ModernBert {
    embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    head_dense: Linear,
    head_norm: LayerNorm,
    classifier: Linear,
    activation: FeedForwardActivation,
    head_activation: FeedForwardActivation,
    mean_pooling: bool,
    heads: usize,
    window: usize,
    thetas: (f64, f64),
    target: Target,
}

impl OwnConfigEncoder for ModernBert {
    type Config = ModernBertConfig;

    fn load(vb: Weights, config: &ModernBertConfig, num_labels: usize) -> Result<Self> {
        let (h, inner, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.norm_eps,
        );
        let body = vb.pp("model");
        let activation = |name: &str| {
            FeedForwardActivation::from_config(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("activation {name:?}")))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let layer = body.pp("layers").pp(i.to_string());
                let linear = |vb: Weights, i: usize, o: usize| vb.linear(i, o, Bias::IfStored);
                let norm = |vb: Weights| vb.layer_norm(h, eps, Bias::IfStored);
                Ok(Layer {
                    attn_norm: if i == 0 {
                        None
                    } else {
                        Some(norm(layer.pp("attn_norm"))?)
                    },
                    qkv: linear(layer.pp("attn").pp("Wqkv"), h, 3 * h)?,
                    out: linear(layer.pp("attn").pp("Wo"), h, h)?,
                    mlp_norm: norm(layer.pp("mlp_norm"))?,
                    wi: linear(layer.pp("mlp").pp("Wi"), h, 2 * inner)?,
                    wo: linear(layer.pp("mlp").pp("Wo"), inner, h)?,
                    global: config.is_global(i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = vb.pp("head");
        let norm = |vb: Weights| vb.layer_norm(h, eps, Bias::IfStored);
        Ok(Self {
            embeddings: body
                .pp("embeddings")
                .pp("tok_embeddings")
                .tensor((config.vocab_size, h), "weight")?,
            embedding_norm: norm(body.pp("embeddings").pp("norm"))?,
            layers,
            final_norm: norm(body.pp("final_norm"))?,
            head_dense: head.pp("dense").head_linear(h, h, Bias::IfStored)?,
            head_norm: norm(head.pp("norm"))?,
            classifier: vb
                .pp("classifier")
                .head_linear(h, num_labels, Bias::IfStored)?,
            activation: activation(&config.hidden_activation)?,
            head_activation: activation(&config.classifier_activation)?,
            mean_pooling: config.classifier_pooling == "mean",
            heads: config.num_attention_heads,
            window: config.local_attention / 2,
            thetas: (config.theta(true), config.theta(false)),
            target: vb.target(),
        })
    }
}

impl ModernBert {
    /// One pre-norm layer on the fp32 residual stream x [tokens, hidden].
    fn layer(
        &self,
        layer: &Layer,
        x: &Tensor,
        rotary: &(Tensor, Tensor),
        cu_seqlens: &[usize],
    ) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let head_dim = hidden / self.heads;
        let normed = match &layer.attn_norm {
            Some(norm) => norm.forward(x)?,
            None => x.clone(),
        };
        let qkv = ops::linear(&layer.qkv, &self.target.gemm_input(&normed)?)?;
        let part = |i: usize| {
            qkv.narrow(1, i * hidden, hidden)?
                .reshape((tokens, self.heads, head_dim))
        };
        let (q, k) = (
            ops::rotate(&part(0)?, rotary)?,
            ops::rotate(&part(1)?, rotary)?,
        );
        let v = ops::residual(&part(2)?)?;
        let window = (!layer.global).then_some(self.window);
        let context = ops::windowed_attention(&q, &k, &v, cu_seqlens, window)?;
        let attended = ops::linear(&layer.out, &self.target.gemm_input(&context)?)?;
        let x = (x + ops::residual(&attended)?)?;
        let normed = self.target.gemm_input(&layer.mlp_norm.forward(&x)?)?;
        let input_gate = ops::linear(&layer.wi, &normed)?;
        let gated = ops::gated_activation(&input_gate, ops::ActivatedHalf::First, self.activation)?;
        x + ops::residual(&ops::linear(&layer.wo, &gated)?)?
    }

    /// Each sequence's first token, or the mean of its tokens: [sequences, hidden].
    fn pool(&self, h: &Tensor, batch: &PackedBatch) -> Result<Tensor> {
        if !self.mean_pooling {
            let first: Vec<u32> = batch.cu_seqlens[..batch.size()]
                .iter()
                .map(|&s| s as u32)
                .collect();
            return h.index_select(&self.target.ids(&first)?, 0);
        }
        let means = batch
            .cu_seqlens
            .windows(2)
            .map(|w| h.narrow(0, w[0], w[1] - w[0])?.mean_keepdim(0))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&means, 0)
    }
}

impl CrossEncoder for ModernBert {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let ids = self.target.ids(&batch.input_ids)?;
        let mut x = self
            .embedding_norm
            .forward(&self.embeddings.index_select(&ids, 0)?)?;
        let head_dim = x.dim(1)? / self.heads;
        let (global_theta, local_theta) = self.thetas;
        let spans = || batch.lengths().map(|l| 0..l);
        let global = self.target.rotary_tables(spans(), head_dim, global_theta)?;
        let local = self.target.rotary_tables(spans(), head_dim, local_theta)?;
        for layer in &self.layers {
            let rotary = if layer.global { &global } else { &local };
            x = self.layer(layer, &x, rotary, &batch.cu_seqlens)?;
        }
        let pooled = self.pool(&self.final_norm.forward(&x)?, batch)?;
        let dense = self
            .head_activation
            .apply(&self.head_dense.forward(&pooled)?)?;
        self.classifier.forward(&self.head_norm.forward(&dense)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ModernBertConfig {
        let base = r#"{"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4, "num_attention_heads": 2,
            "max_position_embeddings": 64, "vocab_size": 10"#;
        serde_json::from_str(&format!("{base}{extra}}}")).expect("config parses")
    }

    #[test]
    fn layer_kinds_and_thetas_read_alike_from_transformers_4_and_5_configs() {
        // As ModernBERT checkpoints are published (transformers 4).
        let v4 = config(
            r#", "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0"#,
        );
        // As transformers 5 saves the same model.
        let v5 = config(
            r#", "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_theta": 160000.0, "rope_type": "default"},
                                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}"#,
        );
        for c in [&v4, &v5] {
            let kinds: Vec<bool> = (0..4).map(|i| c.is_global(i)).collect();
            assert_eq!(kinds, [true, false, false, true]);
            assert_eq!((c.theta(true), c.theta(false)), (160000.0, 10000.0));
        }
        // A local layer without a theta of its own uses the global one, as transformers 4 did.
        let no_local = config(r#", "global_rope_theta": 80000.0"#);
        assert_eq!(no_local.theta(false), 80000.0);
        assert!(config(r#", "classifier_pooling": "max""#)
            .unsupported()
            .is_some());
    }
}
