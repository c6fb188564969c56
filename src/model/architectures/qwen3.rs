//! Qwen3-Reranker (Qwen/Qwen3-Reranker-0.6B, -4B, -8B): the Qwen3 decoder (q/k norms, no q/k/v biases) scored by
//! logit("yes") - logit("no") at the last token of its model card's prompt, and the converted
//! Qwen3ForSequenceClassification ("seq-cls") checkpoints scored by their stored one-row head.

use super::decoder::{ScoreHead, Variant};
use super::decoder_rerankers::{self, token_id, Reranker};
use crate::error::StartupError;
use crate::model::ops::Weights;
use crate::model::scoring::{Activation, Scoring};
use crate::model::{Built, ModelSource};
use crate::tokenization::templates::qwen3_reranker_prompt;

pub const CAUSAL_LM: &str = "Qwen3ForCausalLM";
pub const SEQUENCE_CLASSIFICATION: &str = "Qwen3ForSequenceClassification";

pub const VARIANT: Variant = Variant {
    qkv_bias: false,
    qk_norms: true,
    norms_plus_one: false,
    scaled_embeddings: false,
};

/// The longest pair unless configured, as Qwen3-Reranker's published scoring code.
const DEFAULT_MAX_LENGTH: usize = 8192;

/// The registry's builder for the causal LM: the ids of "yes" and "no" from the model's tokenizer.
pub fn build(source: &ModelSource, weights: Weights) -> Result<Built, StartupError> {
    let dir = source.dir.as_path();
    let head = ScoreHead::TokenLogits {
        positive: token_id(dir, "yes")?,
        negative: Some(token_id(dir, "no")?),
    };
    let scoring = Scoring::SingleLogit(Activation::Sigmoid);
    decoder_rerankers::build(source, weights, reranker(head, scoring))
}

/// The registry's builder for converted seq-cls checkpoints: their one stored logit, scored as configured.
pub fn build_converted(source: &ModelSource, weights: Weights) -> Result<Built, StartupError> {
    match source.scoring()? {
        scoring @ Scoring::SingleLogit(_) => {
            decoder_rerankers::build(source, weights, reranker(ScoreHead::Stored, scoring))
        }
        Scoring::TwoLabelSoftmax => Err(StartupError::Unsupported(format!(
            "a two-label {SEQUENCE_CLASSIFICATION} in {}: converted rerankers have one logit",
            source.config_path.display()
        ))),
    }
}

fn reranker(head: ScoreHead, scoring: Scoring) -> Reranker {
    Reranker {
        variant: VARIANT,
        head,
        scoring,
        prompt: qwen3_reranker_prompt(),
        default_max_length: DEFAULT_MAX_LENGTH,
    }
}
