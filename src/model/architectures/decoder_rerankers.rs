//! What the decoder rerankers share: building one from its variant, score head, scoring and prompt (each family's
//! file says which: `qwen3.rs`, `qwen2.rs`, `gemma.rs`), and reading the score tokens from its tokenizer.

use super::decoder::{Decoder, DecoderConfig, ScoreHead, Variant};
use crate::error::StartupError;
use crate::model::ops::Weights;
use crate::model::prefix_reuse::PrefixReuse;
use crate::model::scoring::Scoring;
use crate::model::{Built, CutoffLayers, ModelSource};
use crate::tokenization::{PromptLayout, PromptTemplate};

/// How a family's reranker reads and scores: its decoder variant, which logits make the score and how, its
/// prompt, and the longest pair unless configured (the reference's default).
pub struct Reranker {
    pub variant: Variant,
    pub head: ScoreHead,
    pub scoring: Scoring,
    pub prompt: PromptTemplate,
    pub default_max_length: usize,
}

/// The decoder of `source` with its prompt prefixes reused across pairs and batches.
pub fn build(
    source: &ModelSource,
    weights: Weights,
    reranker: Reranker,
) -> Result<Built, StartupError> {
    let config: DecoderConfig = source.config()?;
    source.refuse(config.unsupported())?;
    let cutoff_layers = match reranker.head {
        ScoreHead::PerLayer { first, default } => Some(CutoffLayers {
            first,
            last: config.num_hidden_layers,
            default,
        }),
        _ => None,
    };
    let decoder = Decoder::load(weights, &config, reranker.variant, reranker.head)?;
    Ok(Built {
        model: Box::new(PrefixReuse::new(decoder)),
        max_positions: config.max_position_embeddings,
        vocab_size: config.vocab_size,
        pad_token_id: 0,
        attention_span: attention_span(&config),
        scoring: reranker.scoring,
        prompt: Some(reranker.prompt),
        default_max_length: Some(reranker.default_max_length),
        cutoff_layers,
    })
}

/// The ids of `text` tokenized without special tokens, as the prompt encoder and the reference codes tokenize
/// the prompt's parts and score words.
pub fn encode_ids(dir: &std::path::Path, text: &str) -> Result<Vec<u32>, StartupError> {
    let path = dir.join("tokenizer.json");
    let invalid = |reason: String| StartupError::InvalidFile {
        path: path.clone(),
        reason,
    };
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(&path).map_err(|e| invalid(e.to_string()))?;
    // A tokenizer.json may carry truncation and padding settings (for other uses of the file); the prompt's
    // parts are counted whole and unpadded, as the pair tokenizer encodes them.
    tokenizer
        .with_truncation(None)
        .map_err(|e| invalid(e.to_string()))?
        .with_padding(None);
    let encoding = tokenizer
        .encode_fast(text, false)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(encoding.get_ids().to_vec())
}

pub fn token_count(dir: &std::path::Path, text: &str) -> Result<usize, StartupError> {
    Ok(encode_ids(dir, text)?.len())
}

/// The first id of `text` tokenized without special tokens, as mxbai's code reads its score tokens.
pub fn first_token_id(dir: &std::path::Path, text: &str) -> Result<u32, StartupError> {
    encode_ids(dir, text)?
        .first()
        .copied()
        .ok_or_else(|| StartupError::InvalidFile {
            path: dir.join("tokenizer.json"),
            reason: format!(
                "the tokenizer gives no token for {text:?}, which the reranker's score reads"
            ),
        })
}

/// A token's id in the model's tokenizer (vocabulary or added tokens), as transformers' convert_tokens_to_ids.
pub fn token_id(dir: &std::path::Path, token: &str) -> Result<u32, StartupError> {
    let path = dir.join("tokenizer.json");
    let tokenizer =
        tokenizers::Tokenizer::from_file(&path).map_err(|e| StartupError::InvalidFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| StartupError::InvalidFile {
            path,
            reason: format!(
                "the tokenizer has no token {token:?}, which the reranker's score reads"
            ),
        })
}

/// Context tokens at which a token's attention costs as much as its dense layers (see `LoadedModel`): per layer,
/// the projections and the gated MLP are 2·h·(2·q + 2·kv + 3·intermediate) FLOPs a token, attention 4·q per token
/// of context (q = heads · head_dim, kv = kv_heads · head_dim).
fn attention_span(config: &DecoderConfig) -> usize {
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.num_key_value_heads * config.head_dim();
    let dense = 2 * config.hidden_size * (2 * q + 2 * kv + 3 * config.intermediate_size);
    dense / (4 * q).max(1)
}

/// FlagEmbedding's LLM reranker default `max_length`: the query keeps at most 3/4 of it, the passage at most all
/// of it, and the prompt's separator and question come on top (see `PromptLayout::Flag`).
const FLAG_MAX_LENGTH: usize = 512;

/// Our whole-pair max_length that gives FlagEmbedding's default limits for `prompt` (a `PromptLayout::Flag`): its
/// 512 for query (3/4) and passage, plus twice the separator and question tokens (S), since our query and
/// document limits leave 2·S of max_length. S is counted with the model's own tokenizer.
pub fn flag_default_max_length(
    dir: &std::path::Path,
    prompt: &PromptTemplate,
) -> Result<usize, StartupError> {
    let PromptLayout::Flag {
        separator, task, ..
    } = &prompt.layout
    else {
        return Ok(FLAG_MAX_LENGTH);
    };
    let suffix = token_count(dir, separator)? + token_count(dir, task)?;
    Ok(FLAG_MAX_LENGTH + 2 * suffix)
}
