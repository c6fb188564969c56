//! XLMRobertaForSequenceClassification (and RobertaForSequenceClassification): RoBERTa embeddings with
//! positions counted from padding_idx + 1, the shared encoder, and the dense → tanh → out_proj head on `<s>`.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::encoder::{self, Encoder};
use super::hf_config::ModelConfig;
use super::ops::{self, EmbeddingTables, FeedForwardActivation, GemmPrecision, LayerNorm, Linear};
use super::{CrossEncoder, PackedBatch};

pub const ARCHITECTURES: &[&str] = &[
    "XLMRobertaForSequenceClassification",
    "RobertaForSequenceClassification",
];

pub struct XlmRoberta {
    tables: EmbeddingTables,
    embedding_norm: LayerNorm,
    encoder: Encoder,
    head_dense: Linear,
    head_out: Linear,
    padding_idx: u32,
    device: Device,
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
        vb: VarBuilder,
        config: &ModelConfig,
        activation: FeedForwardActivation,
        precision: GemmPrecision,
    ) -> Result<Self> {
        let body = encoder::base_weights(&vb, "roberta");
        let h = config.hidden_size;
        let (tables, embedding_norm) = encoder::load_embeddings(&body, config)?;
        // The head is tiny and sits right before the score: it stays fp32 (see ops).
        let head = vb.pp("classifier").set_dtype(DType::F32);
        Ok(Self {
            tables,
            embedding_norm,
            encoder: Encoder::load(&body.pp("encoder"), config, activation, precision)?,
            head_dense: Linear::load(&head.pp("dense"), h, h)?,
            head_out: Linear::load(&head.pp("out_proj"), h, config.num_labels())?,
            padding_idx: padding_idx(config),
            device: vb.device().clone(),
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
        let tokens = batch.real_tokens();
        let ids = Tensor::from_slice(&batch.input_ids, tokens, &self.device)?;
        let positions =
            Tensor::from_vec(position_ids(batch, self.padding_idx), tokens, &self.device)?;
        // The XLM-R tokenizer returns no token type ids: every token uses type 0, as in the reference.
        let type_ids = Tensor::zeros(tokens, DType::U32, &self.device)?;
        let hidden = ops::embed(
            &self.tables,
            &ids,
            &positions,
            Some(&type_ids),
            &self.embedding_norm,
        )?;
        let sequences = ops::Sequences::new(&batch.cu_seqlens, &self.device)?;
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
