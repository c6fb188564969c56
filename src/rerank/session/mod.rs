//! One rerank session (a unary call or a stream): validates and tokenizes pushed documents, holds their
//! admission, queues their pairs, turns batch outcomes into document scores (best window of a chunked
//! document) and ranks them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::admission::Admission;
use super::documents::Documents;
use super::windows::Windows;

mod scoring;
use super::{nanos, RankedDocument, RerankOptions, RerankOutcome, Reranker, Usage};
use crate::batch::{engine_gone, BatchOutcome, Pair, RequestHandle};
use crate::error::RerankError;
use crate::tokenization::{PairTokens, QueryTokens, Truncation};

/// Scores of documents as they complete (global indices, no particular order).
pub type ScoredChunk = Vec<RankedDocument>;

/// One query and the documents pushed so far; scores arrive as batches finish. Dropping an unfinished
/// session cancels its pairs that have not reached the model and returns everything it held to admission.
pub struct RerankSession {
    reranker: Reranker,
    options: RerankOptions,
    query: Arc<QueryTokens>,
    request: Arc<RequestHandle>,
    outcomes: mpsc::UnboundedReceiver<BatchOutcome>,
    received_at: Instant,
    /// Score (or raw score) by document index; NaN until computed.
    scores: Vec<f32>,
    /// With `Truncation::ChunkMax`: the pair → document mapping.
    windows: Option<Windows>,
    /// Scores received while `push` waited for room, not yet taken by `next_scores`.
    ready: VecDeque<ScoredChunk>,
    /// Texts kept for return_documents.
    documents: Documents,
    /// Documents pushed, and pairs pushed and scored (a chunked document has a pair per window).
    pushed: usize,
    pairs_pushed: usize,
    pairs_scored: usize,
    usage: Usage,
    /// (pairs, tokens) this session holds in the global admission counts.
    admitted: (usize, usize),
    done: bool,
    /// Open while pairs of this session are queued or computing: the `scoring` span of the call's trace (the
    /// engine's batch spans link to the call).
    scoring: Option<tracing::Span>,
}

impl RerankSession {
    pub(super) fn open(
        reranker: Reranker,
        query: &str,
        options: RerankOptions,
    ) -> Result<Self, RerankError> {
        let received_at = Instant::now();
        let inner = &reranker.inner;
        inner.limits.check_query(query)?;
        let instruction = options.instruction.as_deref();
        if let Some(instruction) = instruction {
            inner.limits.check_instruction(instruction)?;
        }
        inner.tokenizer.check_options(
            options.truncation,
            options.max_document_tokens,
            instruction,
        )?;
        let exit_layer = inner.check_cutoff_layer(options.cutoff_layer)?;
        let query = Arc::new(inner.tokenizer.encode_query(query, instruction)?);
        let (request, outcomes) = inner.scheduler.new_request_exiting_after(exit_layer);
        let windows =
            matches!(options.truncation, Truncation::ChunkMax { .. }).then(Windows::default);
        Ok(Self {
            reranker,
            options,
            query,
            request,
            outcomes,
            received_at,
            scores: Vec::new(),
            windows,
            ready: VecDeque::new(),
            documents: Documents::default(),
            pushed: 0,
            pairs_pushed: 0,
            pairs_scored: 0,
            usage: Usage::default(),
            admitted: (0, 0),
            done: false,
            scoring: None,
        })
    }

    /// Pairs pushed whose scores have not arrived yet (what a stream's window counts).
    pub fn outstanding(&self) -> usize {
        self.pairs_pushed - self.pairs_scored
    }

    /// Whether `next_scores` has more to give: scores outstanding or received and not yet taken.
    pub fn awaits_scores(&self) -> bool {
        self.outstanding() > 0 || !self.ready.is_empty()
    }

    pub fn pushed(&self) -> usize {
        self.pushed
    }

    fn admission(&self) -> &Admission {
        &self.reranker.inner.admission
    }

