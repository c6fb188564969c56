//! Pair tokenization with the model's own tokenizer: query once per request, documents on a bounded worker pool,
//! the tokenizer's pair template, and longest-first truncation exactly as Hugging Face tokenizers apply it.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use tokenizers::utils::truncation::TruncationDirection;
use tokenizers::{Encoding, PostProcessor, Tokenizer};

use crate::error::{RerankError, StartupError};
use crate::metrics::Metrics;

mod ascii_wordpiece;
mod cache;
mod lengths;
mod prompt;
mod unigram;
mod workers;
use ascii_wordpiece::AsciiWordPiece;
use cache::DocumentCache;
use lengths::{keep_first, least_word_tokens, longest_first_lengths, resolve_max_length};
pub use prompt::{PromptBody, PromptTemplate};
use unigram::UnigramFastPath;

/// Tokens neighbouring windows of a chunked document share, unless configured: about what rerankers that
/// window long documents use.
pub const DEFAULT_CHUNK_OVERLAP: usize = 80;

/// What to do with a pair longer than max_length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Remove tokens from the longer of query and document first, as tokenizers' `longest_first`.
    #[default]
    LongestFirst,
    /// Refuse the request.
    Reject,
    /// Split an over-long document into overlapping windows that each fit with the query (at most
    /// `max_chunks`, the first ones); the document's score is its best window's.
    ChunkMax { max_chunks: usize },
}

/// A query tokenized without special tokens, shared by all of its pairs. Only the part that can ever reach a
/// pair is kept, so each pair copies at most max_length tokens of it, however long the query.
#[derive(Debug, Clone)]
pub struct QueryTokens {
    /// The query's first (max_length - special tokens) tokens, without overflow pieces.
    encoding: Encoding,
    /// Tokens of the whole query: longest-first truncation compares this length, not the kept part's.
    full_len: usize,
    /// With a prompt template: the pair's body around the document (the encoding is the part before it).
    body: Option<PromptBody>,
}

impl QueryTokens {
    pub fn len(&self) -> usize {
        self.full_len
    }

    pub fn is_empty(&self) -> bool {
        self.full_len == 0
    }
}

/// Model input of one (query, document) pair, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairTokens {
    pub input_ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl PairTokens {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// The model's tokenizer, configured for pairs, with its worker pool.
pub struct PairTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    /// Special tokens the pair template adds (3 for BERT's `[CLS] q [SEP] d [SEP]`).
    added_pair_tokens: usize,
    pool: rayon::ThreadPool,
    /// The fast path for documents, when this tokenizer is of a kind that has one.
    fast_path: Option<FastPath>,
    /// Tokens neighbouring windows of a chunked document share.
    chunk_overlap: usize,
    /// Documents' token ids by their text, when a cache is configured.
    cache: Option<DocumentCache>,
    /// Where worker time spent encoding documents is counted.
    metrics: Arc<Metrics>,
    /// Documents encoded since start.
    documents_encoded: std::sync::atomic::AtomicU64,
    /// A decoder reranker's prompt, which pairs are put in instead of the pair template.
    prompt: Option<Prompt>,
}

