//! A session's scores as batches return them: usage and metrics, the document a pair belongs to (best window
//! of a chunked document), documents kept for return_documents, and the final ranking.

use std::sync::Arc;

use super::{RerankSession, ScoredChunk};
use crate::batch::ScoredPairs;
use crate::rerank::documents::ranked;
use crate::rerank::{nanos, RankedDocument};

impl RerankSession {
    pub(super) fn record(&mut self, scored: ScoredPairs) -> ScoredChunk {
        let inner = Arc::clone(&self.reranker.inner);
        let (scoring, raw) = (inner.description.scoring, self.options.raw_scores);
        self.release(scored.pairs.len(), scored.tokens as usize);
        self.usage.tokens += scored.tokens;
        self.usage.inference_ns += nanos(scored.inference);
        self.usage.queue_ns += nanos(scored.queued);
        inner.metrics.pairs.inc_by(scored.pairs.len() as u64);
        inner.metrics.tokens.inc_by(scored.tokens);
        inner
            .metrics
            .queue_duration
            .observe(scored.queued.as_secs_f64());
        tracing::debug!(
            batch = scored.batch,
            pairs = scored.pairs.len(),
            queue_ms = scored.queued.as_secs_f64() * 1e3,
            inference_ms = scored.inference.as_secs_f64() * 1e3,
            "scored in batch"
        );
        let mut chunk = Vec::with_capacity(scored.pairs.len());
        for (pair, logits) in scored.pairs {
            let score = if raw {
                scoring.raw(&logits)
            } else {
                scoring.score(&logits)
            };
            self.pairs_scored += 1;
            if let Some(document) = self.document_scored(pair, score) {
                chunk.push(document);
            }
        }
        if self.outstanding() == 0 {
            // Nothing queued or computing: the span ends here (a stream opens a new one with its next push).
            self.scoring = None;
        }
        inner.metrics.documents.inc_by(chunk.len() as u64);
        if self.options.return_documents {
            let held_before = self.documents.held_bytes;
            let mut freed = 0;
            for doc in &chunk {
                freed += self
                    .documents
                    .scored(doc.index, doc.score, self.options.top_n);
            }
            let copied = self.documents.held_bytes - held_before;
            inner
                .admission
                .hold_bytes(self.options.client.as_ref(), copied);
            self.release_bytes(freed);
        }
        chunk
    }

    /// Records a pair's score; returns its document once every window of it is scored.
    fn document_scored(&mut self, pair: u32, score: f32) -> Option<RankedDocument> {
        let Some(windows) = &mut self.windows else {
            let slot = self.scores.get_mut(pair as usize)?;
            *slot = score;
            return Some(RankedDocument {
                index: pair,
                score,
                document: None,
                chunk: None,
            });
        };
        let (index, score, window) = windows.scored(pair, score, &mut self.scores)?;
        Some(RankedDocument {
            index,
            score,
            document: None,
            chunk: Some(window),
        })
    }

    /// All scores sorted highest first (ties by index), cut to top_n, documents attached if asked.
    pub(super) fn rank(&self) -> Vec<RankedDocument> {
        ranked(&self.scores, self.options.top_n)
            .into_iter()
            .map(|index| RankedDocument {
                index,
                score: self.scores[index as usize],
                document: self.documents.kept.get(&index).cloned(),
                chunk: self.windows.as_ref().and_then(|w| w.best(index)),
            })
            .collect()
    }
}
