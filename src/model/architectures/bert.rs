//! BertForSequenceClassification: BERT embeddings, the shared encoder, optional pooler and the classifier.

use candle_core::{Result, Tensor};

use super::encoder::{self, Embeddings, Encoder, TokenTypes};
use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{self, Bias, FeedForwardActivation, Linear, Target, Weights};
use crate::model::{Built, CrossEncoder, ModelSource, PackedBatch};

/// The registry's builder: config.json as BERT's.
pub fn build(source: &ModelSource, weights: Weights) -> std::result::Result<Built, StartupError> {
    encoder::build_with(source, weights, |c| c.max_position_embeddings, Bert::load)
}

pub struct Bert {
    embeddings: Embeddings,
    encoder: Encoder,
    /// dense + tanh on [CLS]; absent in checkpoints saved without a pooler, then [CLS] feeds the classifier.
    pooler: Option<Linear>,
    classifier: Linear,
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
        let pooler = if body.contains("pooler.dense.weight") {
            Some(body.pp("pooler.dense").head_linear(h, h, Bias::Stored)?)
        } else {
            tracing::warn!(
                "checkpoint has no pooler; the classifier reads the [CLS] hidden state directly"
            );
            None
        };
        let layout = encoder::Layout::of(&body);
        Ok(Self {
            embeddings: Embeddings::load(&body, config, h, TokenTypes::FromTokenizer)?,
            encoder: Encoder::load(&body.pp("encoder"), config, activation, layout)?,
            pooler,
            classifier: vb
                .pp("classifier")
                .head_linear(h, config.num_labels(), Bias::Stored)?,
            target: vb.target(),
        })
    }
}

impl CrossEncoder for Bert {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let hidden = self
            .embeddings
            .forward(batch, &encoder::absolute_positions(batch))?;
        let first = self.encoder.first_tokens(hidden, batch, &self.target)?;
        let pooled = match &self.pooler {
            Some(pooler) => ops::dense_tanh(pooler, &first)?,
            None => first,
        };
        self.classifier.forward(&pooled)
    }
}
