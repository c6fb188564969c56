//! DebertaV2ForSequenceClassification (DeBERTa-v3 cross-encoders such as mixedbread-ai/mxbai-rerank-base-v1,
//! and the v2 options its config may set): word (+ absolute position, + token type) embeddings, projected to
//! hidden when narrower, LayerNorm; post-norm layers of disentangled attention over relative positions (see
//! `ops::disentangled_attention`) and BERT's feed-forward; then the ContextPooler (dense → activation on the first
//! token) and the classifier.

use candle_core::{Result, Tensor};

use crate::model::ops::{
    self, Bias, FeedForwardActivation, Hidden, LayerNorm, Linear, PositionProjections,
    RelativeDistances, RelativeRows, Target, Weights,
};
use crate::model::{CrossEncoder, OwnConfigEncoder, PackedBatch};

pub const ARCHITECTURE: &str = "DebertaV2ForSequenceClassification";

mod config;

pub use config::DebertaConfig;

/// One layer, `deberta.encoder.layer.{i}`: Q, K and V fused; the position table projected at load.
struct Layer {
    qkv: Linear,
    positions: PositionProjections,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The embedding tables (model dtype), each optional as the config says.
struct Embeddings {
    word: Tensor,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    /// embedding_size → hidden_size, no bias; absent when equal.
    projection: Option<Linear>,
    norm: LayerNorm,
}

pub struct Deberta {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    distances: Option<RelativeDistances>,
    pooler: Linear,
    pooler_activation: FeedForwardActivation,
    classifier: Linear,
    heads: usize,
    activation: FeedForwardActivation,
    target: Target,
}

impl OwnConfigEncoder for Deberta {
    type Config = DebertaConfig;

    fn load(vb: Weights, config: &DebertaConfig, num_labels: usize) -> Result<Self> {
        let body = vb.pp("deberta");
        let h = config.hidden_size;
        let activation = |name: &str| {
            FeedForwardActivation::from_config(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("activation {name:?}")))
        };
        let table = relative_table(&body.pp("encoder"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| load_layer(&body.pp("encoder.layer").pp(i), config, table.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: load_embeddings(&body.pp("embeddings"), config)?,
            layers,
            distances: config.distances(),
            pooler: vb.pp("pooler.dense").head_linear(h, h, Bias::Stored)?,
            pooler_activation: activation(&config.pooler_hidden_act)?,
            classifier: vb
                .pp("classifier")
                .head_linear(h, num_labels, Bias::Stored)?,
            heads: config.num_attention_heads,
            activation: activation(&config.hidden_act)?,
            target: vb.target(),
        })
    }
}

/// The relative-position embeddings every layer reads, after the encoder's LayerNorm where `norm_rel_ebd` says:
/// [2·span, hidden] fp32, or None without relative attention.
fn relative_table(encoder: &Weights, config: &DebertaConfig) -> Result<Option<Tensor>> {
    let Some(distances) = config.distances() else {
        return Ok(None);
    };
    let h = config.hidden_size;
    let table = encoder
        .pp("rel_embeddings")
        .residual_tensor((2 * distances.span, h), "weight")?;
    if !config.normalises_relative_embeddings() {
        return Ok(Some(table));
    }
    let norm = encoder
        .pp("LayerNorm")
        .layer_norm(h, config.layer_norm_eps, Bias::Stored)?;
    Ok(Some(norm.forward(&table)?))
}

fn load_embeddings(vb: &Weights, config: &DebertaConfig) -> Result<Embeddings> {
    let (h, e) = (
        config.hidden_size,
        config.embedding_size.unwrap_or(config.hidden_size),
    );
    let table = |rows: usize, name: &str| vb.tensor((rows, e), name);
    Ok(Embeddings {
        word: table(config.vocab_size, "word_embeddings.weight")?,
        position: match config.position_biased_input {
            true => Some(table(
                config.max_position_embeddings,
                "position_embeddings.weight",
            )?),
            false => None,
        },
        token_type: match config.type_vocab_size {
            0 => None,
            rows => Some(table(rows, "token_type_embeddings.weight")?),
        },
        projection: match e == h {
            true => None,
            false => Some(vb.pp("embed_proj").linear(e, h, Bias::None)?),
        },
        norm: vb
            .pp("LayerNorm")
            .layer_norm(h, config.layer_norm_eps, Bias::Stored)?,
    })
}

fn load_layer(vb: &Weights, config: &DebertaConfig, table: Option<&Tensor>) -> Result<Layer> {
    let (h, eps, ffn) = (
        config.hidden_size,
        config.layer_norm_eps,
        config.intermediate_size,
    );
    let width = config.num_attention_heads * config.head_dim();
    let attention = vb.pp("attention");
    let own = attention.pp("self");
    let qkv = [
        ("query_proj", width),
        ("key_proj", width),
        ("value_proj", width),
    ];
    Ok(Layer {
        qkv: own.fused_linear(&qkv, h, Bias::Stored)?,
        positions: position_projections(&own, config, table, width)?,
        attention_output: attention
            .pp("output.dense")
            .linear(width, h, Bias::Stored)?,
        attention_norm: attention
            .pp("output.LayerNorm")
            .layer_norm(h, eps, Bias::Stored)?,
        intermediate: vb.pp("intermediate.dense").linear(h, ffn, Bias::Stored)?,
        output: vb.pp("output.dense").linear(ffn, h, Bias::Stored)?,
        output_norm: vb.pp("output.LayerNorm").layer_norm(h, eps, Bias::Stored)?,
    })
}

/// The position table through the layer's key projection (c2p) and query projection (p2c): the layer's own Q/K
/// with `share_att_key`, else its `pos_key_proj`/`pos_query_proj`. Done once here: the table does not depend on
/// the input.
fn position_projections(
    own: &Weights,
    config: &DebertaConfig,
    table: Option<&Tensor>,
    width: usize,
) -> Result<PositionProjections> {
    let terms = config.terms();
    let project = |term: &str, shared: &str, separate: &str| -> Result<Option<Tensor>> {
        let Some(table) = table.filter(|_| terms.iter().any(|t| t == term)) else {
            return Ok(None);
        };
        let name = if config.share_att_key {
            shared
        } else {
            separate
        };
        let layer = own
            .pp(name)
            .head_linear(config.hidden_size, width, Bias::Stored)?;
        Ok(Some(layer.forward(table)?))
    };
    PositionProjections::new(
        project("c2p", "key_proj", "pos_key_proj")?,
        project("p2c", "query_proj", "pos_query_proj")?,
        config.num_attention_heads,
    )
}

impl Deberta {
    /// The normalised embeddings of every token: the residual stream [tokens, hidden].
    fn embed(&self, batch: &PackedBatch) -> Result<Hidden> {
        let e = &self.embeddings;
        let looked_up = |table: &Tensor, ids: &[u32]| -> Result<Tensor> {
            ops::residual(&table.index_select(&self.target.ids(ids)?, 0)?)
        };
        let mut sum = looked_up(&e.word, &batch.input_ids)?;
        if let Some(table) = &e.position {
            sum = (sum + looked_up(table, &super::encoder::absolute_positions(batch))?)?;
        }
        if let Some(table) = &e.token_type {
            let rows = table.dim(0)?;
            if let Some(&t) = batch.type_ids.iter().find(|&&t| t as usize >= rows) {
                candle_core::bail!("token type {t} is outside the model's {rows} types");
            }
            sum = (sum + looked_up(table, &batch.type_ids)?)?;
        }
        if let Some(projection) = &e.projection {
            sum = ops::residual(&ops::linear(projection, &self.target.gemm_input(&sum)?)?)?;
        }
        self.target.hidden(e.norm.forward(&sum)?)
    }