    /// Validates, tokenizes and queues documents; their global indices continue from earlier pushes. Work the
    /// server has no room for is refused at once (RESOURCE_EXHAUSTED), except that a session whose own pairs
    /// are still being scored waits for them to make room: a stream slows down instead of failing mid-way.
    pub async fn push(&mut self, documents: Vec<String>) -> Result<(), RerankError> {
        if documents.is_empty() {
            return Ok(());
        }
        self.reranker
            .inner
            .limits
            .check_documents(self.pushed, &documents)?;
        let (first_index, count) = (self.pushed, documents.len());
        let bytes: usize = documents.iter().map(String::len).sum();
        self.admit_text(&documents, bytes).await?;
        let documents: Arc<[String]> = documents.into();
        let per_document = self.tokenize(&documents, first_index).await?;
        if self.options.return_documents {
            self.documents.hold_chunk(first_index, documents);
        } else {
            self.release_bytes(bytes);
        }
        let pairs = self.map_windows(first_index, per_document);
        let token_count = self.admit_pairs_and_tokens(&pairs, count).await?;
        self.enqueue(pairs, count, token_count)
    }

    /// Admits the documents' text and one pair each before the tokenizer spends work on them. Work that could
    /// not be admitted even at a low estimate of its tokens is refused before tokenizing, so a flood of
    /// retries costs the engine little.
    async fn admit_text(&mut self, documents: &[String], bytes: usize) -> Result<(), RerankError> {
        let at_least = self.reranker.inner.tokenizer.least_tokens(
            &self.query,
            documents,
            self.options.max_document_tokens,
        );
        let (call, deadline) = (self.request.id, self.options.deadline);
        let client = self.options.client.clone();
        let client = client.as_ref();
        self.admit_or_wait(|admission| {
            admission.precheck(call, at_least, deadline, Instant::now())
        })
        .await?;
        self.admit_or_wait(|admission| admission.admit_bytes(client, bytes))
            .await?;
        self.documents.held_bytes += bytes;
        let count = documents.len();
        self.admit_or_wait(|admission| admission.admit_pairs(client, count))
            .await?;
        self.admitted.0 += count;
        Ok(())
    }

    /// Tokenizes the documents (windows per document under chunk-max), counting the time in usage and metrics.
    async fn tokenize(
        &mut self,
        documents: &Arc<[String]>,
        first_index: usize,
    ) -> Result<Vec<Vec<PairTokens>>, RerankError> {
        let inner = Arc::clone(&self.reranker.inner);
        let tokenizing = tracing::debug_span!("tokenize", documents = documents.len());
        let started = Instant::now();
        let per_document = tracing::Instrument::instrument(
            inner.tokenizer.encode_documents(
                Arc::clone(&self.query),
                Arc::clone(documents),
                first_index,
                self.options.truncation,
                self.options.max_document_tokens,
            ),
            tokenizing,
        )
        .await?;
        // Tokenization time only: the admission steps around it may wait for this session's own batches.
        let tokenize_time = started.elapsed();
        self.usage.tokenize_ns += nanos(tokenize_time);
        inner
            .metrics
            .tokenize_duration
            .observe(tokenize_time.as_secs_f64());
        Ok(per_document)
    }

    /// Admits the pairs beyond one per document (extra windows) and the tokens, now that they are known;
    /// returns the token count.
    async fn admit_pairs_and_tokens(
        &mut self,
        pairs: &[PairTokens],
        documents: usize,
    ) -> Result<usize, RerankError> {
        let (call, deadline) = (self.request.id, self.options.deadline);
        let client = self.options.client.clone();
        let client = client.as_ref();
        let extra = pairs.len() - documents;
        if extra > 0 {
            self.admit_or_wait(|admission| admission.admit_pairs(client, extra))
                .await?;
            self.admitted.0 += extra;
        }
        let token_count: usize = pairs.iter().map(PairTokens::len).sum();
        self.admit_or_wait(|admission| {
            admission.admit_tokens(call, client, token_count, deadline, Instant::now())
        })
        .await?;
        self.admitted.1 += token_count;
        Ok(token_count)
    }

