//! ElectraForSequenceClassification (e.g. cross-encoder/ms-marco-electra-base): BERT's embeddings at
//! `embedding_size`, projected to `hidden_size` when the two differ, BERT's encoder, and a dense → GELU → out_proj
//! head on the first token.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::encoder::{self, ClassificationHead, Embeddings, Encoder, TokenTypes};
use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{self, Bias, FeedForwardActivation, Linear, Target, Weights};
use crate::model::{Built, CrossEncoder, EncoderFacts, ModelSource, PackedBatch};

/// The registry's builder: config.json as BERT's plus `embedding_size`.
pub fn build(source: &ModelSource, weights: Weights) -> std::result::Result<Built, StartupError> {
    let config: ModelConfig = source.config()?;
    let shape: EmbeddingShape = source.config()?;
    let scoring = source.scoring()?;
    let activation = source.activation(&config.hidden_act)?;
    let embedding_size = shape.embedding_size.unwrap_or(config.hidden_size);
    let model = Electra::load(weights, &config, embedding_size, activation)?;
    let facts = EncoderFacts::bert_like(&config, config.max_position_embeddings);
    Ok(Built::encoder(Box::new(model), facts, scoring))
}

/// The one key ELECTRA adds to BERT's config: the width of its embedding tables.
#[derive(Deserialize)]
struct EmbeddingShape {
    embedding_size: Option<usize>,
}

pub struct Electra {
    embeddings: Embeddings,
    /// embedding_size → hidden_size; absent when they are equal.
    projection: Option<Linear>,
    encoder: Encoder,
    head: ClassificationHead,
    target: Target,
}

impl Electra {
    /// Loads weights stored with or without the `electra.` prefix.
    pub fn load(
        vb: Weights,
        config: &ModelConfig,
        embedding_size: usize,
        activation: FeedForwardActivation,
    ) -> Result<Self> {
        let body = encoder::base_weights(&vb, "electra");
        let (h, e) = (config.hidden_size, embedding_size);
        let projection = match e == h {
            true => None,
            false => Some(body.pp("embeddings_project").linear(e, h, Bias::Stored)?),
        };
        let layout = encoder::Layout::of(&body);
        Ok(Self {
            embeddings: Embeddings::load(&body, config, e, TokenTypes::FromTokenizer)?,
            projection,
            encoder: Encoder::load(&body.pp("encoder"), config, activation, layout)?,
            // ELECTRA's head uses exact GELU, not tanh, whatever the encoder's activation.
            head: ClassificationHead::load(&vb.pp("classifier"), config, false)?,
            target: vb.target(),
        })
    }
}

impl CrossEncoder for Electra {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let embedded = self
            .embeddings
            .forward(batch, &encoder::absolute_positions(batch))?;
        let hidden = match &self.projection {
            Some(projection) => self
                .target
                .hidden(ops::residual(&ops::linear(projection, &embedded.input)?)?)?,
            None => embedded,
        };
        let first = self.encoder.first_tokens(hidden, batch, &self.target)?;
        self.head.forward(&first)
    }
}
