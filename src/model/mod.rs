//! Cross-encoder models: loading a Hugging Face model directory and running a packed batch to logits.

pub mod architectures;
pub mod hf_config;
pub mod ops;
pub mod prefix_cache;
pub mod prefix_reuse;
pub mod registry;
pub mod scoring;

use candle_core::{DType, Tensor};

use crate::error::StartupError;
use crate::tokenization::PromptTemplate;
pub use registry::{load, weight_files, Built, ModelSource};
use scoring::Scoring;

/// A batch of token sequences packed back to back without padding, device-independent.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBatch {
    /// Every sequence's ids, concatenated: [real tokens].
    pub input_ids: Vec<u32>,
    /// Token type ids, aligned with `input_ids`.
    pub type_ids: Vec<u32>,
    /// Sequence i is tokens cu_seqlens[i]..cu_seqlens[i + 1]; starts at 0, one entry more than sequences.
    pub cu_seqlens: Vec<usize>,
    /// The longest sequence.
    pub max_len: usize,
    /// Layerwise rerankers: per sequence, the layer whose score head gives its score (0: the model's default);
    /// empty when every sequence takes the default.
    pub exit_layers: Vec<u32>,
}

impl Default for PackedBatch {
    fn default() -> Self {
        Self {
            input_ids: Vec::new(),
            type_ids: Vec::new(),
            cu_seqlens: vec![0],
            max_len: 0,
            exit_layers: Vec::new(),
        }
    }
}

impl PackedBatch {
    pub fn size(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// Tokens a device that pads every sequence to the longest one computes.
    pub fn padded_tokens(&self) -> usize {
        self.size() * self.max_len
    }

    pub fn real_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.cu_seqlens.windows(2).map(|w| w[1] - w[0])
    }

    /// Each sequence's (ids, type ids).
    pub fn rows(&self) -> impl Iterator<Item = (&[u32], &[u32])> + Clone {
        self.cu_seqlens
            .windows(2)
            .map(move |w| (&self.input_ids[w[0]..w[1]], &self.type_ids[w[0]..w[1]]))
    }

    /// Splits into the first `n` sequences and the rest.
    pub fn split_at(&self, n: usize) -> (PackedBatch, PackedBatch) {
        let rows = self.rows();
        let mut first = Self::from_sequences(rows.clone().take(n));
        let mut rest = Self::from_sequences(rows.skip(n));
        if !self.exit_layers.is_empty() {
            let cut = n.min(self.exit_layers.len());
            first.exit_layers = self.exit_layers[..cut].to_vec();
            rest.exit_layers = self.exit_layers[cut..].to_vec();
        }
        (first, rest)
    }

    /// Sequence `i`'s exit layer (0: the model's default).
    pub fn exit_layer(&self, i: usize) -> u32 {
        self.exit_layers.get(i).copied().unwrap_or(0)
    }

    /// Packs sequences (ids, type ids).
    pub fn from_sequences<'a>(sequences: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> Self {
        let mut batch = PackedBatch::default();
        for (ids, types) in sequences {
            batch.input_ids.extend_from_slice(ids);
            batch.type_ids.extend_from_slice(types);
            batch.type_ids.resize(batch.input_ids.len(), 0);
            batch.cu_seqlens.push(batch.input_ids.len());
            batch.max_len = batch.max_len.max(ids.len());
        }
        batch
    }
}

/// A sequence-classification model: a packed batch in, logits [sequences, num_labels] out.
pub trait CrossEncoder: Send + Sync {
    fn forward(&self, batch: &PackedBatch) -> candle_core::Result<Tensor>;

    /// Hits and misses of the prompt prefixes a decoder keeps across batches; None for models without them.
    fn prefix_cache_stats(&self) -> Option<prefix_cache::PrefixCacheStats> {
        None
    }

    /// Forgets what earlier batches left for later ones (after warm-up and probe batches).
    fn clear_prefix_cache(&self) {}
}

/// The layers of a layerwise reranker that carry a score head, 1-based: a request may read its score after any
/// of first..=last; `default` when it names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutoffLayers {
    pub first: usize,
    pub last: usize,
    pub default: usize,
}

impl CutoffLayers {
    /// Refuses a layer without a score head.
    pub fn check(&self, layer: usize) -> Result<(), String> {
        match (self.first..=self.last).contains(&layer) {
            true => Ok(()),
            false => Err(format!(
                "cutoff_layer {layer} has no score head: this model scores after layers {} to {} (default {})",
                self.first, self.last, self.default
            )),
        }
    }
}