    /// One layer; with `first_only`, only each sequence's first token leaves it (its attention reads every token).
    fn layer(
        &self,
        layer: &Layer,
        x: &Hidden,
        batch: &PackedBatch,
        rows: &RelativeRows,
        first_only: bool,
    ) -> Result<Hidden> {
        let qkv = ops::linear(&layer.qkv, &x.input)?;
        let context = ops::disentangled_attention(
            &qkv,
            &batch.cu_seqlens,
            self.heads,
            &layer.positions,
            rows,
            first_only,
        )?;
        let residual = match first_only {
            true => {
                x.first_tokens(&self.target.sequences(&batch.cu_seqlens)?)?
                    .residual
            }
            false => x.residual.clone(),
        };
        let context = self.target.gemm_input(&context)?;
        let attended = ops::linear_residual_norm(
            &layer.attention_output,
            &context,
            &residual,
            &layer.attention_norm,
        )?;
        let inner = ops::linear_activation(&layer.intermediate, &attended.input, self.activation)?;
        ops::linear_residual_norm(
            &layer.output,
            &inner,
            &attended.residual,
            &layer.output_norm,
        )
    }
}

impl CrossEncoder for Deberta {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let mut x = self.embed(batch)?;
        let rows = match &self.distances {
            Some(distances) => RelativeRows::new(distances, &batch.cu_seqlens, &self.target)?,
            None => RelativeRows::empty(),
        };
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer(layer, &x, batch, &rows, i == last)?;
        }
        if self.layers.is_empty() {
            x = x.first_tokens(&self.target.sequences(&batch.cu_seqlens)?)?;
        }
        let pooled = self
            .pooler_activation
            .apply(&self.pooler.forward(&x.residual)?)?;
        self.classifier.forward(&pooled)
    }
}
