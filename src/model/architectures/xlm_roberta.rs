//! XLMRobertaForSequenceClassification (and RobertaForSequenceClassification): RoBERTa embeddings with
//! positions counted from padding_idx + 1, the shared encoder, and the dense → tanh → out_proj head on `<s>`.

use candle_core::{Result, Tensor};

use super::encoder::{self, ClassificationHead, Embeddings, Encoder, TokenTypes};
use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{FeedForwardActivation, Target, Weights};
use crate::model::{Built, CrossEncoder, ModelSource, PackedBatch};

/// The registry's builder: config.json as BERT's, positions after padding_idx.
pub fn build(source: &ModelSource, weights: Weights) -> std::result::Result<Built, StartupError> {
    encoder::build_with(source, weights, max_positions, XlmRoberta::load)
}

pub struct XlmRoberta {
    embeddings: Embeddings,
    encoder: Encoder,
    head: ClassificationHead,
    padding_idx: u32,
    target: Target,
}

/// Longest sequence the position table allows: positions start at padding_idx + 1.
pub fn max_positions(config: &ModelConfig) -> usize {
    config
        .max_position_embeddings
        .saturating_sub(padding_idx(config) as usize + 1)
}

fn padding_idx(config: &ModelConfig) -> u32 {
    config.pad_token_id.unwrap_or(1)
}

impl XlmRoberta {
    /// Loads weights stored with or without the `roberta.` prefix, in transformers' or flash-attention's names
    /// (jina-reranker-v2).
    pub fn load(
        vb: Weights,
        config: &ModelConfig,
        activation: FeedForwardActivation,
    ) -> Result<Self> {
        let body = encoder::base_weights(&vb, "roberta");
        let layout = encoder::Layout::of(&body);
        // The XLM-R tokenizer returns no token type ids: every token uses type 0, as in the reference.
        let types = TokenTypes::Zero;
        Ok(Self {
            embeddings: Embeddings::load(&body, config, config.hidden_size, types)?,
            encoder: Encoder::load(&body.pp("encoder"), config, activation, layout)?,
            head: ClassificationHead::load(&vb.pp("classifier"), config, true)?,
            padding_idx: padding_idx(config),
            target: vb.target(),
        })
    }
}

/// Position ids as the reference computes them from the ids: each non-pad token gets padding_idx + its
/// 1-based count among the non-pad tokens of its sequence; a literal `<pad>` token gets padding_idx.
pub fn position_ids(batch: &PackedBatch, padding_idx: u32) -> Vec<u32> {
    batch
        .rows()
        .flat_map(|(row, _)| {
            row.iter().scan(0u32, move |count, &id| {
                Some(if id == padding_idx {
                    padding_idx
                } else {
                    *count += 1;
                    padding_idx + *count
                })
            })
        })
        .collect()
}

impl CrossEncoder for XlmRoberta {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let positions = position_ids(batch, self.padding_idx);
        let hidden = self.embeddings.forward(batch, &positions)?;
        let first = self.encoder.first_tokens(hidden, batch, &self.target)?;
        self.head.forward(&first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_start_after_padding_idx_and_skip_pad_tokens() {
        // Sequence 1: <s> a <pad>(literal) b </s>; sequence 2 longer.
        let (a, b) = ([0, 5, 1, 6, 2], [0, 7, 8, 9, 10, 11, 2]);
        let batch = PackedBatch::from_sequences([(&a[..], &[][..]), (&b[..], &[][..])]);
        assert_eq!(
            position_ids(&batch, 1),
            vec![2, 3, 1, 4, 5, 2, 3, 4, 5, 6, 7, 8]
        );
    }
}
