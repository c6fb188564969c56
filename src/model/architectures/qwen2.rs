//! mxbai-rerank-v2 (mixedbread-ai/mxbai-rerank-base-v2, -large-v2): the Qwen2 decoder (q/k/v biases, no q/k
//! norms) scored by logit("1") - logit("0") at the last token of the mxbai-rerank package's prompt.

use super::decoder::{ScoreHead, Variant};
use super::decoder_rerankers::{self, first_token_id, Reranker};
use crate::error::StartupError;
use crate::model::ops::Weights;
use crate::model::scoring::{Activation, Scoring};
use crate::model::{Built, ModelSource};
use crate::tokenization::templates::mxbai_rerank_v2_prompt;

pub const CAUSAL_LM: &str = "Qwen2ForCausalLM";

pub const VARIANT: Variant = Variant {
    qkv_bias: true,
    qk_norms: false,
    norms_plus_one: false,
    scaled_embeddings: false,
};

/// The longest pair unless configured, as the mxbai-rerank package.
const DEFAULT_MAX_LENGTH: usize = 8192;

/// The registry's builder: mxbai reads its score ids by tokenizing "1" and "0" (their first id).
pub fn build(source: &ModelSource, weights: Weights) -> Result<Built, StartupError> {
    let dir = source.dir.as_path();
    let reranker = Reranker {
        variant: VARIANT,
        head: ScoreHead::TokenLogits {
            positive: first_token_id(dir, "1")?,
            negative: Some(first_token_id(dir, "0")?),
        },
        scoring: Scoring::SingleLogit(Activation::Sigmoid),
        prompt: mxbai_rerank_v2_prompt(),
        default_max_length: DEFAULT_MAX_LENGTH,
    };
    decoder_rerankers::build(source, weights, reranker)
}
