//! The one rerank path shared by every endpoint: validate, tokenize, queue pairs, collect scores, rank.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::admission::Admission;
use crate::error::RerankError;
use crate::model::scoring::Scoring;
use crate::scheduler::request::{BatchOutcome, Pair, RequestHandle};
use crate::scheduler::{BatchPolicy, SchedulerHandle, StatsSnapshot};
use crate::tokenization::{PairTokenizer, PairTokens, QueryTokens, Truncation};

/// Per-request limits; violations are InvalidArgument errors that name the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_documents: usize,
    pub max_stream_documents: usize,
    pub max_document_bytes: usize,
    pub max_query_bytes: usize,
    /// Pairs of one stream that may wait for scores before the server stops reading the stream.
    pub max_stream_pending_pairs: usize,
}

impl Limits {
    /// The query must hold text and fit max_query_bytes.
    pub fn check_query(&self, query: &str) -> Result<(), RerankError> {
        if query.trim().is_empty() {
            return Err(RerankError::invalid("query must not be empty"));
        }
        if query.len() > self.max_query_bytes {
            return Err(RerankError::invalid(format!(
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
            return Err(RerankError::invalid(format!(
                "{} documents, over the limit of {} per request or stream chunk (max_documents)",
                documents.len(),
                self.max_documents
            )));
        }
        if already + documents.len() > self.max_stream_documents {
            return Err(RerankError::invalid(format!(
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
            return Err(RerankError::invalid(format!(
                "documents[{}] is {} bytes, over the limit of {} (max_document_bytes)",
                already + i,
                doc.len(),
                self.max_document_bytes
            )));
        }
        Ok(())
    }
}

/// Options of one rerank call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RerankOptions {
    /// 0 = all documents.
    pub top_n: usize,
    pub return_documents: bool,
    pub raw_scores: bool,
    pub truncation: Truncation,
    /// The caller's deadline: past it the call fails with DeadlineExceeded and its pending pairs are dropped.
    pub deadline: Option<Instant>,
}

/// A scored document, by its global index.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedDocument {
    pub index: u32,
    pub score: f32,
    pub document: Option<String>,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub pairs: u32,
    pub tokens: u64,
    /// From the first pair entering the queue until its first batch started.
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
}

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
}

impl Reranker {
    pub fn new(
        tokenizer: Arc<PairTokenizer>,
        scheduler: SchedulerHandle,
        admission: Admission,
        limits: Limits,
        policy: BatchPolicy,
        description: ModelDescription,
    ) -> Self {
        let inner = Inner {
            tokenizer,
            scheduler,
            admission,
            limits,
            policy,
            description,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Whether `pairs` more pairs would be admitted now.
    pub fn has_room_for(&self, pairs: usize) -> bool {
        self.inner.admission.has_room_for(pairs)
    }

    /// (pairs, tokens) admitted and not yet scored, across all requests.
    pub fn pending(&self) -> (usize, usize) {
        self.inner.admission.pending()
    }

    pub fn description(&self) -> &ModelDescription {
        &self.inner.description
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn policy(&self) -> &BatchPolicy {
        &self.inner.policy
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            tokenizer_busy_seconds: self.inner.tokenizer.busy_seconds(),
            ..self.inner.scheduler.stats()
        }
    }

    /// Resolves once the engine has stopped: every later request fails, so health must say so.
    pub async fn engine_stopped(&self) {
        self.inner.scheduler.engine_stopped().await
    }

    /// Scores all documents against the query and ranks them.
    pub async fn rerank(
        &self,
        query: &str,
        documents: Vec<String>,
        options: RerankOptions,
    ) -> Result<RerankOutcome, RerankError> {
        if documents.is_empty() {
            return Err(RerankError::invalid("documents must not be empty"));
        }
        let deadline = options.deadline;
        let call = async {
            let mut session = self.start(query, options)?;
            session.push(documents).await?;
            session.finish().await
        };
        // Past the deadline the call future is dropped, and with it the session and its queued pairs.
        within_deadline(deadline, call).await
    }

    /// Opens a session: validates and tokenizes the query once. Documents follow with `push`.
    pub fn start(&self, query: &str, options: RerankOptions) -> Result<RerankSession, RerankError> {
        let received_at = Instant::now();
        self.inner.limits.check_query(query)?;
        let query = Arc::new(self.inner.tokenizer.encode_query(query)?);
        let (request, outcomes) = self.inner.scheduler.new_request();
        Ok(RerankSession {
            reranker: self.clone(),
            options,
            query,
            request,
            outcomes,
            received_at,
            scores: Vec::new(),
            documents: Vec::new(),
            pushed: 0,
            scored: 0,
            usage: Usage::default(),
            first_enqueued: None,
            first_started: None,
            admitted: (0, 0),
            done: false,
        })
    }
}

/// Scores of documents as their batches finish (global indices, no particular order).
pub type ScoredChunk = Vec<RankedDocument>;

/// One query and the documents pushed so far; scores arrive as batches finish. Dropping an unfinished
/// session cancels its pairs that have not reached the model.
pub struct RerankSession {
    reranker: Reranker,
    options: RerankOptions,
    query: Arc<QueryTokens>,
    request: Arc<RequestHandle>,
    outcomes: mpsc::UnboundedReceiver<BatchOutcome>,
    received_at: Instant,
    /// Score (or raw score) by global index; NaN until computed.
    scores: Vec<f32>,
    /// Chunks of documents kept for return_documents, with the global index of their first document.
    documents: Vec<(usize, Arc<[String]>)>,
    pushed: usize,
    scored: usize,
    usage: Usage,
    first_enqueued: Option<Instant>,
    first_started: Option<Instant>,
    /// (pairs, tokens) this session holds in the global admission counts.
    admitted: (usize, usize),
    done: bool,
}

impl RerankSession {
    /// Documents pushed whose scores have not arrived yet.
    pub fn outstanding(&self) -> usize {
        self.pushed - self.scored
    }

    pub fn pushed(&self) -> usize {
        self.pushed
    }

    /// Validates, tokenizes and queues documents; their global indices continue from earlier pushes.
    pub async fn push(&mut self, documents: Vec<String>) -> Result<(), RerankError> {
        if documents.is_empty() {
            return Ok(());
        }
        self.validate(&documents)?;
        let first_index = self.pushed;
        let documents: Arc<[String]> = documents.into();
        let started = Instant::now();
        let inner = Arc::clone(&self.reranker.inner);
        // Pairs are admitted before the tokenizer spends work on them, tokens once they are known.
        inner.admission.admit_pairs(documents.len())?;
        self.admitted.0 += documents.len();
        let tokens = inner
            .tokenizer
            .encode_documents(
                Arc::clone(&self.query),
                Arc::clone(&documents),
                first_index,
                self.options.truncation,
            )
            .await?;
        let token_count: usize = tokens.iter().map(PairTokens::len).sum();
        inner.admission.admit_tokens(token_count)?;
        self.admitted.1 += token_count;
        self.usage.tokenize_ns += nanos(started.elapsed());
        let enqueued_at = Instant::now();
        self.first_enqueued.get_or_insert(enqueued_at);
        let pairs: Vec<Pair> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, tokens)| Pair {
                request: Arc::clone(&self.request),
                index: (first_index + i) as u32,
                tokens,
                enqueued_at,
            })
            .collect();
        self.pushed += pairs.len();
        self.scores.resize(self.pushed, f32::NAN);
        inner.scheduler.submit(pairs)?;
        if self.options.return_documents {
            self.documents.push((first_index, documents));
        }
        Ok(())
    }

    fn validate(&self, documents: &[String]) -> Result<(), RerankError> {
        self.reranker
            .inner
            .limits
            .check_documents(self.pushed, documents)
    }

    /// Waits for the next batch of this request's scores. Ok(None) when nothing is outstanding.
    pub async fn next_scores(&mut self) -> Result<Option<ScoredChunk>, RerankError> {
        if self.outstanding() == 0 {
            return Ok(None);
        }
        match self.outcomes.recv().await {
            Some(BatchOutcome::Scored(scored)) => {
                let scoring = self.reranker.inner.description.scoring;
                let raw = self.options.raw_scores;
                self.release(scored.pairs.len(), scored.tokens as usize);
                self.usage.tokens += scored.tokens;
                self.usage.inference_ns += nanos(scored.inference);
                let first = *self.first_started.get_or_insert(scored.started);
                self.first_started = Some(first.min(scored.started));
                let mut chunk = Vec::with_capacity(scored.pairs.len());
                for (index, logits) in scored.pairs {
                    let score = if raw {
                        scoring.raw(&logits)
                    } else {
                        scoring.score(&logits)
                    };
                    if let Some(slot) = self.scores.get_mut(index as usize) {
                        *slot = score;
                        self.scored += 1;
                        chunk.push(RankedDocument {
                            index,
                            score,
                            document: None,
                        });
                    }
                }
                Ok(Some(chunk))
            }
            Some(BatchOutcome::Failed(error)) => Err(error),
            None => Err(RerankError::internal("the scheduler dropped this request")),
        }
    }

    /// Waits for every outstanding score and ranks all documents pushed.
    pub async fn finish(mut self) -> Result<RerankOutcome, RerankError> {
        if self.pushed == 0 {
            return Err(RerankError::invalid(
                "documents must not be empty: no documents were sent",
            ));
        }
        while self.next_scores().await?.is_some() {}
        self.done = true;
        let results = self.rank();
        let mut usage = self.usage;
        usage.pairs = self.pushed as u32;
        usage.queue_ns = match (self.first_enqueued, self.first_started) {
            (Some(enqueued), Some(started)) => nanos(started.saturating_duration_since(enqueued)),
            _ => 0,
        };
        usage.total_ns = nanos(self.received_at.elapsed());
        Ok(RerankOutcome { results, usage })
    }

    /// All scores sorted highest first (ties by index), cut to top_n, documents attached if asked.
    fn rank(&self) -> Vec<RankedDocument> {
        let mut order: Vec<u32> = (0..self.scores.len() as u32).collect();
        let by_score = |a: &u32, b: &u32| {
            self.scores[*b as usize]
                .total_cmp(&self.scores[*a as usize])
                .then(a.cmp(b))
        };
        let top_n = match self.options.top_n {
            0 => order.len(),
            n => n.min(order.len()),
        };
        if top_n < order.len() {
            order.select_nth_unstable_by(top_n, by_score);
            order.truncate(top_n);
        }
        order.sort_unstable_by(by_score);
        order
            .into_iter()
            .map(|index| RankedDocument {
                index,
                score: self.scores[index as usize],
                document: self.document(index as usize).map(str::to_owned),
            })
            .collect()
    }

    fn document(&self, index: usize) -> Option<&str> {
        let chunk = self
            .documents
            .partition_point(|(start, _)| *start <= index)
            .checked_sub(1)?;
        let (start, docs) = &self.documents[chunk];
        docs.get(index - start).map(String::as_str)
    }
}

impl RerankSession {
    /// Returns admitted work to the global counts as it is scored (or dropped).
    fn release(&mut self, pairs: usize, tokens: usize) {
        let (pairs, tokens) = (pairs.min(self.admitted.0), tokens.min(self.admitted.1));
        self.reranker.inner.admission.release(pairs, tokens);
        self.admitted = (self.admitted.0 - pairs, self.admitted.1 - tokens);
    }
}

impl Drop for RerankSession {
    fn drop(&mut self) {
        if !self.done && self.outstanding() > 0 {
            self.reranker.inner.scheduler.cancel(&self.request);
        }
        let (pairs, tokens) = self.admitted;
        self.release(pairs, tokens);
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
