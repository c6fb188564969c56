//! The contract between the rerank core, the scheduler and the engine: pairs, batches and their outcomes.
//! The scheduler and the engine each import this and nothing of the other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::error::RerankError;
use crate::model::PackedBatch;
use crate::tokenization::PairTokens;

pub type RequestId = u64;

/// The engine's report to one request for one batch its pairs ran in.
#[derive(Debug)]
pub enum BatchOutcome {
    Scored(ScoredPairs),
    Failed(RerankError),
}

/// Logits of a request's pairs from one batch.
#[derive(Debug)]
pub struct ScoredPairs {
    /// (global document index, logits) for each pair of this request in the batch.
    pub pairs: Vec<(u32, Vec<f32>)>,
    /// Real tokens of these pairs.
    pub tokens: u64,
    /// The batch they ran in (its `id`, as the engine's log names it).
    pub batch: u64,
    /// When the batch started on the model, and how long it ran.
    pub started: Instant,
    pub inference: Duration,
    /// How long the longest-waiting of these pairs waited in the queue before the batch started.
    pub queued: Duration,
}

/// A live request as the scheduler and engine see it.
#[derive(Debug)]
pub struct RequestHandle {
    pub id: RequestId,
    /// The call's span, so the engine's batch spans can link to the calls they serve.
    pub span: tracing::Span,
    /// Layerwise rerankers: the layer the request's pairs are scored after (0: the model's default).
    pub exit_layer: u32,
    cancelled: AtomicBool,
    sink: mpsc::UnboundedSender<BatchOutcome>,
}

impl RequestHandle {
    pub fn new(id: RequestId) -> (Arc<Self>, mpsc::UnboundedReceiver<BatchOutcome>) {
        Self::exiting_after(id, 0)
    }

    /// A request whose pairs a layerwise reranker scores after `exit_layer` (0: the model's default).
    pub fn exiting_after(
        id: RequestId,
        exit_layer: u32,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<BatchOutcome>) {
        let (sink, receiver) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                id,
                span: tracing::Span::current(),
                exit_layer,
                cancelled: AtomicBool::new(false),
                sink,
            }),
            receiver,
        )
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.sink.is_closed()
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Sends an outcome; a request that went away simply does not receive it.
    pub fn deliver(&self, outcome: BatchOutcome) {
        let _ = self.sink.send(outcome);
    }
}

/// One (query, document) pair waiting to be computed.
#[derive(Debug)]
pub struct Pair {
    pub request: Arc<RequestHandle>,
    /// The pair's serial number in its request: the document's global index, or with chunk-max windows the
    /// serial of the window (the session maps it back to its document).
    pub index: u32,
    pub tokens: PairTokens,
    pub enqueued_at: Instant,
}

impl Pair {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A cut batch: its pairs (in row order), their packed model input and what computing it costs.
#[derive(Debug)]
pub struct Batch {
    /// Serial number since start, for logs and traces.
    pub id: u64,
    pub pairs: Vec<Pair>,
    pub inputs: PackedBatch,
    /// In the scheduler's budget units (see `scheduler::BatchShape`): what the engine's speed is measured in.
    pub cost: usize,
    /// Tokens the device computes, padding included.
    pub device_tokens: usize,
}

/// What a call gets once the engine has stopped: UNAVAILABLE, so clients retry at another replica.
pub fn engine_gone() -> RerankError {
    RerankError::Unavailable("the inference engine has stopped; retry at another replica".into())
}

/// Packs pairs into the model's input, with each pair's exit layer where a request chose one.
pub fn pack(pairs: &[Pair]) -> PackedBatch {
    let mut inputs = PackedBatch::from_sequences(
        pairs
            .iter()
            .map(|p| (&p.tokens.input_ids[..], &p.tokens.type_ids[..])),
    );
    if pairs.iter().any(|p| p.request.exit_layer != 0) {
        inputs.exit_layers = pairs.iter().map(|p| p.request.exit_layer).collect();
    }
    inputs
}
