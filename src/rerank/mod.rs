//! The rerank core every transport calls: `Reranker` opens sessions (unary calls and streams alike), applies
//! the call's deadline, and records each call's outcome; sessions own admission, back-pressure and ranking.

pub mod admission;
pub mod clients;
mod documents;
pub mod limits;
mod session;
mod stream;
mod windows;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::RerankError;
use crate::metrics::Metrics;
use crate::model::scoring::Scoring;
use crate::scheduler::{BatchPolicy, SchedulerHandle};
use crate::tokenization::{PairTokenizer, Truncation};
use admission::Admission;
use limits::Limits;

pub use session::{RerankSession, ScoredChunk};
pub use stream::{EventStream, StreamEvent, StreamRequest};

/// Options of one rerank call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RerankOptions {
    /// 0 = all documents.
    pub top_n: usize,
    pub return_documents: bool,
    pub raw_scores: bool,
    pub truncation: Truncation,
    /// Documents are first cut to this many tokens (Cohere's max_tokens_per_doc); not with chunk-max.
    pub max_document_tokens: Option<usize>,
    /// The caller's deadline: past it the call fails with DeadlineExceeded and its pending pairs are dropped.
    pub deadline: Option<Instant>,
    /// For instruction-following rerankers (Qwen3-Reranker): the task instruction instead of the model's default.
    pub instruction: Option<String>,
    /// For layerwise rerankers: the layer whose score head gives the score (None: the model's default).
    pub cutoff_layer: Option<usize>,
    /// Who calls: admission holds each client to its share (max_client_share). None: the global limits only.
    pub client: Option<clients::ClientId>,
}

/// A scored document, by its global index.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedDocument {
    pub index: u32,
    pub score: f32,
    pub document: Option<String>,
    /// With `Truncation::ChunkMax`: the window of the document whose score this is.
    pub chunk: Option<u32>,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Pairs scored: one per document, or one per window of a chunked document.
    pub pairs: u32,
    pub documents: u32,
    pub tokens: u64,
    /// Summed over the request's batches: how long its longest-waiting pair in each waited in the queue.
    pub queue_ns: u64,
    pub tokenize_ns: u64,
    /// Model time of the batches the request's pairs ran in.
    pub inference_ns: u64,
    pub total_ns: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RerankOutcome {
    pub results: Vec<RankedDocument>,
    pub usage: Usage,
}

/// What the server reports about itself.
#[derive(Debug, Clone)]
pub struct ModelDescription {
    pub model_id: String,
    pub architecture: String,
    pub max_length: usize,
    pub device: String,
    pub dtype: String,
    pub scoring: Scoring,
    pub max_message_bytes: usize,
    /// Decoder rerankers: the prompt pairs are put in.
    pub prompt: Option<crate::tokenization::PromptTemplate>,
    /// Layerwise rerankers: the layers a request may choose.
    pub cutoff_layers: Option<crate::model::CutoffLayers>,
}

impl ModelDescription {
    /// Whether a client's `model` field names this model: empty, the configured id, or (a bare name) the
    /// id's last path part, as in `bge-reranker-base` for `BAAI/bge-reranker-base` or a local directory.
    /// `other-org/bge-reranker-base` names another model.
    pub fn answers_to(&self, name: &str) -> bool {
        let id = self.model_id.trim_end_matches('/');
        let short = id.rsplit('/').next().unwrap_or(id);
        name.is_empty() || name == id || (!name.contains('/') && name == short)
    }
}

/// What admission holds across all calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub pairs: usize,
    pub tokens: usize,
    pub bytes: usize,
}

/// Why calls end when the server stops: the scores a stream has sent stand, the rest can go to another replica.
pub const SHUTTING_DOWN: &str =
    "the server is shutting down; scores already sent stand, send the rest to another replica";

/// Cheap-to-clone entry point of the rerank path.
#[derive(Clone)]
pub struct Reranker {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: Arc<PairTokenizer>,
    scheduler: SchedulerHandle,
    admission: Admission,
    limits: Limits,
    policy: BatchPolicy,
    description: ModelDescription,
    metrics: Arc<Metrics>,
    /// Set when the server stops: calls still in flight end with UNAVAILABLE.
    stopped: tokio::sync::watch::Sender<bool>,
}

impl Inner {
    /// The exit layer a request's pairs carry: 0 for the model's default; a layer only a layerwise reranker with
    /// a head there takes.
    fn check_cutoff_layer(&self, layer: Option<usize>) -> Result<u32, RerankError> {
        let Some(layer) = layer else {
            return Ok(0);
        };
        let Some(layers) = &self.description.cutoff_layers else {
            return Err(RerankError::invalid(
                "cutoff_layer is only for layerwise rerankers; this model scores after its last layer",
            ));
        };
        layers.check(layer).map_err(RerankError::invalid)?;
        Ok(u32::try_from(layer).unwrap_or(u32::MAX))
    }
}

