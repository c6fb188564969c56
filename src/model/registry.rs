//! Loading a model directory: config.json's `architectures[0]` looked up in the architecture table
//! (`architectures/mod.rs`), and the load every architecture shares (config, weights, precision, memory map).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::architectures::ARCHITECTURES;
use super::hf_config::{self, ModelConfig, SentenceTransformersConfig};
use super::ops::{self, FeedForwardActivation, GemmPrecision, Weights};
use super::scoring::Scoring;
use super::{CrossEncoder, LoadedModel};
use crate::error::StartupError;
use crate::tokenization::PromptTemplate;

/// One architecture the server runs: config.json's `architectures[0]` and how to build it.
pub struct Architecture {
    pub name: &'static str,
    pub build: Builder,
}

/// Builds an architecture's model from its directory and weights.
pub type Builder = fn(&ModelSource, Weights) -> Result<Built, StartupError>;

/// The names of every architecture, for errors and `Info`.
pub fn supported() -> impl Iterator<Item = &'static str> {
    ARCHITECTURES.iter().map(|a| a.name)
}

/// A model directory being loaded: where it is, its config.json, and the architecture it names.
pub struct ModelSource {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub architecture: String,
    config: serde_json::Value,
}

const CONFIG_EXPECTED: &str = "the model's config.json (architecture and shapes)";

impl ModelSource {
    fn open(dir: &Path) -> Result<Self, StartupError> {
        let config_path = dir.join("config.json");
        let config: serde_json::Value = hf_config::read_json(&config_path, CONFIG_EXPECTED)?;
        let architectures = hf_config::Architectures::deserialize(&config).map_err(|e| {
            StartupError::InvalidFile {
                path: config_path.clone(),
                reason: format!("{e} (expected {CONFIG_EXPECTED})"),
            }
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            architecture: architectures.first().unwrap_or_default().to_string(),
            config_path,
            config,
        })
    }

    /// config.json read as an architecture's own config type.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, StartupError> {
        T::deserialize(&self.config).map_err(|e| StartupError::InvalidFile {
            path: self.config_path.clone(),
            reason: format!("{e} (expected {CONFIG_EXPECTED})"),
        })
    }

    /// Refuses a config the implementation cannot follow, naming the reason and the file.
    pub fn refuse(&self, reason: Option<String>) -> Result<(), StartupError> {
        match reason {
            Some(reason) => Err(StartupError::Unsupported(format!(
                "{reason} in {}",
                self.config_path.display()
            ))),
            None => Ok(()),
        }
    }

    /// How logits become scores: the labels of config.json and sentence-transformers' activation, if stored.
    pub fn scoring(&self) -> Result<Scoring, StartupError> {
        let labels: ModelConfig = self.config()?;
        let st: Option<SentenceTransformersConfig> =
            hf_config::read_optional_json(&self.dir.join("config_sentence_transformers.json"))?;
        hf_config::scoring_for(&labels, &self.config_path, st.as_ref())
    }

    /// A `hidden_act`-style activation name, refused when the ops do not have it.
    pub fn activation(&self, name: &str) -> Result<FeedForwardActivation, StartupError> {
        FeedForwardActivation::from_config(name).ok_or_else(|| {
            StartupError::Unsupported(format!(
                "activation {name:?} in {}",
                self.config_path.display()
            ))
        })
    }
}

/// What an architecture's build gives the loader (see `LoadedModel` for each field).
pub struct Built {
    pub model: Box<dyn CrossEncoder>,
    pub max_positions: usize,
    pub vocab_size: usize,
    pub pad_token_id: u32,
    pub attention_span: usize,
    pub scoring: Scoring,
    pub prompt: Option<PromptTemplate>,
    pub default_max_length: Option<usize>,
    pub cutoff_layers: Option<super::CutoffLayers>,
}

impl Built {
    /// An encoder cross-encoder: no prompt, the tokenizer's own max_length.
    pub fn encoder(
        model: Box<dyn CrossEncoder>,
        facts: super::EncoderFacts,
        scoring: Scoring,
    ) -> Self {
        Self {
            model,
            max_positions: facts.max_positions,
            vocab_size: facts.vocab_size,
            pad_token_id: facts.pad_token_id.unwrap_or(0),
            attention_span: facts.attention_span,
            scoring,
            prompt: None,
            default_max_length: None,
            cutoff_layers: None,
        }
    }
}

/// Loads the model of a local Hugging Face model directory onto `device`, converting the weights to `dtype`.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel, StartupError> {
    let source = ModelSource::open(dir)?;
    let Some(entry) = ARCHITECTURES.iter().find(|a| a.name == source.architecture) else {
        return Err(StartupError::Unsupported(format!(
            "architecture {:?} in {} (supported: {})",
            source.architecture,
            source.config_path.display(),
            supported().collect::<Vec<_>>().join(", ")
        )));
    };
    let files = weight_files(dir)?;
    let (weights_dtype, precision, dtype) = cpu_precision(device, dtype);
    // SAFETY: the files are memory-mapped read-only; they must not be modified while the server runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, weights_dtype, device)? };
    let built = (entry.build)(&source, Weights::new(vb, precision))?;
    Ok(LoadedModel {
        model: built.model,
        architecture: source.architecture,
        max_positions: built.max_positions,
        vocab_size: built.vocab_size,
        scoring: built.scoring,
        dtype,
        pad_token_id: built.pad_token_id,
        attention_span: built.attention_span,
        prompt: built.prompt,
        default_max_length: built.default_max_length,
        cutoff_layers: built.cutoff_layers,
    })
}

/// What a dtype means on this device: (dtype the weights load in, GEMM precision, dtype reported). On a CPU,
/// bf16 runs the encoder GEMMs on AMX tiles (bf16 products, fp32 sums) over fp32 weights and activations;
/// without AMX, bf16 would only be slower than fp32 (each op widens it), so the model runs in fp32.
pub(crate) fn cpu_precision(device: &Device, dtype: DType) -> (DType, GemmPrecision, DType) {
    if !device.is_cpu() || dtype != DType::BF16 {
        return (dtype, GemmPrecision::Weights, dtype);
    }
    if ops::cpu_has_bf16_tiles() {
        tracing::info!("bf16 on this CPU: encoder GEMMs on AMX tiles (bf16 products, fp32 sums), other ops in fp32");
        (DType::F32, GemmPrecision::Bf16Tiles, DType::BF16)
    } else {
        tracing::warn!(
            "bf16 was asked for, but this CPU has no AMX-BF16 (or the kernel withholds it): computing in fp32, \
             which is faster here than bf16 widened op by op"
        );
        (DType::F32, GemmPrecision::Weights, DType::F32)
    }
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The safetensors files holding the weights: `model.safetensors`, or the shards named by its index.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, StartupError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let index: SafetensorsIndex =
            hf_config::read_json(&index_path, "a safetensors shard index")?;
        let mut shards: Vec<PathBuf> = index.weight_map.values().map(|f| dir.join(f)).collect();
        shards.sort();
        shards.dedup();
        if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
            return Err(StartupError::MissingFile {
                path: missing.clone(),
                expected: format!("a weight shard named in {}", index_path.display()),
            });
        }
        return Ok(shards);
    }
    let expected = if dir.join("pytorch_model.bin").exists() {
        "the weights in safetensors format; this model only has pytorch_model.bin, which is not loaded (convert \
         it, e.g. with transformers' save_pretrained(safe_serialization=True))"
    } else {
        "the model weights in safetensors format (model.safetensors or model.safetensors.index.json)"
    };
    Err(StartupError::MissingFile {
        path: single,
        expected: expected.into(),
    })
}
