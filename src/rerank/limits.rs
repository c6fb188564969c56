//! Per-request limits (what one call may send) and the global cap on calls in progress.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::clients::{ClientId, ClientShares};
use crate::error::{Refusal, RerankError};
use crate::metrics::Metrics;

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

/// The global cap on rerank calls in progress (unary calls and streams, every transport), and each client's
/// share of it: past either a call is refused at once. A call takes its slot once its request has arrived.
#[derive(Clone)]
pub struct CallSlots {
    permits: Arc<Semaphore>,
    max_calls: usize,
    clients: Arc<ClientShares>,
    metrics: Arc<Metrics>,
}

/// A call's slot among max_concurrent_calls (and its client's share); it frees when the last clone is dropped.
#[derive(Clone)]
pub struct CallSlot(#[allow(dead_code)] Arc<Held>);

struct Held {
    _permit: OwnedSemaphorePermit,
    client: Option<(Arc<ClientShares>, ClientId)>,
    metrics: Arc<Metrics>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((shares, client)) = &self.client {
            shares.give_back(client, 1);
        }
        self.metrics.calls_in_progress.dec();
    }
}

impl CallSlots {
    pub fn new(max_calls: usize, client_share: f64, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            clients: Arc::new(ClientShares::new(max_calls, client_share)),
            metrics,
        }
    }

    /// A slot for a call of `client` (None: a caller the transport could not name, held to the global cap only).
    pub fn try_acquire(&self, client: Option<&ClientId>) -> Result<CallSlot, RerankError> {
        if let Some(client) = client {
            if let Err(held) = self.clients.take(client, 1) {
                self.metrics.record_refusal(Refusal::ClientShare);
                return Err(RerankError::refused(
                    Refusal::ClientShare,
                    format!(
                        "this client ({}) has {held} calls in progress, its share of max_concurrent_calls {} \
                         (max_client_share); retry later",
                        client.as_str(),
                        self.max_calls
                    ),
                ));
            }
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                self.metrics.calls_in_progress.inc();
                Ok(CallSlot(Arc::new(Held {
                    _permit: permit,
                    client: client.map(|client| (Arc::clone(&self.clients), client.clone())),
                    metrics: Arc::clone(&self.metrics),
                })))
            }
            Err(_) => {
                if let Some(client) = client {
                    self.clients.give_back(client, 1);
                }
                self.metrics.record_refusal(Refusal::Calls);
                Err(RerankError::refused(
                    Refusal::Calls,
                    format!(
                        "the server has {} calls in progress (max_concurrent_calls); retry later",
                        self.max_calls
                    ),
                ))
            }
        }
    }

    pub fn max_calls(&self) -> usize {
        self.max_calls
    }

    /// Calls one client may have in progress.
    pub fn per_client(&self) -> usize {
        self.clients.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_at_its_share_is_refused_while_another_takes_a_slot() {
        let slots = CallSlots::new(4, 0.5, Arc::new(Metrics::new()));
        let (a, b) = (ClientId::new("10.0.0.1"), ClientId::new("10.0.0.2"));
        let held: Vec<CallSlot> = (0..2)
            .map(|_| slots.try_acquire(Some(&a)).expect("within a's share"))
            .collect();
        let refused = slots.try_acquire(Some(&a)).err().expect("past a's share");
        assert!(
            matches!(
                &refused,
                RerankError::ResourceExhausted {
                    reason: Refusal::ClientShare,
                    ..
                }
            ),
            "{refused}"
        );
        let b_slots: Vec<CallSlot> = (0..2)
            .map(|_| slots.try_acquire(Some(&b)).expect("b is served"))
            .collect();
        assert!(matches!(
            slots.try_acquire(None),
            Err(RerankError::ResourceExhausted {
                reason: Refusal::Calls,
                ..
            })
        ));
        drop(held);
        slots.try_acquire(Some(&a)).expect("a's slots came back");
        drop(b_slots);
    }
}