/// A loaded model with what the rest of the server needs to know about it.
pub struct LoadedModel {
    pub model: Box<dyn CrossEncoder>,
    pub architecture: String,
    /// Longest sequence the position embeddings allow.
    pub max_positions: usize,
    pub vocab_size: usize,
    pub scoring: Scoring,
    pub dtype: DType,
    /// The padding token (config.json pad_token_id, else 0): a valid id for warm-up and probe batches.
    pub pad_token_id: u32,
    /// Tokens of context at which a token's attention costs as much as its dense layers: 2·hidden +
    /// intermediate (per layer, attention is 4·n·hidden FLOPs per token, the dense layers 2·hidden·(4·hidden +
    /// 2·intermediate)).
    pub attention_span: usize,
    /// For decoder rerankers: the prompt each pair is put in (pairs are not the tokenizer's pair template).
    pub prompt: Option<PromptTemplate>,
    /// The max_length to use when none is configured, if lower than the positions and the tokenizer's limit.
    pub default_max_length: Option<usize>,
    /// Layerwise rerankers: the layers a request may read its score after.
    pub cutoff_layers: Option<CutoffLayers>,
}

impl LoadedModel {
    /// Runs a batch and returns each sequence's logits as rows.
    pub fn logits(&self, batch: &PackedBatch) -> candle_core::Result<Vec<Vec<f32>>> {
        // Device kernels index the embedding tables with these ids: refuse any outside them here.
        if let Some(&id) = batch
            .input_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            candle_core::bail!(
                "token id {id} is outside the model's vocabulary of {}",
                self.vocab_size
            );
        }
        if batch.max_len > self.max_positions {
            candle_core::bail!(
                "{} tokens is over the model's {} positions",
                batch.max_len,
                self.max_positions
            );
        }
        self.model.forward(batch)?.to_dtype(DType::F32)?.to_vec2()
    }
}

/// An encoder whose config.json has keys of its own (ModernBERT's `norm_eps`, GTE's rotary scaling): how the
/// registry reads, checks and builds it.
pub(crate) trait OwnConfigEncoder: CrossEncoder + Sized + 'static {
    type Config: EncoderConfig;
    fn load(
        vb: ops::Weights,
        config: &Self::Config,
        num_labels: usize,
    ) -> candle_core::Result<Self>;
}

/// The config.json of an `OwnConfigEncoder`.
pub trait EncoderConfig: serde::de::DeserializeOwned {
    /// What the implementation cannot follow in this config, if anything.
    fn unsupported(&self) -> Option<String>;
    fn facts(&self) -> EncoderFacts;
}

/// What the server needs to know of an encoder's shape (see `LoadedModel`).
pub struct EncoderFacts {
    pub max_positions: usize,
    pub vocab_size: usize,
    pub pad_token_id: Option<u32>,
    pub attention_span: usize,
}

impl EncoderFacts {
    /// A BERT-shaped encoder: per layer and token, 2·h·(4·h + 2·intermediate) FLOPs of GEMMs against 4·h per
    /// token of context.
    pub fn bert_like(config: &hf_config::ModelConfig, max_positions: usize) -> Self {
        Self {
            max_positions,
            vocab_size: config.vocab_size,
            pad_token_id: config.pad_token_id,
            attention_span: 2 * config.hidden_size + config.intermediate_size,
        }
    }

    /// An encoder whose MLP is gated (one projection to 2·intermediate, then intermediate back): per layer and
    /// token, 2·h·(4·h + 3·intermediate) FLOPs of GEMMs against 4·h per token of context.
    fn gated(
        (hidden, intermediate): (usize, usize),
        max_positions: usize,
        vocab_size: usize,
        pad_token_id: Option<u32>,
    ) -> Self {
        Self {
            max_positions,
            vocab_size,
            pad_token_id,
            attention_span: 2 * hidden + 3 * intermediate / 2,
        }
    }
}

/// Builds an `OwnConfigEncoder` architecture; labels and activation are read as for BERT.
pub(crate) fn build_own<M: OwnConfigEncoder>(
    source: &ModelSource,
    weights: ops::Weights,
) -> Result<Built, StartupError> {
    let config: M::Config = source.config()?;
    source.refuse(config.unsupported())?;
    let scoring = source.scoring()?;
    let model = M::load(weights, &config, scoring.num_labels())?;
    Ok(Built::encoder(Box::new(model), config.facts(), scoring))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_sequences_back_to_back() {
        let a = ([1u32, 2, 3], [0u32, 0, 1]);
        let b = ([4u32], [0u32]);
        let seqs = [(&a.0[..], &a.1[..]), (&b.0[..], &b.1[..])];
        let batch = PackedBatch::from_sequences(seqs.iter().copied());
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4]);
        assert_eq!(batch.type_ids, vec![0, 0, 1, 0]);
        assert_eq!(batch.cu_seqlens, vec![0, 3, 4]);
        assert_eq!(batch.lengths().collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!((batch.padded_tokens(), batch.real_tokens()), (6, 4));
        let (first, rest) = batch.split_at(1);
        assert_eq!((first.input_ids, first.max_len), (vec![1, 2, 3], 3));
        assert_eq!(
            (rest.input_ids, rest.cu_seqlens, rest.type_ids),
            (vec![4], vec![0, 1], vec![0])
        );
    }

    #[test]
    fn missing_weights_name_the_file_and_the_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pytorch_model.bin"), b"").expect("write");
        let err = weight_files(dir.path())
            .expect_err("no safetensors")
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("pytorch_model.bin"),
            "{err}"
        );
    }
}
