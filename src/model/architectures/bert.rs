//! BertForSequenceClassification: BERT embeddings, the shared encoder, optional pooler and the classifier.

use candle_core::{Result, Tensor};

use super::encoder::{self, Encoder};
use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{
    self, Bias, EmbeddingTables, FeedForwardActivation, LayerNorm, Linear, Target, Weights,
};
use crate::model::{Built, CrossEncoder, EncoderFacts, ModelSource, PackedBatch};

/// The registry's builder: config.json as BERT's, labels and activation from it.
pub fn build(source: &ModelSource, weights: Weights) -> std::result::Result<Built, StartupError> {
    let config: ModelConfig = source.config()?;
    let activation = source.activation(&config.hidden_act)?;
    // Labels first: a config whose labels cannot be scored is refused before any weight is read.
    let scoring = source.scoring()?;
    let model = Bert::load(weights, &config, activation)?;
    let facts = EncoderFacts::bert_like(&config, config.max_position_embeddings);
    Ok(Built::encoder(Box::new(model), facts, scoring))
}

pub struct Bert {
    tables: EmbeddingTables,
    embedding_norm: LayerNorm,
    encoder: Encoder,
    /// dense + tanh on [CLS]; absent in checkpoints saved without a pooler, then [CLS] feeds the classifier.
    pooler: Option<Linear>,
    classifier: Linear,
    type_vocab_size: usize,
    target: Target,
}

impl Bert {
    /// Loads weights stored with or without the `bert.` prefix; the `position_ids` buffer is never read.
    pub fn load(
        vb: Weights,
        config: &ModelConfig,
        activation: FeedForwardActivation,
    ) -> Result<Self> {
        let body = encoder::base_weights(&vb, "bert");
        let h = config.hidden_size;
        let (tables, embedding_norm) = encoder::load_embeddings(&body, config)?;
        let pooler = if body.contains("pooler.dense.weight") {
            Some(body.pp("pooler.dense").head_linear(h, h, Bias::Stored)?)
        } else {
            tracing::warn!(
                "checkpoint has no pooler; the classifier reads the [CLS] hidden state directly"
            );
            None
        };
        Ok(Self {
            tables,
            embedding_norm,
            encoder: Encoder::load(
                &body.pp("encoder"),
                config,
                activation,
                encoder::Layout::of(&body),
            )?,
            pooler,
            classifier: vb
                .pp("classifier")
                .head_linear(h, config.num_labels(), Bias::Stored)?,
            type_vocab_size: config.type_vocab_size,
            target: vb.target(),
        })
    }
}

impl CrossEncoder for Bert {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
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
        let ids = self.target.ids(&batch.input_ids)?;
        let type_ids = self.target.ids(&batch.type_ids)?;
        let positions: Vec<u32> = batch.lengths().flat_map(|len| 0..len as u32).collect();
        let positions = self.target.ids(&positions)?;
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
        let pooled = match &self.pooler {
            Some(pooler) => ops::dense_tanh(pooler, &first)?,
            None => first,
        };
        self.classifier.forward(&pooled)
    }
}
