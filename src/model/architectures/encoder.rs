//! The post-LayerNorm transformer encoder shared by BERT, (XLM-)RoBERTa, ELECTRA and jina-reranker-v2: the
//! embeddings, fused-QKV self-attention and feed-forward layers, the RoBERTa-style head, and their builder.

use candle_core::{Result, Tensor};

use crate::error::StartupError;
use crate::model::hf_config::ModelConfig;
use crate::model::ops::{
    self, Bias, EmbeddingTables, FeedForwardActivation, Hidden, LayerNorm, Linear, Sequences,
    Target, Weights,
};
use crate::model::{Built, CrossEncoder, EncoderFacts, ModelSource, PackedBatch};

/// The weights of the base model: under `prefix` (as *ForSequenceClassification checkpoints save them, e.g.
/// `bert.`) or at the root of the file.
pub fn base_weights<'a>(vb: &Weights<'a>, prefix: &str) -> Weights<'a> {
    if vb.contains(&format!("{prefix}.embeddings.word_embeddings.weight")) {
        vb.pp(prefix)
    } else {
        vb.clone()
    }
}

/// The registry's builder of the encoders whose config.json is BERT's: labels first (a config whose labels cannot
/// be scored is refused before any weight is read), then the activation and `load`.
pub fn build_with<M: CrossEncoder + 'static>(
    source: &ModelSource,
    weights: Weights,
    max_positions: fn(&ModelConfig) -> usize,
    load: fn(Weights, &ModelConfig, FeedForwardActivation) -> Result<M>,
) -> std::result::Result<Built, StartupError> {
    let config: ModelConfig = source.config()?;
    let scoring = source.scoring()?;
    let activation = source.activation(&config.hidden_act)?;
    let model = load(weights, &config, activation)?;
    let facts = EncoderFacts::bert_like(&config, max_positions(&config));
    Ok(Built::encoder(Box::new(model), facts, scoring))
}

/// Where a model's token types come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenTypes {
    /// The tokenizer's type ids (0 for the query, 1 for the document), checked against the table.
    FromTokenizer,
    /// Type 0 for every token, as the reference does for tokenizers that give no type ids (XLM-R).
    Zero,
}

/// BERT's embeddings: word + position + token type, then LayerNorm, at the tables' width.
pub struct Embeddings {
    tables: EmbeddingTables,
    norm: LayerNorm,
    types: TokenTypes,
    target: Target,
}

impl Embeddings {
    /// The tables of `embeddings.*` of the base model, `width` wide (hidden_size, or ELECTRA's embedding_size).
    pub fn load(
        base: &Weights,
        config: &ModelConfig,
        width: usize,
        types: TokenTypes,
    ) -> Result<Self> {
        let embeddings = base.pp("embeddings");
        let table = |rows: usize, name: &str| embeddings.tensor((rows, width), name);
        let tables = EmbeddingTables {
            word: table(config.vocab_size, "word_embeddings.weight")?,
            position: table(config.max_position_embeddings, "position_embeddings.weight")?,
            token_type: Some(table(
                config.type_vocab_size,
                "token_type_embeddings.weight",
            )?),
        };
        // flash-attention's layout keeps the embedding LayerNorm beside the embeddings, as `emb_ln`.
        let norm = match Layout::of(base) {
            Layout::Transformers => embeddings.pp("LayerNorm"),
            Layout::FlashAttention => base.pp("emb_ln"),
        };
        Ok(Self {
            tables,
            norm: norm.layer_norm(width, config.layer_norm_eps, Bias::Stored)?,
            types,
            target: base.target(),
        })
    }

    /// The normalised embeddings of a packed batch, with one position per token.
    pub fn forward(&self, batch: &PackedBatch, positions: &[u32]) -> Result<Hidden> {
        let type_ids = match self.types {
            TokenTypes::FromTokenizer => {
                let rows = self
                    .tables
                    .token_type
                    .as_ref()
                    .map_or(0, |t| t.dim(0).unwrap_or(0));
                if let Some(&t) = batch.type_ids.iter().find(|&&t| t as usize >= rows) {
                    candle_core::bail!("token type {t} is outside the model's {rows} types");
                }
                self.target.ids(&batch.type_ids)?
            }
            TokenTypes::Zero => self.target.zero_ids(batch.real_tokens())?,
        };
        ops::embed(
            &self.tables,
            &self.target.ids(&batch.input_ids)?,
            &self.target.ids(positions)?,
            Some(&type_ids),
            &self.norm,
        )
    }
}

