//! Pairs of a long document in overlapping windows (chunk-max), and the low estimate of a request's tokens that
//! admission reads before anything is tokenized.

use tokenizers::utils::truncation::TruncationDirection;

use super::lengths::{keep_first, least_word_tokens};
use super::{PairTokenizer, PairTokens, QueryTokens, Truncation};
use crate::error::RerankError;

impl PairTokenizer {
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
}
