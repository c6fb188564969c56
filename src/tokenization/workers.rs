//! Document tokenization on the worker pool: off the async runtime, in parallel, and stopped when the
//! caller stops waiting.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use rayon::prelude::*;

use super::{PairTokenizer, PairTokens, QueryTokens, Truncation};
use crate::error::RerankError;

impl PairTokenizer {
    /// Tokenizes documents in parallel on the worker pool, off the async runtime. Index i of the result holds
    /// the pairs of `documents[i]` (one, or one per window with `Truncation::ChunkMax`); `first_index` is the global index of `documents[0]`, for error messages. When the caller
    /// stops waiting (the call was cancelled, passed its deadline or lost its client, so this future was
    /// dropped), the job stops at the next document, and a job still queued never starts.
    pub async fn encode_documents(
        self: &Arc<Self>,
        query: Arc<QueryTokens>,
        documents: Arc<[String]>,
        first_index: usize,
        truncation: Truncation,
        max_document_tokens: Option<usize>,
    ) -> Result<Vec<Vec<PairTokens>>, RerankError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let this = Arc::clone(self);
        self.pool.spawn(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                this.pool.install(|| {
                    documents
                        .par_iter()
                        .enumerate()
                        .map(|(i, doc)| {
                            if sender.is_closed() {
                                return Err(RerankError::Unavailable(
                                    "the call ended before its documents were tokenized".into(),
                                ));
                            }
                            let started = std::time::Instant::now();
                            let pairs = match truncation {
                                Truncation::ChunkMax { max_chunks } => {
                                    this.encode_windows(&query, doc, max_chunks, first_index + i)
                                }
                                _ => this
                                    .encode_pair_within(
                                        &query,
                                        doc,
                                        truncation,
                                        max_document_tokens,
                                        first_index + i,
                                    )
                                    .map(|pair| vec![pair]),
                            };
                            this.metrics
                                .tokenizer_busy
                                .inc_by(started.elapsed().as_secs_f64());
                            this.documents_encoded
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            pairs
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            }))
            .unwrap_or_else(|_| {
                Err(RerankError::internal(
                    "the tokenizer failed on this request",
                ))
            });
            // The receiver is gone only if the request was cancelled; nothing to report then.
            let _ = sender.send(result);
        });
        receiver
            .await
            .map_err(|_| RerankError::internal("tokenizer worker stopped"))?
    }
}