/// Positions 0.. within each sequence of a packed batch.
pub fn absolute_positions(batch: &PackedBatch) -> Vec<u32> {
    batch.lengths().flat_map(|len| 0..len as u32).collect()
}

/// The RoBERTa-style head on the first token: out_proj(act(dense(x))), fp32.
pub struct ClassificationHead {
    dense: Linear,
    out_proj: Linear,
    /// tanh (RoBERTa, XLM-R), else exact GELU (ELECTRA).
    tanh: bool,
}

impl ClassificationHead {
    /// `classifier.dense` and `classifier.out_proj` under `vb`.
    pub fn load(vb: &Weights, config: &ModelConfig, tanh: bool) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            dense: vb.pp("dense").head_linear(h, h, Bias::Stored)?,
            out_proj: vb
                .pp("out_proj")
                .head_linear(h, config.num_labels(), Bias::Stored)?,
            tanh,
        })
    }

    pub fn forward(&self, first: &Tensor) -> Result<Tensor> {
        let dense = match self.tanh {
            true => ops::dense_tanh(&self.dense, first)?,
            false => FeedForwardActivation::GeluErf.apply(&self.dense.forward(first)?)?,
        };
        self.out_proj.forward(&dense)
    }
}

/// One encoder layer, weights as in transformers' `encoder.layer.{i}`; Q, K and V fused into one GEMM at load.
struct EncoderLayer {
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// Shapes every layer shares.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    activation: FeedForwardActivation,
}

/// How a checkpoint names the encoder's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers' BERT names: `layer.{i}.attention.self.query`, `.output.LayerNorm`, ...
    Transformers,
    /// flash-attention's BERT names, as jina-reranker-v2 ships them: `layers.{i}.mixer.Wqkv`, `.norm1`,
    /// `.mlp.fc1`, ... (the same post-norm layer).
    FlashAttention,
}

impl Layout {
    /// The layout of a base model's weights (`prefix` as in `base_weights`).
    pub fn of(vb: &Weights) -> Self {
        match vb.contains("encoder.layers.0.mixer.Wqkv.weight") {
            true => Self::FlashAttention,
            false => Self::Transformers,
        }
    }
}

/// A stack of encoder layers.
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    dims: Dims,
}

impl Encoder {
    /// Loads the layers from `vb` (already pointed at the encoder), named as `layout` says.
    pub fn load(
        vb: &Weights,
        config: &ModelConfig,
        activation: FeedForwardActivation,
        layout: Layout,
    ) -> Result<Self> {
        let hidden = config.hidden_size;
        if config.num_attention_heads == 0 || !hidden.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            );
        }
        let dims = Dims {
            heads: config.num_attention_heads,
            activation,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| match layout {
                Layout::Transformers => EncoderLayer::load(&vb.pp(format!("layer.{i}")), config),
                Layout::FlashAttention => {
                    EncoderLayer::load_flash(&vb.pp(format!("layers.{i}")), config)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, dims })
    }

    /// Runs every layer over a packed batch's embeddings and returns each sequence's first-token residual,
    /// [sequences, hidden].
    pub fn first_tokens(
        &self,
        hidden: Hidden,
        batch: &PackedBatch,
        target: &Target,
    ) -> Result<Tensor> {
        let sequences = target.sequences(&batch.cu_seqlens)?;
        Ok(self.first_token_hidden(hidden, &sequences)?.residual)
    }

    /// Every layer over packed sequences, returning the hidden state of each sequence's first token,
    /// [sequences, hidden]. `hidden`: [tokens, hidden]. The last layer computes only the first-token rows
    /// after attention, since nothing else reaches the classification head.
    fn first_token_hidden(&self, hidden: Hidden, sequences: &Sequences) -> Result<Hidden> {
        let Some((last, rest)) = self.layers.split_last() else {
            return hidden.first_tokens(sequences);
        };
        let mut hidden = hidden;
        for layer in rest {
            hidden = layer.forward(&hidden, sequences, &self.dims)?;
        }
        last.forward_first_token(&hidden, sequences, &self.dims)
    }
}

