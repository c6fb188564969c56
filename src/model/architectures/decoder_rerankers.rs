//! Decoder rerankers built on the Qwen decoder (`qwen.rs`): which architecture is which reranker, its prompt,
//! the tokens its score reads, and loading it: Qwen3-Reranker (Qwen3ForCausalLM, and converted
//! Qwen3ForSequenceClassification "seq-cls" checkpoints) and mxbai-rerank-v2 (Qwen2ForCausalLM).

use super::qwen::{Family, Qwen3Config, Qwen3Reranker, ScoreHead};
use crate::error::StartupError;
use crate::model::ops::Weights;
use crate::model::scoring::{Activation, Scoring};
use crate::model::{Built, ModelSource};
use crate::tokenization::{PromptLayout, PromptTemplate};

pub const CAUSAL_LM: &str = "Qwen3ForCausalLM";
pub const SEQUENCE_CLASSIFICATION: &str = "Qwen3ForSequenceClassification";
pub const QWEN2_CAUSAL_LM: &str = "Qwen2ForCausalLM";
pub const GEMMA_CAUSAL_LM: &str = "GemmaForCausalLM";

/// FlagEmbedding's LLM reranker default `max_length`: the query keeps at most 3/4 of it, the passage at most all
/// of it, and the prompt's separator and question come on top (see `PromptLayout::Flag`).
const FLAG_MAX_LENGTH: usize = 512;

/// The longest pair unless configured, as Qwen3-Reranker's published scoring code.
const DEFAULT_MAX_LENGTH: usize = 8192;

/// Qwen3-Reranker's prompt, from its model card: the chat frame, the judging system message, the instruction,
/// query and document, and an empty thinking block before the answer.
pub fn qwen3_reranker_prompt() -> PromptTemplate {
    PromptTemplate {
        family: "qwen3-reranker".into(),
        prefix: "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the \
                 Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
            .into(),
        body: "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}".into(),
        suffix: "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".into(),
        default_instruction: Some(
            "Given a web search query, retrieve relevant passages that answer the query".into(),
        ),
        layout: PromptLayout::WholeBody,
    }
}

/// mxbai-rerank-v2's prompt, from its published scoring code (the mxbai-rerank package): Qwen's chat frame, the
/// query (after an instruction line when a request gives one) and the document tokenized apart, then the task.
pub fn mxbai_rerank_v2_prompt() -> PromptTemplate {
    let prefix = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
                  <|im_start|>user\n";
    let task = "You are a search relevance expert who evaluates how well documents match search queries. For each \
                query-document pair, carefully analyze the semantic relationship between them, then provide your \
                binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:";
    let chat_suffix = "<|im_end|>\n<|im_start|>assistant\n";
    PromptTemplate {
        family: "mxbai-rerank-v2".into(),
        prefix: prefix.into(),
        body: "[instruction: {instruction}\n]query: {query}\ndocument: {document}".into(),
        suffix: ["\n", task, chat_suffix].concat(),
        default_instruction: None,
        layout: PromptLayout::QueryThenDocument {
            instruction: "instruction: {instruction}".into(),
            query: "query: {query}".into(),
            document: "document: {document}".into(),
            separator: "\n".into(),
            suffix_parts: vec!["\n".into(), task.into(), chat_suffix.into()],
        },
    }
}

/// bge-reranker-v2-gemma's prompt, as FlagEmbedding's LLM reranker builds it: BOS, `A: {query}`, a newline,
/// `B: {passage}`, a newline and the yes/no question.
pub fn bge_reranker_gemma_prompt() -> PromptTemplate {
    let task = "Given a query A and a passage B, determine whether the passage contains an answer to the query by \
                providing a prediction of either 'Yes' or 'No'.";
    PromptTemplate {
        family: "bge-reranker-v2-gemma".into(),
        prefix: String::new(),
        body: "<bos>A: {query}\nB: {document}".into(),
        suffix: ["\n", task].concat(),
        default_instruction: None,
        layout: PromptLayout::Flag {
            lead: "<bos>".into(),
            query: "A: {query}".into(),
            document: "B: {document}".into(),
            separator: "\n".into(),
            task: task.into(),
        },
    }
}

