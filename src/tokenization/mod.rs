//! Pair tokenization with the model's own tokenizer: query once per request, documents on a bounded worker pool,
//! the tokenizer's pair template, and longest-first truncation exactly as Hugging Face tokenizers apply it.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use tokenizers::{Encoding, PostProcessor, Tokenizer};

use crate::error::{RerankError, StartupError};
use crate::metrics::Metrics;

mod ascii_wordpiece;
mod cache;
mod chunks;
mod fast_path;
mod lengths;
mod prompt;
pub mod templates;
mod unigram;
mod workers;
use cache::DocumentCache;
use fast_path::FastPath;
use lengths::{keep_first, longest_first_lengths, resolve_max_length};
pub use prompt::{PromptBody, PromptLayout, PromptTemplate};
use prompt::{PromptEncoder, PromptedQuery};

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
    /// With a prompt template: the query's part of every pair (the encoding is then unused).
    prompted: Option<PromptedQuery>,
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
    prompt: Option<PromptEncoder>,
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

    /// Puts every pair in `template` instead of the tokenizer's pair template, tokenized and truncated as the
    /// model's published scoring code does. `positions`: the model's position embeddings.
    pub fn with_prompt(
        mut self,
        template: PromptTemplate,
        positions: usize,
    ) -> Result<Self, StartupError> {
        let family = template.family.clone();
        let prompt = PromptEncoder::new(template, &self.tokenizer, positions)
            .map_err(|e| StartupError::Config(format!("the {family} prompt: {e}")))?;
        let fixed = prompt.fixed_tokens();
        if self.max_length <= fixed {
            return Err(StartupError::Config(format!(
                "max_length {} leaves no room for a pair inside the {fixed} tokens of the {family} prompt",
                self.max_length
            )));
        }
        self.added_pair_tokens = fixed;
        self.prompt = Some(prompt);
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
        prompt::check_options(
            self.prompt.as_ref(),
            truncation,
            max_document_tokens,
            instruction,
        )
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
        if let Some(prompt) = &self.prompt {
            let (prompted, len) =
                prompt.query(&self.tokenizer, query, instruction, self.text_budget())?;
            return Ok(QueryTokens {
                encoding: Encoding::default(),
                full_len: len,
                prompted: Some(prompted),
            });
        }
        prompt::check_options(None, Truncation::LongestFirst, None, instruction)?;
        let encoding = guarded(|| self.tokenizer.encode_fast(query, false))
            .map_err(|e| RerankError::invalid(format!("query could not be tokenized: {e}")))?;
        let full_len = encoding.len();
        Ok(QueryTokens {
            encoding: keep_first(encoding, self.text_budget()),
            full_len,
            prompted: None,
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
        if let (Some(prompt), Some(prompted)) = (&self.prompt, &query.prompted) {
            let room = self.text_budget();
            return prompt.pair(&self.tokenizer, prompted, document, truncation, room, index);
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

    /// A document through the fast path, where it applies.
    fn fast_document(&self, document: &str) -> Option<Encoding> {
        self.fast_path.as_ref()?.encode(document, 1)
    }

    /// Which fast path documents take, if any: `ascii-wordpiece` or `unigram`.
    pub fn fast_path_name(&self) -> Option<&'static str> {
        self.fast_path.as_ref().map(FastPath::name)
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

/// Runs a tokenizer call, turning a panic inside the tokenizer into an error.
pub(super) fn guarded<T>(f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("tokenizer panicked".into()),
    }
}
