//! Per-request limits: what one call may send.

use std::time::Duration;

use crate::config::Config;
use crate::error::RerankError;

/// Per-request limits; violations are errors that name the limit (TooLarge for sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_documents: usize,
    pub max_stream_documents: usize,
    pub max_document_bytes: usize,
    pub max_query_bytes: usize,
    /// Pairs of one stream that may wait for scores before the server stops reading the stream.
    pub max_stream_pending_pairs: usize,
    /// A stream whose client neither reads nor sends for this long is ended.
    pub stream_idle_timeout: Duration,
    /// A stream's `start` message must arrive within this time; until it has, the stream holds no call slot.
    pub request_read_timeout: Duration,
    /// Windows of one document scored with `Truncation::ChunkMax` unless the call asks for fewer.
    pub max_chunks_per_doc: usize,
    /// Tokens neighbouring windows share (as the tokenizer was configured).
    pub chunk_overlap_tokens: usize,
    /// Calls in progress across all transports (enforced by `CallSlots`).
    pub max_concurrent_calls: usize,
}

impl Limits {
    /// The query must hold text and fit max_query_bytes.
    /// An instruction counts against the query's byte limit: it is part of every pair, as the query is.
    pub fn check_instruction(&self, instruction: &str) -> Result<(), RerankError> {
        if instruction.len() > self.max_query_bytes {
            return Err(RerankError::too_large(format!(
                "instruction is {} bytes, over the limit of {} (max_query_bytes)",
                instruction.len(),
                self.max_query_bytes
            )));
        }
        Ok(())
    }

    pub fn check_query(&self, query: &str) -> Result<(), RerankError> {
        if query.trim().is_empty() {
            return Err(RerankError::invalid("query must not be empty"));
        }
        if query.len() > self.max_query_bytes {
            return Err(RerankError::too_large(format!(
                "query is {} bytes, over the limit of {} (max_query_bytes)",
                query.len(),
                self.max_query_bytes
            )));
        }
        Ok(())
    }

    /// A request or stream chunk of `documents`, after `already` documents of the same call.
    pub fn check_documents(&self, already: usize, documents: &[String]) -> Result<(), RerankError> {
        if documents.len() > self.max_documents {
            return Err(RerankError::too_large(format!(
                "{} documents, over the limit of {} per request or stream chunk (max_documents)",
                documents.len(),
                self.max_documents
            )));
        }
        if already + documents.len() > self.max_stream_documents {
            return Err(RerankError::too_large(format!(
                "{} documents in this stream, over the limit of {} (max_stream_documents)",
                already + documents.len(),
                self.max_stream_documents
            )));
        }
        if let Some((i, doc)) = documents
            .iter()
            .enumerate()
            .find(|(_, d)| d.len() > self.max_document_bytes)
        {
            return Err(RerankError::too_large(format!(
                "documents[{}] is {} bytes, over the limit of {} (max_document_bytes)",
                already + i,
                doc.len(),
                self.max_document_bytes
            )));
        }
        Ok(())
    }

    /// Windows per document for a call that asks for `requested` (0 = the server's limit); more than the
    /// limit is refused.
    pub fn chunks_per_doc(&self, requested: usize) -> Result<usize, RerankError> {
        match requested {
            0 => Ok(self.max_chunks_per_doc),
            n if n <= self.max_chunks_per_doc => Ok(n),
            n => Err(RerankError::too_large(format!(
                "max_chunks_per_doc {n} is over the server's limit of {}",
                self.max_chunks_per_doc
            ))),
        }
    }
}

impl From<&Config> for Limits {
    fn from(config: &Config) -> Self {
        Self {
            max_documents: config.max_documents,
            max_stream_documents: config.max_stream_documents,
            max_document_bytes: config.max_document_bytes,
            max_query_bytes: config.max_query_bytes,
            max_stream_pending_pairs: config.max_stream_pending_pairs,
            stream_idle_timeout: config.stream_idle_timeout,
            request_read_timeout: config.request_read_timeout,
            max_chunks_per_doc: config.max_chunks_per_doc,
            chunk_overlap_tokens: config.chunk_overlap_tokens,
            max_concurrent_calls: config.max_concurrent_calls,
        }
    }
}
