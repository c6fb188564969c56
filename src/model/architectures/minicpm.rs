//! bge-reranker-v2-minicpm-layerwise (BAAI, `LayerWiseMiniCPMForCausalLM`): the MiniCPM decoder (embeddings scaled
//! by scale_emb, residual branches by scale_depth / √layers, otherwise Llama's layer) with one score row per layer
//! from `start_layer` on. The score after layer L is row L · final_norm(h_L) at the last token of FlagEmbedding's
//! LLM reranker prompt; a request chooses L (`cutoff_layer`) and the decoder stops there.

use super::decoder::{DecoderConfig, ScoreHead, Variant};
use super::decoder_rerankers::{self, flag_default_max_length, Reranker};
use crate::error::StartupError;
use crate::model::ops::Weights;
use crate::model::scoring::{Activation, Scoring};
use crate::model::{Built, ModelSource};
use crate::tokenization::templates::bge_reranker_minicpm_layerwise_prompt;

pub const CAUSAL_LM: &str = "LayerWiseMiniCPMForCausalLM";

pub const VARIANT: Variant = Variant {
    qkv_bias: false,
    qk_norms: false,
    norms_plus_one: false,
    scaled_embeddings: false,
};

/// The layer the model card scores after (`cutoff_layers=[28]` of the 40).
const MODEL_CARD_LAYER: usize = 28;

/// MiniCPM's layerwise configuration default for the first head (`start_layer`).
const DEFAULT_START_LAYER: usize = 8;

/// The registry's builder.
pub fn build(source: &ModelSource, weights: Weights) -> Result<Built, StartupError> {
    let config: DecoderConfig = source.config()?;
    let first = config.start_layer.unwrap_or(DEFAULT_START_LAYER);
    if first == 0 || first > config.num_hidden_layers {
        source.refuse(Some(format!(
            "start_layer {first} outside the model's {} layers",
            config.num_hidden_layers
        )))?;
    }
    let prompt = bge_reranker_minicpm_layerwise_prompt();
    let reranker = Reranker {
        variant: VARIANT,
        head: ScoreHead::PerLayer {
            first,
            default: default_layer(first, config.num_hidden_layers),
        },
        // FlagEmbedding returns the raw logit (normalize=False); the score is its sigmoid, as for the other
        // FlagEmbedding rerankers.
        scoring: Scoring::SingleLogit(Activation::Sigmoid),
        default_max_length: flag_default_max_length(&source.dir, &prompt)?,
        prompt,
    };
    decoder_rerankers::build(source, weights, reranker)
}

/// The model card's layer 28 where the model has it, else the last layer (FlagEmbedding's default when no
/// layer is given).
fn default_layer(first: usize, last: usize) -> usize {
    match (first..=last).contains(&MODEL_CARD_LAYER) {
        true => MODEL_CARD_LAYER,
        false => last,
    }
}
