//! A DeBERTa-v2/v3 `config.json` with transformers' defaults, and what the model reads from it (attention
//! terms, relative distances, whether the relative table is normalised), refusing options we do not compute.

use serde::Deserialize;

use crate::model::ops::{FeedForwardActivation, RelativeDistances};
use crate::model::{EncoderConfig, EncoderFacts};

/// The fields of a DeBERTa-v2/v3 `config.json`, with transformers' defaults for those a config may leave out.
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaConfig {
    pub(super) hidden_size: usize,
    pub(super) num_hidden_layers: usize,
    pub(super) num_attention_heads: usize,
    pub(super) intermediate_size: usize,
    #[serde(default = "gelu")]
    pub(super) hidden_act: String,
    pub(super) max_position_embeddings: usize,
    #[serde(default)]
    pub(super) type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub(super) layer_norm_eps: f64,
    pub(super) vocab_size: usize,
    #[serde(default)]
    pub(super) pad_token_id: Option<u32>,
    #[serde(default)]
    pub(super) embedding_size: Option<usize>,
    #[serde(default = "yes")]
    pub(super) position_biased_input: bool,
    #[serde(default)]
    pub(super) relative_attention: bool,
    /// A list (`["p2c", "c2p"]`) or, in older configs, one string (`"p2c|c2p"`).
    #[serde(default)]
    pub(super) pos_att_type: Option<serde_json::Value>,
    #[serde(default = "minus_one")]
    pub(super) position_buckets: i64,
    #[serde(default = "minus_one")]
    pub(super) max_relative_positions: i64,
    #[serde(default)]
    pub(super) share_att_key: bool,
    #[serde(default)]
    pub(super) norm_rel_ebd: Option<String>,
    #[serde(default)]
    pub(super) conv_kernel_size: usize,
    #[serde(default)]
    pub(super) attention_head_size: Option<usize>,
    #[serde(default)]
    pub(super) pooler_hidden_size: Option<usize>,
    #[serde(default = "gelu")]
    pub(super) pooler_hidden_act: String,
}

fn gelu() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-7
}
fn yes() -> bool {
    true
}
fn minus_one() -> i64 {
    -1
}

impl DebertaConfig {
    /// The position terms named by `pos_att_type`, lower-cased.
    pub(super) fn terms(&self) -> Vec<String> {
        let names: Vec<String> = match &self.pos_att_type {
            Some(serde_json::Value::String(s)) => s.split('|').map(str::to_string).collect(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().unwrap_or("?").to_string())
                .collect(),
            _ => Vec::new(),
        };
        names.iter().map(|n| n.trim().to_lowercase()).collect()
    }

    pub(super) fn head_dim(&self) -> usize {
        self.attention_head_size
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The relative distances' table layout, when the model attends by relative position.
    pub(super) fn distances(&self) -> Option<RelativeDistances> {
        if !self.relative_attention {
            return None;
        }
        let max_position = match self.max_relative_positions {
            m if m < 1 => self.max_position_embeddings,
            m => m as usize,
        };
        let buckets = (self.position_buckets > 0).then_some(self.position_buckets as usize);
        Some(RelativeDistances {
            span: buckets.unwrap_or(max_position),
            buckets,
            max_position,
        })
    }

    pub(super) fn normalises_relative_embeddings(&self) -> bool {
        let names = self
            .norm_rel_ebd
            .as_deref()
            .unwrap_or("none")
            .to_lowercase();
        names.split('|').any(|n| n.trim() == "layer_norm")
    }
}

impl EncoderConfig for DebertaConfig {
    fn unsupported(&self) -> Option<String> {
        if self.conv_kernel_size > 0 {
            return Some("conv_kernel_size (the convolution of DeBERTa-v2 xlarge/xxlarge) is not implemented".into());
        }
        if let Some(term) = self
            .terms()
            .iter()
            .find(|t| !["c2p", "p2c"].contains(&t.as_str()))
        {
            return Some(format!(
                "pos_att_type {term:?} (only c2p and p2c are implemented)"
            ));
        }
        if self
            .pooler_hidden_size
            .is_some_and(|p| p != self.hidden_size)
        {
            return Some("pooler_hidden_size different from hidden_size".into());
        }
        if self.num_attention_heads == 0
            || (self.attention_head_size.is_none()
                && !self.hidden_size.is_multiple_of(self.num_attention_heads))
        {
            return Some("hidden_size not a multiple of num_attention_heads".into());
        }
        [&self.hidden_act, &self.pooler_hidden_act]
            .into_iter()
            .find(|name| FeedForwardActivation::from_config(name).is_none())
            .map(|name| format!("activation {name:?}"))
    }

    fn facts(&self) -> EncoderFacts {
        EncoderFacts {
            max_positions: self.max_position_embeddings,
            vocab_size: self.vocab_size,
            pad_token_id: self.pad_token_id,
            attention_span: 2 * self.hidden_size + self.intermediate_size,
        }
    }
}