    /// Hands admitted pairs to the scheduler, numbered after the pairs pushed before.
    fn enqueue(
        &mut self,
        pairs: Vec<PairTokens>,
        documents: usize,
        token_count: usize,
    ) -> Result<(), RerankError> {
        let enqueued_at = Instant::now();
        let first_pair = self.pairs_pushed;
        let pairs: Vec<Pair> = pairs
            .into_iter()
            .enumerate()
            .map(|(i, tokens)| Pair {
                request: Arc::clone(&self.request),
                index: (first_pair + i) as u32,
                tokens,
                enqueued_at,
            })
            .collect();
        tracing::debug!(
            documents,
            pairs = pairs.len(),
            tokens = token_count,
            "queued"
        );
        if self.scoring.is_none() {
            self.scoring = Some(tracing::debug_span!("scoring"));
        }
        self.pushed += documents;
        self.pairs_pushed += pairs.len();
        self.scores.resize(self.pushed, f32::NAN);
        self.reranker.inner.scheduler.submit(pairs)
    }

    /// Flattens the documents' pairs, recording which document and window each pair is when documents are
    /// chunked.
    fn map_windows(
        &mut self,
        first_index: usize,
        per_document: Vec<Vec<PairTokens>>,
    ) -> Vec<PairTokens> {
        if let Some(windows) = &mut self.windows {
            windows.add(first_index, per_document.iter().map(Vec::len));
        }
        per_document.into_iter().flatten().collect()
    }

    /// Runs an admission step; while it is refused for room and this session has pairs being scored, waits for
    /// their scores (kept for `next_scores`) and tries again.
    async fn admit_or_wait(
        &mut self,
        admit: impl Fn(&Admission) -> Result<(), RerankError>,
    ) -> Result<(), RerankError> {
        loop {
            match admit(self.admission()) {
                Err(RerankError::ResourceExhausted { .. }) if self.outstanding() > 0 => {
                    let chunk = self.receive().await?;
                    self.ready.push_back(chunk);
                }
                Err(refused @ RerankError::ResourceExhausted { reason, .. }) => {
                    self.reranker.inner.metrics.record_refusal(reason);
                    return Err(refused);
                }
                other => return other,
            }
        }
    }

    /// Waits for the next scores of this request's documents. Ok(None) when nothing is outstanding.
    pub async fn next_scores(&mut self) -> Result<Option<ScoredChunk>, RerankError> {
        if let Some(chunk) = self.ready.pop_front() {
            return Ok(Some(chunk));
        }
        if self.outstanding() == 0 {
            return Ok(None);
        }
        self.receive().await.map(Some)
    }

    /// Receives one batch outcome of this request and records its scores. A stopped engine ends the wait
    /// with UNAVAILABLE, also for pairs that were inside the engine when it stopped.
    async fn receive(&mut self) -> Result<ScoredChunk, RerankError> {
        let scheduler = &self.reranker.inner.scheduler;
        let outcome = tokio::select! {
            biased;
            outcome = self.outcomes.recv() => outcome,
            _ = scheduler.engine_stopped() => None,
        };
        match outcome {
            Some(BatchOutcome::Scored(scored)) => Ok(self.record(scored)),
            Some(BatchOutcome::Failed(error)) => Err(error),
            None if scheduler.has_engine_stopped() => Err(engine_gone()),
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
        usage.pairs = u32::try_from(self.pairs_pushed).unwrap_or(u32::MAX);
        usage.documents = u32::try_from(self.pushed).unwrap_or(u32::MAX);
        usage.total_ns = nanos(self.received_at.elapsed());
        Ok(RerankOutcome { results, usage })
    }

    /// Returns admitted work to the global counts as it is scored (or dropped).
    fn release(&mut self, pairs: usize, tokens: usize) {
        let (pairs, tokens) = (pairs.min(self.admitted.0), tokens.min(self.admitted.1));
        self.reranker.inner.admission.release(
            self.request.id,
            self.options.client.as_ref(),
            pairs,
            tokens,
        );
        self.admitted = (self.admitted.0 - pairs, self.admitted.1 - tokens);
    }

    fn release_bytes(&mut self, bytes: usize) {
        let bytes = bytes.min(self.documents.held_bytes);
        self.reranker
            .inner
            .admission
            .release_bytes(self.options.client.as_ref(), bytes);
        self.documents.held_bytes -= bytes;
    }
}

impl Drop for RerankSession {
    fn drop(&mut self) {
        if !self.done && self.outstanding() > 0 {
            self.reranker.inner.scheduler.cancel(&self.request);
        }
        let (pairs, tokens) = self.admitted;
        self.release(pairs, tokens);
        self.release_bytes(self.documents.held_bytes);
        self.reranker.inner.admission.end_call(self.request.id);
    }
}
