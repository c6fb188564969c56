//! Reads a Hugging Face model directory's JSON configs (model, tokenizer, sentence-transformers) into typed values.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::scoring::{Activation, Scoring};
use crate::error::StartupError;

/// The fields of `config.json` the encoder architectures need.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    pub vocab_size: usize,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// sentence-transformers (>= 4) stores its CrossEncoder settings here.
    #[serde(default)]
    pub sentence_transformers: Option<SentenceTransformersConfig>,
    /// Where sentence-transformers before 4 saved the CrossEncoder activation (a torch class path); still
    /// honoured by CrossEncoder when `sentence_transformers.activation_fn` is absent.
    #[serde(default)]
    pub sbert_ce_default_activation_function: Option<String>,
}

/// Only the architecture list of a `config.json`, read before deciding how to read the rest.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Architectures {
    #[serde(default)]
    architectures: Vec<String>,
}

impl Architectures {
    pub fn first(&self) -> Option<&str> {
        self.architectures.first().map(String::as_str)
    }
}

/// The part of sentence-transformers' saved config that decides scoring.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SentenceTransformersConfig {
    #[serde(default)]
    pub activation_fn: Option<String>,
}

/// The fields of `tokenizer_config.json` we use.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default)]
    pub model_max_length: Option<f64>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

impl ModelConfig {
    /// Number of classifier outputs, as transformers derives it (id2label wins, default 2).
    pub fn num_labels(&self) -> usize {
        match (&self.id2label, self.num_labels) {
            (Some(labels), _) if !labels.is_empty() => labels.len(),
            (_, Some(n)) => n,
            _ => 2,
        }
    }

    /// The architecture named in config.json (the first of `architectures`).
    pub fn architecture(&self) -> Option<&str> {
        self.architectures.first().map(String::as_str)
    }
}

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path, expected: &str) -> Result<T, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => StartupError::MissingFile {
            path: path.to_path_buf(),
            expected: expected.to_string(),
        },
        _ => StartupError::InvalidFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    serde_json::from_str(&text).map_err(|e| StartupError::InvalidFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads an optional JSON file: Ok(None) when it does not exist.
pub fn read_optional_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StartupError> {
    if path.exists() {
        read_json(path, "").map(Some)
    } else {
        Ok(None)
    }
}

/// Decides the score semantics from the saved configs, as sentence-transformers' CrossEncoder does: a saved
/// activation wins (config_sentence_transformers.json, then config.json's `sentence_transformers.activation_fn`,
/// then the legacy `sbert_ce_default_activation_function`), otherwise sigmoid for one label; two labels score
/// P(label 1); other counts are refused.
pub fn scoring_for(
    config: &ModelConfig,
    config_path: &Path,
    st_config: Option<&SentenceTransformersConfig>,
) -> Result<Scoring, StartupError> {
    let saved_activation = st_config
        .and_then(|c| c.activation_fn.as_deref())
        .or_else(|| {
            config
                .sentence_transformers
                .as_ref()
                .and_then(|c| c.activation_fn.as_deref())
        })
        .or(config.sbert_ce_default_activation_function.as_deref());
    match config.num_labels() {
        1 => match saved_activation {
            None => Ok(Scoring::SingleLogit(Activation::Sigmoid)),
            Some(path) => Activation::from_torch_path(path).map(Scoring::SingleLogit).ok_or_else(|| {
                StartupError::Unsupported(format!(
                    "activation_fn {path:?} is not supported (Sigmoid, Identity or Tanh); use raw scores from a \
                     model saved with Identity"
                ))
            }),
        },
        2 => Ok(Scoring::TwoLabelSoftmax),
        n => Err(StartupError::InvalidFile {
            path: config_path.to_path_buf(),
            reason: format!(
                "the classifier has {n} labels; a reranker needs 1 (relevance logit) or 2 (softmax, label 1 = relevant)"
            ),
        }),
    }
}

/// model_max_length from tokenizer_config.json; None when absent or a "no limit" sentinel (about 1e30).
pub fn tokenizer_max_length(dir: &Path) -> Result<Option<usize>, StartupError> {
    let config: Option<TokenizerConfig> = read_optional_json(&dir.join("tokenizer_config.json"))?;
    Ok(config
        .and_then(|c| c.model_max_length)
        .filter(|n| (1.0..1e9).contains(n))
        .map(|n| n as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        let base = r#"{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 32, "vocab_size": 10"#;
        serde_json::from_str(&format!("{base}{json}}}")).expect("test config parses")
    }

    #[test]
    fn num_labels_follows_transformers() {
        assert_eq!(config("").num_labels(), 2);
        assert_eq!(config(r#", "id2label": {"0": "LABEL_0"}"#).num_labels(), 1);
        assert_eq!(config(r#", "num_labels": 1"#).num_labels(), 1);
    }

    #[test]
    fn saved_activation_wins_and_other_label_counts_are_refused() {
        let path = Path::new("config.json");
        let one = config(
            r#", "num_labels": 1, "sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}"#,
        );
        assert_eq!(
            scoring_for(&one, path, None).ok(),
            Some(Scoring::SingleLogit(Activation::Identity))
        );
        let st = SentenceTransformersConfig {
            activation_fn: Some("torch.nn.modules.activation.Tanh".into()),
        };
        assert_eq!(
            scoring_for(&one, path, Some(&st)).ok(),
            Some(Scoring::SingleLogit(Activation::Tanh))
        );
        let plain = config(r#", "num_labels": 1"#);
        assert_eq!(
            scoring_for(&plain, path, None).ok(),
            Some(Scoring::SingleLogit(Activation::Sigmoid))
        );
        // Older sentence-transformers saved the activation under a key of its own; CrossEncoder still reads it,
        // after `sentence_transformers.activation_fn`.
        let legacy = config(
            r#", "num_labels": 1, "sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity""#,
        );
        assert_eq!(
            scoring_for(&legacy, path, None).ok(),
            Some(Scoring::SingleLogit(Activation::Identity))
        );
        let both = config(
            r#", "num_labels": 1, "sbert_ce_default_activation_function": "torch.nn.modules.activation.Tanh",
            "sentence_transformers": {"activation_fn": "torch.nn.modules.linear.Identity"}"#,
        );
        assert_eq!(
            scoring_for(&both, path, None).ok(),
            Some(Scoring::SingleLogit(Activation::Identity))
        );
        let three = config(r#", "num_labels": 3"#);
        let err = scoring_for(&three, path, None)
            .expect_err("3 labels refused")
            .to_string();
        assert!(
            err.contains("3 labels") && err.contains("config.json"),
            "{err}"
        );
    }
}
