//! bge-reranker-v2-gemma (BAAI/bge-reranker-v2-gemma): the Gemma decoder (norms scaling by 1 + weight, embeddings
//! scaled by √hidden, no q/k/v biases or q/k norms) scored by logit("Yes") at the last token of FlagEmbedding's
//! LLM reranker prompt, with FlagEmbedding's default limits unless max_length is configured.

use super::decoder::{ScoreHead, Variant};
use super::decoder_rerankers::{self, first_token_id, flag_default_max_length, Reranker};
use crate::error::StartupError;
use crate::model::ops::Weights;
use crate::model::scoring::{Activation, Scoring};
use crate::model::{Built, ModelSource};
use crate::tokenization::templates::bge_reranker_gemma_prompt;

pub const CAUSAL_LM: &str = "GemmaForCausalLM";

pub const VARIANT: Variant = Variant {
    qkv_bias: false,
    qk_norms: false,
    norms_plus_one: true,
    scaled_embeddings: true,
};

/// The registry's builder: FlagEmbedding scores the logit of the first token of "Yes" alone.
pub fn build(source: &ModelSource, weights: Weights) -> Result<Built, StartupError> {
    let dir = source.dir.as_path();
    let reranker = Reranker {
        variant: VARIANT,
        head: ScoreHead::TokenLogits {
            positive: first_token_id(dir, "Yes")?,
            negative: None,
        },
        scoring: Scoring::SingleLogit(Activation::Sigmoid),
        prompt: bge_reranker_gemma_prompt(),
        default_max_length: flag_default_max_length(dir, &bge_reranker_gemma_prompt())?,
    };
    decoder_rerankers::build(source, weights, reranker)
}
