//! The post-LayerNorm transformer encoder shared by BERT and (XLM-)RoBERTa: fused-QKV self-attention and feed-forward.

use candle_core::{Result, Tensor};

use crate::model::hf_config::ModelConfig;
use crate::model::ops::{
    self, Bias, EmbeddingTables, FeedForwardActivation, Hidden, LayerNorm, Linear, Sequences,
    Weights,
};

/// The weights of the base model: under `prefix` (as *ForSequenceClassification checkpoints save them, e.g.
/// `bert.`) or at the root of the file.
pub fn base_weights<'a>(vb: &Weights<'a>, prefix: &str) -> Weights<'a> {
    if vb.contains(&format!("{prefix}.embeddings.word_embeddings.weight")) {
        vb.pp(prefix)
    } else {
        vb.clone()
    }
}

/// The word, position and token-type tables and their LayerNorm, from `embeddings.*` of the base model.
pub fn load_embeddings(
    base: &Weights,
    config: &ModelConfig,
) -> Result<(EmbeddingTables, LayerNorm)> {
    let h = config.hidden_size;
    let embeddings = base.pp("embeddings");
    let tables = EmbeddingTables {
        word: embeddings.tensor((config.vocab_size, h), "word_embeddings.weight")?,
        position: embeddings.tensor(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?,
        token_type: Some(
            embeddings.tensor((config.type_vocab_size, h), "token_type_embeddings.weight")?,
        ),
    };
    // flash-attention's layout keeps the embedding LayerNorm beside the embeddings, as `emb_ln`.
    let norm = match Layout::of(base) {
        Layout::Transformers => embeddings.pp("LayerNorm"),
        Layout::FlashAttention => base.pp("emb_ln"),
    };
    let norm = norm.layer_norm(h, config.layer_norm_eps, Bias::Stored)?;
    Ok((tables, norm))
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

    /// Runs every layer over packed sequences and returns the hidden state of each sequence's first token,
    /// [sequences, hidden]. `hidden`: [tokens, hidden]. The last layer computes only the first-token rows
    /// after attention, since nothing else reaches the classification head.
    pub fn forward_first_token(&self, hidden: Hidden, sequences: &Sequences) -> Result<Hidden> {
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