/// The registry's builder for the decoder rerankers: Qwen3ForCausalLM scored by logit("yes") - logit("no") at
/// the last token (the ids from the model's tokenizer), a converted Qwen3ForSequenceClassification by its stored
/// head, mxbai-rerank-v2 (Qwen2) by logit("1") - logit("0"), bge-reranker-v2-gemma by logit("Yes").
pub fn build(source: &ModelSource, weights: Weights) -> Result<Built, StartupError> {
    let config: Qwen3Config = source.config()?;
    source.refuse(config.unsupported())?;
    let family = match source.architecture.as_str() {
        QWEN2_CAUSAL_LM => Family::Qwen2,
        GEMMA_CAUSAL_LM => Family::Gemma,
        _ => Family::Qwen3,
    };
    let (head, scoring, prompt) = score_head(source)?;
    let model = Qwen3Reranker::load(weights, &config, family, head)?;
    Ok(Built {
        model: Box::new(model),
        max_positions: config.max_position_embeddings,
        vocab_size: config.vocab_size,
        pad_token_id: 0,
        attention_span: attention_span(&config),
        scoring,
        prompt: Some(prompt),
        default_max_length: Some(match family {
            Family::Gemma => flag_default_max_length(&source.dir)?,
            Family::Qwen2 | Family::Qwen3 => DEFAULT_MAX_LENGTH,
        }),
    })
}

/// Which logits make the score, how it becomes one, and the prompt, by architecture.
fn score_head(source: &ModelSource) -> Result<(ScoreHead, Scoring, PromptTemplate), StartupError> {
    let dir = source.dir.as_path();
    let sigmoid = Scoring::SingleLogit(Activation::Sigmoid);
    let tokens = |positive, negative| ScoreHead::TokenLogits { positive, negative };
    Ok(match source.architecture.as_str() {
        // FlagEmbedding scores the logit of the first token of "Yes" alone.
        GEMMA_CAUSAL_LM => (
            tokens(first_token_id(dir, "Yes")?, None),
            sigmoid,
            bge_reranker_gemma_prompt(),
        ),
        // mxbai reads its ids by tokenizing "1" and "0" (their first id).
        QWEN2_CAUSAL_LM => (
            tokens(first_token_id(dir, "1")?, Some(first_token_id(dir, "0")?)),
            sigmoid,
            mxbai_rerank_v2_prompt(),
        ),
        CAUSAL_LM => (
            tokens(token_id(dir, "yes")?, Some(token_id(dir, "no")?)),
            sigmoid,
            qwen3_reranker_prompt(),
        ),
        _ => match source.scoring()? {
            scoring @ Scoring::SingleLogit(_) => {
                (ScoreHead::Stored, scoring, qwen3_reranker_prompt())
            }
            Scoring::TwoLabelSoftmax => {
                return Err(StartupError::Unsupported(format!(
                "a two-label {SEQUENCE_CLASSIFICATION} in {}: converted rerankers have one logit",
                source.config_path.display()
            )))
            }
        },
    })
}

/// Our whole-pair max_length that gives FlagEmbedding's default limits: its 512 for query (3/4) and passage, plus
/// twice the separator and question tokens (S), since our query and document limits leave 2·S of max_length
/// (see `PromptLayout::Flag`). S is counted with the model's own tokenizer.
fn flag_default_max_length(dir: &std::path::Path) -> Result<usize, StartupError> {
    let PromptLayout::Flag {
        separator, task, ..
    } = bge_reranker_gemma_prompt().layout
    else {
        return Ok(FLAG_MAX_LENGTH);
    };
    let suffix = token_count(dir, &separator)? + token_count(dir, &task)?;
    Ok(FLAG_MAX_LENGTH + 2 * suffix)
}

/// The ids of `text` tokenized without special tokens, as the prompt encoder and the reference codes tokenize
/// the prompt's parts and score words.
fn encode_ids(dir: &std::path::Path, text: &str) -> Result<Vec<u32>, StartupError> {
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

fn token_count(dir: &std::path::Path, text: &str) -> Result<usize, StartupError> {
    Ok(encode_ids(dir, text)?.len())
}

/// The first id of `text` tokenized without special tokens, as mxbai's code reads its score tokens.
fn first_token_id(dir: &std::path::Path, text: &str) -> Result<u32, StartupError> {
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
fn token_id(dir: &std::path::Path, token: &str) -> Result<u32, StartupError> {
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
fn attention_span(config: &Qwen3Config) -> usize {
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.num_key_value_heads * config.head_dim();
    let dense = 2 * config.hidden_size * (2 * q + 2 * kv + 3 * config.intermediate_size);
    dense / (4 * q).max(1)
}