/// A prompt template with its prefix and suffix tokenized once.
struct Prompt {
    template: PromptTemplate,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

impl PairTokenizer {
    /// Loads `tokenizer.json` and switches off its own truncation and padding (ours apply instead).
    /// max_length: `configured`, else min(tokenizer_config model_max_length, `max_positions`).
    pub fn load(
        dir: &Path,
        configured: Option<usize>,
        max_positions: usize,
        workers: usize,
    ) -> Result<Self, StartupError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(StartupError::MissingFile {
                path,
                expected: "the model's fast tokenizer (tokenizer.json, as saved by Hugging Face tokenizers)".into(),
            });
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| StartupError::InvalidFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| StartupError::InvalidFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        let added_pair_tokens = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        let max_length = resolve_max_length(dir, configured, max_positions, added_pair_tokens)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers.max(1))
            .thread_name(|i| format!("tokenizer-{i}"))
            .build()
            .map_err(|e| StartupError::Config(format!("tokenizer worker pool: {e}")))?;
        let fast_path = FastPath::for_tokenizer(&tokenizer);
        Ok(Self {
            tokenizer,
            max_length,
            added_pair_tokens,
            pool,
            fast_path,
            chunk_overlap: DEFAULT_CHUNK_OVERLAP,
            cache: None,
            metrics: Arc::new(Metrics::new()),
            documents_encoded: std::sync::atomic::AtomicU64::new(0),
            prompt: None,
        })
    }

    /// Puts every pair in `template` (prefix + body + suffix, the body alone truncated) instead of the
    /// tokenizer's pair template, as decoder rerankers' published scoring code does.
    pub fn with_prompt(mut self, template: PromptTemplate) -> Result<Self, StartupError> {
        let encode = |text: &str| {
            guarded(|| self.tokenizer.encode_fast(text, false))
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| StartupError::Config(format!("the {} prompt: {e}", template.family)))
        };
        let (prefix, suffix) = (encode(&template.prefix)?, encode(&template.suffix)?);
        let added = prefix.len() + suffix.len();
        if self.max_length <= added {
            return Err(StartupError::Config(format!(
                "max_length {} leaves no room for a pair inside the {added} tokens of the {} prompt",
                self.max_length, template.family
            )));
        }
        self.added_pair_tokens = added;
        self.prompt = Some(Prompt {
            template,
            prefix,
            suffix,
        });
        Ok(self)
    }

    /// The prompt template pairs are put in, for decoder rerankers.
    pub fn prompt(&self) -> Option<&PromptTemplate> {
        self.prompt.as_ref().map(|p| &p.template)
    }

    /// Refuses options this tokenizer cannot honour: chunk windows and a per-document token cut of prompted
    /// pairs (a document's tokens are not apart from the body's), and an instruction without a prompt for it.
    pub fn check_options(
        &self,
        truncation: Truncation,
        max_document_tokens: Option<usize>,
        instruction: Option<&str>,
    ) -> Result<(), RerankError> {
        match &self.prompt {
            Some(prompt) if matches!(truncation, Truncation::ChunkMax { .. }) => Err(RerankError::invalid(format!(
                "chunk-max truncation is not available for {} models",
                prompt.template.family
            ))),
            Some(prompt) if max_document_tokens.is_some() => Err(RerankError::invalid(format!(
                "max_tokens_per_doc is not available for {} models (the whole pair is truncated to max_length)",
                prompt.template.family
            ))),
            None if instruction.is_some() => Err(RerankError::invalid(
                "instruction is only for instruction-following rerankers; this model takes none",
            )),
            _ => Ok(()),
        }
    }

    /// Counts worker time into the server's metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Tokens neighbouring windows of a chunked document share.
    pub fn with_chunk_overlap(mut self, tokens: usize) -> Self {
        self.chunk_overlap = tokens;
        self
    }

    /// Keeps documents' token ids, up to `bytes` of texts and ids, so a document seen again is not tokenized
    /// again (0: no cache). Hits and misses are counted in the metrics given to `with_metrics` before this.
    pub fn with_token_cache(mut self, bytes: usize) -> Self {
        self.cache = (bytes > 0).then(|| DocumentCache::new(bytes, Arc::clone(&self.metrics)));
        self
    }

    /// Bytes the document cache holds (0 without one).
    pub fn token_cache_bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, DocumentCache::weight)
    }

    /// Documents encoded since start (not counting those a cancelled call never had encoded).
    pub fn documents_encoded(&self) -> u64 {
        self.documents_encoded
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// A low estimate of the tokens the pairs of `query` with `documents` hold, before tokenizing them. A pair
    /// keeps min(query + document tokens, max_length - special tokens) of its text; an ASCII document is
    /// counted word by word (`least_word_tokens`), any other at none.
    pub fn least_tokens(
        &self,
        query: &QueryTokens,
        documents: &[String],
        max_document_tokens: Option<usize>,
    ) -> usize {
        documents
            .iter()
            .map(|document| {
                let document_tokens: usize = if document.is_ascii() {
                    document
                        .split_ascii_whitespace()
                        .map(least_word_tokens)
                        .sum()
                } else {
                    0
                };
                let document_tokens =
                    document_tokens.min(max_document_tokens.unwrap_or(usize::MAX));
                (query.len() + document_tokens).min(self.text_budget()) + self.added_pair_tokens
            })
            .sum()
    }

    /// Tokens of a pair's text: max_length less the template's special tokens.
    fn text_budget(&self) -> usize {
        self.max_length - self.added_pair_tokens
    }

    /// Tokenizes the query once, without special tokens. With a prompt, the query and `instruction` (or the
    /// template's default) fill the body; its text before the document is what gets tokenized here.
    pub fn encode_query(
        &self,
        query: &str,
        instruction: Option<&str>,
    ) -> Result<QueryTokens, RerankError> {
        let body = match &self.prompt {
            Some(prompt) => Some(
                prompt
                    .template
                    .body_for(query, instruction)
                    .map_err(RerankError::invalid)?,
            ),
            None if instruction.is_some() => return Err(RerankError::invalid(
                "instruction is only for instruction-following rerankers; this model takes none",
            )),
            None => None,
        };
        let text = body.as_ref().map_or(query, |b| b.before_document.as_str());
        let encoding = guarded(|| self.tokenizer.encode_fast(text, false))
            .map_err(|e| RerankError::invalid(format!("query could not be tokenized: {e}")))?;
        let full_len = encoding.len();
        Ok(QueryTokens {
            encoding: keep_first(encoding, self.text_budget()),
            full_len,
            body,
        })
    }

    /// A prompted pair: prefix + the body (instruction, query and document) cut to the room left + suffix.
    fn encode_prompted(
        &self,
        prompt: &Prompt,
        body: &PromptBody,
        document: &str,
        truncation: Truncation,
        index: usize,
    ) -> Result<PairTokens, RerankError> {
        let text = [
            body.before_document.as_str(),
            document,
            body.after_document.as_str(),
        ]
        .concat();
        let encoding =
            guarded(|| self.tokenizer.encode_fast(text.as_str(), false)).map_err(|e| {
                RerankError::invalid(format!("documents[{index}] could not be tokenized: {e}"))
            })?;
        let ids = encoding.get_ids();
        let total = ids.len() + self.added_pair_tokens;
        if total > self.max_length && truncation == Truncation::Reject {
            return Err(RerankError::invalid(format!(
                "documents[{index}]: the prompted pair is {total} tokens, over max_length {} (truncation is REJECT)",
                self.max_length
            )));
        }
        let kept = &ids[..ids.len().min(self.text_budget())];
        let input_ids = [prompt.prefix.as_slice(), kept, prompt.suffix.as_slice()].concat();
        Ok(PairTokens {
            type_ids: vec![0; input_ids.len()],
            input_ids,
        })
    }

    /// Builds one pair's model input. `index` names the document in errors.
    pub fn encode_pair(
        &self,
        query: &QueryTokens,
        document: &str,
        truncation: Truncation,
        index: usize,
    ) -> Result<PairTokens, RerankError> {
        self.encode_pair_within(query, document, truncation, None, index)
    }

    /// `encode_pair`, with the document first cut to its first `max_document_tokens` tokens if given.
    fn encode_pair_within(
        &self,
        query: &QueryTokens,
        document: &str,
        truncation: Truncation,
        max_document_tokens: Option<usize>,
        index: usize,
    ) -> Result<PairTokens, RerankError> {
        if let (Some(prompt), Some(body)) = (&self.prompt, &query.body) {
            return self.encode_prompted(prompt, body, document, truncation, index);
        }
        let mut doc = self.encode_document(document, index)?;
        if let Some(limit) = max_document_tokens.filter(|&limit| limit < doc.len()) {
            doc = keep_first(doc, limit);
        }
        let total = query.len() + doc.len() + self.added_pair_tokens;
        if total > self.max_length && truncation == Truncation::Reject {
            return Err(RerankError::invalid(format!(
                "documents[{index}]: the pair is {total} tokens, over max_length {} (truncation is REJECT)",
                self.max_length
            )));
        }
        let (query_len, doc_len) =
            longest_first_lengths(query.len(), doc.len(), self.text_budget());
        let (first, second) = (
            keep_first(query.encoding.clone(), query_len),
            keep_first(doc, doc_len),
        );
        self.template(first, second, index)
    }

    /// A document's tokens without special tokens. The second sequence of a pair has type id 1 before the
    /// template runs, as tokenizers encodes pairs.
    fn encode_document(&self, document: &str, index: usize) -> Result<Encoding, RerankError> {
        let Some(cache) = &self.cache else {
            return self.tokenize_document(document, index);
        };
        if let Some(doc) = cache.get(document) {
            return Ok(doc);
        }
        let doc = self.tokenize_document(document, index)?;
        cache.insert(document, &doc);
        Ok(doc)
    }

    /// `encode_document` through the tokenizer (or its fast path).
    fn tokenize_document(&self, document: &str, index: usize) -> Result<Encoding, RerankError> {
        if let Some(doc) = self.fast_document(document) {
            return Ok(doc);
        }
        let mut doc = guarded(|| self.tokenizer.encode_fast(document, false)).map_err(|e| {
            RerankError::invalid(format!("documents[{index}] could not be tokenized: {e}"))
        })?;
        doc.set_type_ids(vec![1; doc.len()]);
        Ok(doc)
    }

    /// The pair template (special tokens, type ids) around a query part and a document part.
    fn template(
        &self,
        query: Encoding,
        document: Encoding,
        index: usize,
    ) -> Result<PairTokens, RerankError> {
        let pair =
            guarded(|| self.tokenizer.post_process(query, Some(document), true)).map_err(|e| {
                RerankError::internal(format!("documents[{index}]: pair template failed: {e}"))
            })?;
        Ok(PairTokens {
            input_ids: pair.get_ids().to_vec(),
            type_ids: pair.get_type_ids().to_vec(),
        })
    }

    /// The pairs of one document in windows: the whole pair when it fits (exactly as `encode_pair`), else the
    /// query (at most half of a pair's text) with consecutive windows of the document that share
    /// `chunk_overlap` tokens (at most half a window), the first `max_chunks` of them.
    pub fn encode_windows(
        &self,
        query: &QueryTokens,
        document: &str,
        max_chunks: usize,
        index: usize,
    ) -> Result<Vec<PairTokens>, RerankError> {
        self.check_options(Truncation::ChunkMax { max_chunks }, None, None)?;
        let mut doc = self.encode_document(document, index)?;
        if query.len() + doc.len() <= self.text_budget() {
            let query_part = keep_first(query.encoding.clone(), query.len());
            return Ok(vec![self.template(query_part, doc, index)?]);
        }
        let query_len = query.len().min(self.text_budget() / 2);
        let window = self.text_budget() - query_len;
        doc.truncate(
            window,
            self.chunk_overlap.min(window / 2),
            TruncationDirection::Right,
        );
        let rest = doc.take_overflowing();
        std::iter::once(doc)
            .chain(rest)
            .take(max_chunks.max(1))
            .map(|part| {
                let query_part = keep_first(query.encoding.clone(), query_len);
                self.template(query_part, part, index)
            })
            .collect()
    }

    /// A document through the fast path, where it applies.
    fn fast_document(&self, document: &str) -> Option<Encoding> {
        match self.fast_path.as_ref()? {
            FastPath::AsciiWordPiece(fast) => fast.encode(document, 1),
            FastPath::Unigram(fast) => fast.encode(document, 1),
        }
    }

    /// Which fast path documents take, if any: `ascii-wordpiece` or `unigram`.
    pub fn fast_path_name(&self) -> Option<&'static str> {
        self.fast_path.as_ref().map(|fast| match fast {
            FastPath::AsciiWordPiece(_) => "ascii-wordpiece",
            FastPath::Unigram(_) => "unigram",
        })
    }

    /// The document's ids from the tokenizer itself, bypassing the fast path (for tests that compare them).
    pub fn reference_document_ids(&self, document: &str) -> Result<Vec<u32>, String> {
        guarded(|| self.tokenizer.encode_fast(document, false)).map(|e| e.get_ids().to_vec())
    }

    /// The document's ids from the fast path, if it applies to this tokenizer and text.
    pub fn fast_document_ids(&self, document: &str) -> Option<Vec<u32>> {
        self.fast_document(document).map(|e| e.get_ids().to_vec())
    }
}

/// Our own encoders for the common tokenizer shapes, giving exactly the tokenizer's ids.
enum FastPath {
    /// BERT's WordPiece on ASCII text.
    AsciiWordPiece(AsciiWordPiece),
    /// SentencePiece Unigram (XLM-R) on any text.
    Unigram(Box<UnigramFastPath>),
}

impl FastPath {
    fn for_tokenizer(tokenizer: &Tokenizer) -> Option<Self> {
        AsciiWordPiece::from_tokenizer(tokenizer)
            .map(Self::AsciiWordPiece)
            .or_else(|| {
                UnigramFastPath::from_tokenizer(tokenizer).map(|u| Self::Unigram(Box::new(u)))
            })
    }
}

/// Runs a tokenizer call, turning a panic inside the tokenizer into an error.
fn guarded<T>(f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("tokenizer panicked".into()),
    }
}