impl EncoderLayer {
    fn load(vb: &Weights, config: &ModelConfig) -> Result<Self> {
        let (h, eps, ffn) = (
            config.hidden_size,
            config.layer_norm_eps,
            config.intermediate_size,
        );
        let attention = vb.pp("attention");
        let qkv = [("query", h), ("key", h), ("value", h)];
        Ok(Self {
            qkv: attention.pp("self").fused_linear(&qkv, h, Bias::Stored)?,
            attention_output: attention.pp("output.dense").linear(h, h, Bias::Stored)?,
            attention_norm: attention
                .pp("output.LayerNorm")
                .layer_norm(h, eps, Bias::Stored)?,
            intermediate: vb.pp("intermediate.dense").linear(h, ffn, Bias::Stored)?,
            output: vb.pp("output.dense").linear(ffn, h, Bias::Stored)?,
            output_norm: vb.pp("output.LayerNorm").layer_norm(h, eps, Bias::Stored)?,
        })
    }

    /// A layer in flash-attention's names: `norm1(x + out_proj(attention(Wqkv x)))`, then
    /// `norm2(x + fc2(act(fc1 x)))`.
    fn load_flash(vb: &Weights, config: &ModelConfig) -> Result<Self> {
        let (h, eps, ffn) = (
            config.hidden_size,
            config.layer_norm_eps,
            config.intermediate_size,
        );
        let mixer = vb.pp("mixer");
        Ok(Self {
            qkv: mixer.pp("Wqkv").linear(h, 3 * h, Bias::Stored)?,
            attention_output: mixer.pp("out_proj").linear(h, h, Bias::Stored)?,
            attention_norm: vb.pp("norm1").layer_norm(h, eps, Bias::Stored)?,
            intermediate: vb.pp("mlp.fc1").linear(h, ffn, Bias::Stored)?,
            output: vb.pp("mlp.fc2").linear(ffn, h, Bias::Stored)?,
            output_norm: vb.pp("norm2").layer_norm(h, eps, Bias::Stored)?,
        })
    }

    /// Full layer: [tokens, hidden] -> [tokens, hidden].
    fn forward(&self, hidden: &Hidden, sequences: &Sequences, dims: &Dims) -> Result<Hidden> {
        let context =
            ops::projected_self_attention(&self.qkv, &hidden.input, sequences, dims.heads, false)?;
        let attended = self.attention_epilogue(&context, &hidden.residual)?;
        self.feed_forward(&attended, dims)
    }

    /// The layer for first-token rows only: K and V from every token, Q and everything after attention from
    /// the first token. Returns [sequences, hidden].
    fn forward_first_token(
        &self,
        hidden: &Hidden,
        sequences: &Sequences,
        dims: &Dims,
    ) -> Result<Hidden> {
        let context =
            ops::projected_self_attention(&self.qkv, &hidden.input, sequences, dims.heads, true)?;
        let residual = hidden.first_tokens(sequences)?.residual;
        let attended = self.attention_epilogue(&context, &residual)?;
        self.feed_forward(&attended, dims)
    }

    fn attention_epilogue(&self, context: &Tensor, residual: &Tensor) -> Result<Hidden> {
        ops::linear_residual_norm(
            &self.attention_output,
            context,
            residual,
            &self.attention_norm,
        )
    }

    fn feed_forward(&self, x: &Hidden, dims: &Dims) -> Result<Hidden> {
        let inner = ops::linear_activation(&self.intermediate, &x.input, dims.activation)?;
        ops::linear_residual_norm(&self.output, &inner, &x.residual, &self.output_norm)
    }
}
