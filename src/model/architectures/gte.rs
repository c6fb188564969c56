//! GTE's multilingual encoder, NewForSequenceClassification (model_type "new", e.g.
//! Alibaba-NLP/gte-multilingual-reranker-base), as its published remote code computes it: word (+ token type)
//! embeddings and a LayerNorm, rotary positions (NTK-scaled where the config says), post-norm layers of
//! packed-QKV attention and a GLU MLP, then a tanh pooler on the first token and the classifier.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::model::ops::{
    self, ActivatedHalf, Bias, FeedForwardActivation, Hidden, LayerNorm, Linear, Sequences, Target,
    Weights,
};
use crate::model::{CrossEncoder, EncoderConfig, EncoderFacts, OwnConfigEncoder, PackedBatch};

pub const ARCHITECTURE: &str = "NewForSequenceClassification";

/// The fields of a `config.json` of model_type "new" (defaults as the published NewConfig's).
#[derive(Debug, Clone, Deserialize)]
pub struct GteConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm")]
    pub layer_norm_type: String,
    #[serde(default = "default_rope")]
    pub position_embedding_type: String,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_true")]
    pub pack_qkv: bool,
    #[serde(default)]
    pub logn_attention_scale: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// `rope_scaling`: transformers 4 writes `type`, transformers 5 adds `rope_type`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub rope_type: Option<String>,
    pub factor: f64,
    #[serde(default)]
    pub mixed_b: Option<f64>,
}

fn default_positions() -> usize {
    2048
}
fn default_type_vocab() -> usize {
    1
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_layer_norm() -> String {
    "layer_norm".into()
}
fn default_rope() -> String {
    "rope".into()
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_true() -> bool {
    true
}

impl EncoderConfig for GteConfig {
    fn facts(&self) -> EncoderFacts {
        // Rotary positions have no table: the published code extends its cache to any length, and
        // max_position_embeddings is the length the model was trained for.
        EncoderFacts::gated(
            (self.hidden_size, self.intermediate_size),
            self.max_position_embeddings,
            self.vocab_size,
            self.pad_token_id,
        )
    }

    /// What this implementation cannot follow, if anything.
    fn unsupported(&self) -> Option<String> {
        let scaling = self.rope_scaling.as_ref();
        let scaling_kind = scaling.and_then(|s| s.kind.as_deref().or(s.rope_type.as_deref()));
        if FeedForwardActivation::from_config(&self.hidden_act).is_none() {
            Some(format!("hidden_act {:?}", self.hidden_act))
        } else if self.position_embedding_type != "rope" {
            Some(format!(
                "position_embedding_type {:?} (rotary only)",
                self.position_embedding_type
            ))
        } else if self.layer_norm_type != "layer_norm" {
            Some(format!("layer_norm_type {:?}", self.layer_norm_type))
        } else if self.logn_attention_scale {
            Some("logn_attention_scale".into())
        } else if scaling.is_some() && scaling_kind != Some("ntk") {
            Some(format!("rope_scaling type {scaling_kind:?} (ntk only)"))
        } else if scaling.is_some_and(|s| s.factor <= 1.0) {
            // The published code keeps unscaled frequencies at load for such factors and switches once a longer
            // sequence arrives: scores would depend on what the process saw before.
            Some("rope_scaling factor of 1 or less".into())
        } else if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            Some(format!(
                "{} heads over a width of {}",
                self.num_attention_heads, self.hidden_size
            ))
        } else {
            None
        }
    }
}

impl GteConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// The rotary inverse frequencies the published code ends up with. With NTK scaling it builds its cos/sin cache
    /// for max_position_embeddings·factor positions when the model is made, which selects the scaled frequencies
    /// for every length: 1/(θ·f)^(2i/d) / f^(2/d), or with `mixed_b` b, 1/θ^(2i/d) / exp(a·(i+1)^b) where
    /// a = ln f / (d/2)^b.
    pub fn inverse_frequencies(&self) -> Vec<f32> {
        let dim = self.head_dim();
        let Some(scaling) = &self.rope_scaling else {
            return ops::inverse_frequencies(dim, self.rope_theta);
        };
        let factor = scaling.factor;
        match scaling.mixed_b {
            None => {
                let shrink = factor.powf(2.0 / dim as f64) as f32;
                ops::inverse_frequencies(dim, self.rope_theta * factor)
                    .into_iter()
                    .map(|f| f / shrink)
                    .collect()
            }
            Some(b) => {
                let a = factor.ln() / (dim as f64 / 2.0).powf(b);
                ops::inverse_frequencies(dim, self.rope_theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| f / (a * ((i + 1) as f64).powf(b)).exp() as f32)
                    .collect()
            }
        }
    }
}

