//! BertForSequenceClassification: BERT embeddings, the shared encoder, optional pooler and the classifier.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::encoder::{self, Encoder};
use super::hf_config::ModelConfig;
use super::ops::{self, EmbeddingTables, FeedForwardActivation, GemmPrecision, LayerNorm, Linear};
use super::{CrossEncoder, PackedBatch};

pub const ARCHITECTURE: &str = "BertForSequenceClassification";

pub struct Bert {
    tables: EmbeddingTables,
    embedding_norm: LayerNorm,
    encoder: Encoder,
    /// dense + tanh on [CLS]; absent in checkpoints saved without a pooler, then [CLS] feeds the classifier.
    pooler: Option<Linear>,
    classifier: Linear,
    type_vocab_size: usize,
    device: Device,
}

impl Bert {
    /// Loads weights stored with or without the `bert.` prefix; the `position_ids` buffer is never read.
    pub fn load(
        vb: VarBuilder,
        config: &ModelConfig,
        activation: FeedForwardActivation,
        precision: GemmPrecision,
    ) -> Result<Self> {
        let body = encoder::base_weights(&vb, "bert");
        let h = config.hidden_size;
        let (tables, embedding_norm) = encoder::load_embeddings(&body, config)?;
        // The head is tiny and sits right before the score: it stays fp32 (see ops).
        let pooler = if body.contains_tensor("pooler.dense.weight") {
            Some(Linear::load(
                &body.pp("pooler.dense").set_dtype(DType::F32),
                h,
                h,
            )?)
        } else {
            tracing::warn!(
                "checkpoint has no pooler; the classifier reads the [CLS] hidden state directly"
            );
            None
        };
        Ok(Self {
            tables,
            embedding_norm,
            encoder: Encoder::load(&body.pp("encoder"), config, activation, precision)?,
            pooler,
            classifier: Linear::load(
                &vb.pp("classifier").set_dtype(DType::F32),
                h,
                config.num_labels(),
            )?,
            type_vocab_size: config.type_vocab_size,
            device: vb.device().clone(),
        })
    }
}

impl CrossEncoder for Bert {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let tokens = batch.real_tokens();
        if let Some(&t) = batch
            .type_ids
            .iter()
            .find(|&&t| t as usize >= self.type_vocab_size)
        {
            candle_core::bail!(
                "token type {t} is outside the model's {} types",
                self.type_vocab_size
            );
        }
        let ids = Tensor::from_slice(&batch.input_ids, tokens, &self.device)?;
        let type_ids = Tensor::from_slice(&batch.type_ids, tokens, &self.device)?;
        let positions: Vec<u32> = batch.lengths().flat_map(|len| 0..len as u32).collect();
        let positions = Tensor::from_vec(positions, tokens, &self.device)?;
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
        let pooled = match &self.pooler {
            Some(pooler) => ops::dense_tanh(pooler, &first)?,
            None => first,
        };
        self.classifier.forward(&pooled)
    }
}
