//! XLMRobertaForSequenceClassification (and RobertaForSequenceClassification): RoBERTa embeddings with
//! positions counted from padding_idx + 1, the shared encoder, and the dense → tanh → out_proj head on `<s>`.

use candle_core::{Result, Tensor};

use super::encoder::{self, Encoder};
use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{
    self, Bias, EmbeddingTables, FeedForwardActivation, LayerNorm, Linear, Target, Weights,
};
use crate::model::{Built, CrossEncoder, EncoderFacts, ModelSource, PackedBatch};

/// The registry's builder: config.json as BERT's, positions after padding_idx.
pub fn build(source: &ModelSource, weights: Weights) -> std::result::Result<Built, StartupError> {
    let config: ModelConfig = source.config()?;
    let activation = source.activation(&config.hidden_act)?;
    // Labels first: a config whose labels cannot be scored is refused before any weight is read.
    let scoring = source.scoring()?;
    let model = XlmRoberta::load(weights, &config, activation)?;
    let facts = EncoderFacts::bert_like(&config, max_positions(&config));
    Ok(Built::encoder(Box::new(model), facts, scoring))
}

pub struct XlmRoberta {
    tables: EmbeddingTables,
    embedding_norm: LayerNorm,
    encoder: Encoder,
    head_dense: Linear,
    head_out: Linear,
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
    /// Loads weights stored with or without the `roberta.` prefix.
    pub fn load(
        vb: Weights,
        config: &ModelConfig,
        activation: FeedForwardActivation,
    ) -> Result<Self> {
        let body = encoder::base_weights(&vb, "roberta");
        let h = config.hidden_size;
        let (tables, embedding_norm) = encoder::load_embeddings(&body, config)?;
        let head = vb.pp("classifier");
        Ok(Self {
            tables,
            embedding_norm,
            encoder: Encoder::load(
                &body.pp("encoder"),
                config,
                activation,
                encoder::Layout::of(&body),
            )?,
            head_dense: head.pp("dense").head_linear(h, h, Bias::Stored)?,
            head_out: head
                .pp("out_proj")
                .head_linear(h, config.num_labels(), Bias::Stored)?,
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
        let ids = self.target.ids(&batch.input_ids)?;
        let positions = self.target.ids(&position_ids(batch, self.padding_idx))?;
        // The XLM-R tokenizer returns no token type ids: every token uses type 0, as in the reference.
        let type_ids = self.target.zero_ids(batch.real_tokens())?;
        let hidden = ops::embed(
            &self.tables,
            &ids,
            &positions,
            Some(&type_ids),
            &self.embedding_norm,
        )?;
        let sequences = self.target.sequences(&batch.cu_seqlens)?;
        let first = self
            .encoder
            .forward_first_token(hidden, &sequences)?
            .residual;
        self.head_out
            .forward(&ops::dense_tanh(&self.head_dense, &first)?)
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