struct Layer {
    qkv: Linear,
    out: Linear,
    attn_norm: LayerNorm,
    /// [up | gate] in one GEMM.
    up_gate: Linear,
    down: Linear,
    mlp_norm: LayerNorm,
}

pub struct Gte {
    word_embeddings: Tensor,
    /// Row 0 of the token-type table when there is one row (the tokenizer's type ids are not used, as CrossEncoder
    /// passes none for the XLM-R tokenizer); the whole table when there are several.
    token_types: Option<Tensor>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Linear,
    classifier: Linear,
    activation: FeedForwardActivation,
    heads: usize,
    inverse_frequencies: Vec<f32>,
    /// The attention kernels add a QKV bias; here it was added before the rotation, so they get zeros.
    zero_qkv_bias: Tensor,
    target: Target,
}

impl OwnConfigEncoder for Gte {
    type Config = GteConfig;

    fn load(vb: Weights, config: &GteConfig, num_labels: usize) -> Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let body = vb.pp("new");
        let layers = (0..config.num_hidden_layers)
            .map(|i| load_layer(&body.pp("encoder").pp("layer").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let embeddings = body.pp("embeddings");
        let token_types = match config.type_vocab_size {
            0 => None,
            rows => Some(
                embeddings
                    .pp("token_type_embeddings")
                    .residual_tensor((rows, h), "weight")?,
            ),
        };
        let activation =
            FeedForwardActivation::from_config(&config.hidden_act).ok_or_else(|| {
                candle_core::Error::Msg(format!("activation {:?}", config.hidden_act))
            })?;
        let target = vb.target();
        Ok(Self {
            word_embeddings: embeddings
                .pp("word_embeddings")
                .tensor((config.vocab_size, h), "weight")?,
            token_types,
            embedding_norm: embeddings
                .pp("LayerNorm")
                .layer_norm(h, eps, Bias::Stored)?,
            layers,
            pooler: body
                .pp("pooler")
                .pp("dense")
                .head_linear(h, h, Bias::Stored)?,
            classifier: vb
                .pp("classifier")
                .head_linear(h, num_labels, Bias::Stored)?,
            activation,
            heads: config.num_attention_heads,
            inverse_frequencies: config.inverse_frequencies(),
            zero_qkv_bias: target.zero_bias(3 * h)?,
            target,
        })
    }
}

impl Gte {
    /// Word plus token-type embeddings, normalised: the fp32 residual stream [tokens, hidden].
    fn embed(&self, batch: &PackedBatch) -> Result<Tensor> {
        let ids = self.target.ids(&batch.input_ids)?;
        let words = ops::residual(&self.word_embeddings.index_select(&ids, 0)?)?;
        let summed = match &self.token_types {
            None => words,
            Some(table) if table.dim(0)? == 1 => words.broadcast_add(&table.get(0)?)?,
            Some(table) => {
                let types = self.target.ids(&batch.type_ids)?;
                (words + table.index_select(&types, 0)?)?
            }
        };
        self.embedding_norm.forward(&summed)
    }