impl Reranker {
    pub fn new(
        tokenizer: Arc<PairTokenizer>,
        scheduler: SchedulerHandle,
        admission: Admission,
        limits: Limits,
        policy: BatchPolicy,
        description: ModelDescription,
        metrics: Arc<Metrics>,
    ) -> Self {
        let inner = Inner {
            tokenizer,
            scheduler,
            admission,
            limits,
            policy,
            description,
            metrics,
            stopped: tokio::sync::watch::Sender::new(false),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Work admitted and not yet scored, and request text held, across all calls.
    pub fn pending(&self) -> Pending {
        let (pairs, tokens) = self.inner.admission.pending();
        Pending {
            pairs,
            tokens,
            bytes: self.inner.admission.held_bytes(),
        }
    }

    /// The engine's measured speed in real tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.inner.admission.throughput().tokens_per_second()
    }

    pub fn description(&self) -> &ModelDescription {
        &self.inner.description
    }

    /// Whether this model accepts these options (decoder rerankers refuse chunk windows and per-document cuts;
    /// cross-encoders refuse instructions): Ok, or the refusal a call with them would get.
    pub fn supports(
        &self,
        truncation: Truncation,
        max_document_tokens: Option<usize>,
        instruction: Option<&str>,
    ) -> Result<(), RerankError> {
        self.inner
            .tokenizer
            .check_options(truncation, max_document_tokens, instruction)
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn admission_limits(&self) -> &admission::AdmissionLimits {
        self.inner.admission.limits()
    }

    pub fn policy(&self) -> &BatchPolicy {
        &self.inner.policy
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Brings the gauges that mirror admission's books up to date (before they are read or exported).
    pub fn refresh_gauges(&self) {
        let pending = self.pending();
        let metrics = &self.inner.metrics;
        metrics.pending_pairs.set(clamp(pending.pairs));
        metrics.pending_tokens.set(clamp(pending.tokens));
        metrics.held_bytes.set(clamp(pending.bytes));
        metrics
            .engine_tokens_per_second
            .set(self.tokens_per_second());
    }

    /// A request body as it arrives: its bytes count against max_inflight_bytes (and the client's share of it)
    /// from the moment they are received until the request is decoded, so bodies being read are bounded too.
    pub fn receiving(&self, client: Option<clients::ClientId>) -> Receiving {
        Receiving {
            reranker: self.clone(),
            client,
            held: 0,
        }
    }

    /// Ends every call in flight with UNAVAILABLE (the server is stopping); their queued pairs are dropped.
    pub fn stop_calls(&self) {
        self.inner.stopped.send_replace(true);
    }

    /// Runs a call within its deadline and the server's life: DeadlineExceeded once the deadline passes,
    /// Unavailable once the server stops. Either drops the call, and with it its queued pairs.
    pub(crate) async fn bounded<T>(
        &self,
        deadline: Option<Instant>,
        call: impl std::future::Future<Output = Result<T, RerankError>>,
    ) -> Result<T, RerankError> {
        let mut stopped = self.inner.stopped.subscribe();
        let stop = async move {
            if stopped.wait_for(|stopped| *stopped).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = within_deadline(deadline, call) => result,
            () = stop => Err(RerankError::Unavailable(SHUTTING_DOWN.into())),
        }
    }

    /// Resolves once the engine has stopped: every later request fails, so health must say so.
    pub async fn engine_stopped(&self) {
        self.inner.scheduler.engine_stopped().await
    }

    /// Scores all documents against the query and ranks them: one unary call on `endpoint`.
    pub async fn rerank(
        &self,
        endpoint: &'static str,
        query: &str,
        documents: Vec<String>,
        options: RerankOptions,
    ) -> Result<RerankOutcome, RerankError> {
        let started = Instant::now();
        let deadline = options.deadline;
        let call = async {
            if documents.is_empty() {
                return Err(RerankError::invalid("documents must not be empty"));
            }
            let mut session = self.start(query, options)?;
            session.push(documents).await?;
            session.finish().await
        };
        // Past the deadline the call future is dropped, and with it the session and its queued pairs.
        let result = self.bounded(deadline, call).await;
        self.record_call(endpoint, &result, started);
        result
    }

    /// Opens a session: validates and tokenizes the query once. Documents follow with `push`.
    pub fn start(&self, query: &str, options: RerankOptions) -> Result<RerankSession, RerankError> {
        RerankSession::open(self.clone(), query, options)
    }

    fn record_call<T>(&self, endpoint: &str, result: &Result<T, RerankError>, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        self.inner.metrics.record_call(endpoint, result, seconds);
        // Per-call lines are debug: at thousands of calls a second the metrics carry the counts. A fault
        // inside the server is always worth a line.
        match result {
            Ok(_) => tracing::debug!(endpoint, seconds, "rerank done"),
            Err(error @ RerankError::Internal(_)) => {
                tracing::warn!(endpoint, seconds, %error, "rerank failed")
            }
            Err(error) => {
                tracing::debug!(endpoint, seconds, outcome = error.outcome(), %error, "rerank failed")
            }
        }
    }
}

/// The bytes of one request body received so far, held in admission until it is dropped.
pub struct Receiving {
    reranker: Reranker,
    client: Option<clients::ClientId>,
    held: usize,
}

impl Receiving {
    /// Counts `bytes` more of the body, or refuses them (RESOURCE_EXHAUSTED) when the server or this client
    /// already holds its share of request bytes.
    pub fn add(&mut self, bytes: usize) -> Result<(), RerankError> {
        let inner = &self.reranker.inner;
        if let Err(refused) = inner.admission.admit_bytes(self.client.as_ref(), bytes) {
            if let RerankError::ResourceExhausted { reason, .. } = &refused {
                inner.metrics.record_refusal(*reason);
            }
            return Err(refused);
        }
        self.held += bytes;
        Ok(())
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.reranker
            .inner
            .admission
            .release_bytes(self.client.as_ref(), self.held);
    }
}

/// Runs `call` to completion, or fails with DeadlineExceeded (dropping it) once `deadline` passes.
pub async fn within_deadline<T>(
    deadline: Option<Instant>,
    call: impl std::future::Future<Output = Result<T, RerankError>>,
) -> Result<T, RerankError> {
    match deadline {
        None => call.await,
        Some(deadline) => tokio::time::timeout_at(deadline.into(), call)
            .await
            .unwrap_or_else(|_| {
                Err(RerankError::DeadlineExceeded(
                    "the call's deadline passed before its scores were ready".into(),
                ))
            }),
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
