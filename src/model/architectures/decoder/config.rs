//! The fields of a decoder `config.json` (Qwen2, Qwen3, Gemma, layerwise MiniCPM) the decoder reads, and what it
//! refuses to serve.

use serde::Deserialize;

use crate::model::ops::FeedForwardActivation;

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
    /// MiniCPM: embeddings are multiplied by scale_emb, and each layer's two residual branches by
    /// scale_depth / √num_hidden_layers.
    #[serde(default)]
    pub scale_emb: Option<f64>,
    #[serde(default)]
    pub scale_depth: Option<f64>,
    /// Layerwise MiniCPM rerankers: the first layer with a score head, and the heads' kind ("simple": one
    /// bias-free row per layer from start_layer to the last, on the final norm of that layer's output).
    #[serde(default)]
    pub start_layer: Option<usize>,
    #[serde(default)]
    pub head_multi: Option<bool>,
    #[serde(default)]
    pub head_type: Option<String>,
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
    pub(super) fn mlp_activation(&self) -> &str {
        self.hidden_activation
            .as_deref()
            .unwrap_or(&self.hidden_act)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// A config without rope_theta gets transformers' default for these families (10,000).
    pub(super) fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.rope_theta)
            .unwrap_or(10_000.0)
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
        } else if self.head_type.as_deref().is_some_and(|t| t != "simple")
            || self.head_multi == Some(false)
        {
            Some(
                "layerwise heads other than one simple head per layer (head_type, head_multi)"
                    .into(),
            )
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