    /// One post-norm layer over the packed tokens. With `first_only`, only each sequence's first token leaves
    /// the layer: its attention still reads every token, but the output projection and the MLP run on it alone.
    fn layer(
        &self,
        layer: &Layer,
        x: &Hidden,
        rotary: &(Tensor, Tensor),
        sequences: &Sequences,
        first_only: bool,
    ) -> Result<Hidden> {
        let qkv = ops::rotate_qk(&ops::linear(&layer.qkv, &x.input)?, self.heads, rotary)?;
        let context =
            ops::self_attention(&qkv, &self.zero_qkv_bias, sequences, self.heads, first_only)?;
        let residual = if first_only {
            x.first_tokens(sequences)?.residual
        } else {
            x.residual.clone()
        };
        let attended =
            ops::linear_residual_norm(&layer.out, &context, &residual, &layer.attn_norm)?;
        let up_gate = ops::linear(&layer.up_gate, &attended.input)?;
        let gated = ops::gated_activation(&up_gate, ActivatedHalf::Second, self.activation)?;
        ops::linear_residual_norm(&layer.down, &gated, &attended.residual, &layer.mlp_norm)
    }
}

fn load_layer(vb: &Weights, config: &GteConfig) -> Result<Layer> {
    let (h, inner, eps) = (
        config.hidden_size,
        config.intermediate_size,
        config.layer_norm_eps,
    );
    let attention = vb.pp("attention");
    let qkv = if config.pack_qkv {
        attention.pp("qkv_proj").linear(h, 3 * h, Bias::Stored)?
    } else {
        let parts = [("q_proj", h), ("k_proj", h), ("v_proj", h)];
        attention.fused_linear(&parts, h, Bias::Stored)?
    };
    let mlp = vb.pp("mlp");
    Ok(Layer {
        qkv,
        out: attention.pp("o_proj").linear(h, h, Bias::Stored)?,
        attn_norm: vb.pp("attn_ln").layer_norm(h, eps, Bias::Stored)?,
        up_gate: mlp.pp("up_gate_proj").linear(h, 2 * inner, Bias::None)?,
        down: mlp.pp("down_proj").linear(inner, h, Bias::Stored)?,
        mlp_norm: vb.pp("mlp_ln").layer_norm(h, eps, Bias::Stored)?,
    })
}

impl CrossEncoder for Gte {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let mut x = self.target.hidden(self.embed(batch)?)?;
        let rotary = self
            .target
            .rotary_tables_from(batch.lengths().map(|l| 0..l), &self.inverse_frequencies)?;
        let sequences = self.target.sequences(&batch.cu_seqlens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            // Past the last layer's attention only each sequence's first token reaches the pooler.
            let first_only = i + 1 == self.layers.len();
            x = self.layer(layer, &x, &rotary, &sequences, first_only)?;
        }
        if self.layers.is_empty() {
            x = x.first_tokens(&sequences)?;
        }
        let pooled = ops::dense_tanh(&self.pooler, &x.residual)?;
        self.classifier.forward(&pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> GteConfig {
        let base = r#"{"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 10, "rope_theta": 20000"#;
        serde_json::from_str(&format!("{base}{extra}}}")).expect("config parses")
    }

    #[test]
    fn ntk_scaling_gives_the_frequencies_of_the_published_cache() {
        // head_dim 8, θ 20000, factor 8: 1/160000^(2i/8) / 8^(1/4).
        let scaled = config(r#", "rope_scaling": {"factor": 8.0, "type": "ntk"}"#);
        let expected = [0.594_603_6, 0.029_730_18, 0.001_486_509, 7.432_545e-5];
        for (got, want) in scaled.inverse_frequencies().iter().zip(expected) {
            assert!((got - want).abs() <= want * 1e-5, "{got} vs {want}");
        }
        // Mixed: θ unscaled, each frequency divided by exp(a·(i+1)^b).
        let mixed =
            config(r#", "rope_scaling": {"factor": 4.0, "rope_type": "ntk", "mixed_b": 0.8}"#);
        let a = 4f64.ln() / 4f64.powf(0.8);
        let first = mixed.inverse_frequencies()[0];
        assert!((first as f64 - 1.0 / a.exp()).abs() < 1e-6, "{first}");
        assert_eq!(
            config("").inverse_frequencies(),
            ops::inverse_frequencies(8, 20000.0)
        );
    }

    #[test]
    fn options_the_published_code_has_but_this_model_lacks_are_refused() {
        assert!(config("").unsupported().is_none());
        for extra in [
            r#", "position_embedding_type": "absolute""#,
            r#", "layer_norm_type": "rms_norm""#,
            r#", "logn_attention_scale": true"#,
            r#", "rope_scaling": {"factor": 2.0, "type": "linear"}"#,
            r#", "rope_scaling": {"factor": 1.0, "type": "ntk"}"#,
            r#", "hidden_act": "quick_gelu""#,
        ] {
            assert!(config(extra).unsupported().is_some(), "{extra}");
        }
    }
}
