//! ElectraForSequenceClassification (e.g. cross-encoder/ms-marco-electra-base): BERT's embeddings at
//! `embedding_size`, projected to `hidden_size` when the two differ, BERT's encoder, and a dense → GELU → out_proj
//! head on the first token.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::encoder::{self, Encoder};
use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{
    self, Bias, EmbeddingTables, FeedForwardActivation, LayerNorm, Linear, Target, Weights,
};
use crate::model::{Built, CrossEncoder, EncoderFacts, ModelSource, PackedBatch};

/// The registry's builder: config.json as BERT's plus `embedding_size`.
pub fn build(source: &ModelSource, weights: Weights) -> std::result::Result<Built, StartupError> {
    let config: ModelConfig = source.config()?;
    let shape: EmbeddingShape = source.config()?;
    let activation = source.activation(&config.hidden_act)?;
    let scoring = source.scoring()?;
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
    tables: EmbeddingTables,
    embedding_norm: LayerNorm,
    /// embedding_size → hidden_size; absent when they are equal.
    projection: Option<Linear>,
    encoder: Encoder,
    head_dense: Linear,
    head_out: Linear,
    type_vocab_size: usize,
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
        let embeddings = body.pp("embeddings");
        let table = |rows: usize, name: &str| embeddings.tensor((rows, e), name);
        let tables = EmbeddingTables {
            word: table(config.vocab_size, "word_embeddings.weight")?,
            position: table(config.max_position_embeddings, "position_embeddings.weight")?,
            token_type: Some(table(
                config.type_vocab_size,
                "token_type_embeddings.weight",
            )?),
        };
        let projection = match e == h {
            true => None,
            false => Some(body.pp("embeddings_project").linear(e, h, Bias::Stored)?),
        };
        let head = vb.pp("classifier");
        Ok(Self {
            tables,
            embedding_norm: embeddings.pp("LayerNorm").layer_norm(
                e,
                config.layer_norm_eps,
                Bias::Stored,
            )?,
            projection,
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
            type_vocab_size: config.type_vocab_size,
            target: vb.target(),
        })
    }
}

impl CrossEncoder for Electra {
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
        let positions: Vec<u32> = batch.lengths().flat_map(|len| 0..len as u32).collect();
        let embedded = ops::embed(
            &self.tables,
            &self.target.ids(&batch.input_ids)?,
            &self.target.ids(&positions)?,
            Some(&self.target.ids(&batch.type_ids)?),
            &self.embedding_norm,
        )?;
        let hidden = match &self.projection {
            Some(projection) => self
                .target
                .hidden(ops::residual(&ops::linear(projection, &embedded.input)?)?)?,
            None => embedded,
        };
        let sequences = self.target.sequences(&batch.cu_seqlens)?;
        let first = self
            .encoder
            .forward_first_token(hidden, &sequences)?
            .residual;
        // ELECTRA's head uses exact GELU whatever the encoder's activation.
        let dense = FeedForwardActivation::GeluErf.apply(&self.head_dense.forward(&first)?)?;
        self.head_out.forward(&dense)
    }
}
