//! The one rerank path shared by every endpoint: validate, tokenize, queue pairs, collect scores, rank.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::admission::Admission;
use crate::error::RerankError;
use crate::model::scoring::Scoring;
use crate::scheduler::request::{BatchOutcome, Pair, RequestHandle, ScoredPairs};
use crate::scheduler::{engine_gone, BatchPolicy, SchedulerHandle, SchedulerStats, StatsSnapshot};
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
    /// A stream whose client neither reads nor sends for this long is ended.
    pub stream_idle_timeout: Duration,
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
}

/// What admission holds across all calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub pairs: usize,
    pub tokens: usize,
    pub bytes: usize,
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

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn policy(&self) -> &BatchPolicy {
        &self.inner.policy
    }

    /// The counters every stage writes to.
    pub fn stats_home(&self) -> Arc<SchedulerStats> {
        self.inner.scheduler.shared_stats()
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
            ready: VecDeque::new(),
            documents: Documents::default(),
            pushed: 0,
            scored: 0,
            usage: Usage::default(),
            admitted: (0, 0),
            done: false,
        })
    }
}

/// Scores of documents as their batches finish (global indices, no particular order).
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
    /// Score (or raw score) by global index; NaN until computed.
    scores: Vec<f32>,
    /// Scores received while `push` waited for room, not yet taken by `next_scores`.
    ready: VecDeque<ScoredChunk>,
    /// Texts kept for return_documents.
    documents: Documents,
    pushed: usize,
    scored: usize,
    usage: Usage,
    /// (pairs, tokens) this session holds in the global admission counts.
    admitted: (usize, usize),
    done: bool,
}

impl RerankSession {
    /// Documents pushed whose scores have not arrived yet.
    pub fn outstanding(&self) -> usize {
        self.pushed - self.scored
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
        self.validate(&documents)?;
        let first_index = self.pushed;
        let count = documents.len();
        let bytes: usize = documents.iter().map(String::len).sum();
        let started = Instant::now();
        let inner = Arc::clone(&self.reranker.inner);
        let at_least = inner.tokenizer.least_tokens(&self.query, &documents);
        let documents: Arc<[String]> = documents.into();
        // Text and pairs are admitted before the tokenizer spends work on them, tokens once they are known.
        // Work that could not be admitted even at a low estimate of its tokens is refused before tokenizing,
        // so a flood of retries costs the engine little.
        let (call, deadline) = (self.request.id, self.options.deadline);
        self.admit_or_wait(|admission| {
            admission.precheck(call, at_least, deadline, Instant::now())
        })
        .await?;
        self.admit_or_wait(|admission| admission.admit_bytes(bytes))
            .await?;
        self.documents.held_bytes += bytes;
        self.admit_or_wait(|admission| admission.admit_pairs(count))
            .await?;
        self.admitted.0 += count;
        let tokens = inner
            .tokenizer
            .encode_documents(
                Arc::clone(&self.query),
                Arc::clone(&documents),
                first_index,
                self.options.truncation,
            )
            .await?;
        if self.options.return_documents {
            self.documents.hold_chunk(first_index, documents);
        } else {
            self.release_bytes(bytes);
        }
        let token_count: usize = tokens.iter().map(PairTokens::len).sum();
        self.admit_or_wait(|admission| {
            admission.admit_tokens(call, token_count, deadline, Instant::now())
        })
        .await?;
        self.admitted.1 += token_count;
        self.usage.tokenize_ns += nanos(started.elapsed());
        let enqueued_at = Instant::now();
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
        inner.scheduler.submit(pairs)
    }

    /// Runs an admission step; while it is refused for room and this session has pairs being scored, waits for
    /// their scores (kept for `next_scores`) and tries again.
    async fn admit_or_wait(
        &mut self,
        admit: impl Fn(&Admission) -> Result<(), RerankError>,
    ) -> Result<(), RerankError> {
        loop {
            match admit(self.admission()) {
                Err(RerankError::ResourceExhausted(_)) if self.outstanding() > 0 => {
                    let chunk = self.receive().await?;
                    self.ready.push_back(chunk);
                }
                Err(refused @ RerankError::ResourceExhausted(_)) => {
                    self.reranker
                        .stats_home()
                        .refused
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(refused);
                }
                other => return other,
            }
        }
    }

    fn validate(&self, documents: &[String]) -> Result<(), RerankError> {
        self.reranker
            .inner
            .limits
            .check_documents(self.pushed, documents)
    }

    /// Waits for the next batch of this request's scores. Ok(None) when nothing is outstanding.
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

    fn record(&mut self, scored: ScoredPairs) -> ScoredChunk {
        let scoring = self.reranker.inner.description.scoring;
        let raw = self.options.raw_scores;
        self.release(scored.pairs.len(), scored.tokens as usize);
        self.usage.tokens += scored.tokens;
        self.usage.inference_ns += nanos(scored.inference);
        self.usage.queue_ns += nanos(scored.queued);
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
        if self.options.return_documents {
            let held_before = self.documents.held_bytes;
            let mut freed = 0;
            for doc in &chunk {
                freed += self
                    .documents
                    .scored(doc.index, doc.score, self.options.top_n);
            }
            let copied = self.documents.held_bytes - held_before;
            self.reranker.inner.admission.hold_bytes(copied);
            self.release_bytes(freed);
        }
        chunk
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
                document: self.documents.kept.get(&index).cloned(),
            })
            .collect()
    }
}

impl RerankSession {
    /// Returns admitted work to the global counts as it is scored (or dropped).
    fn release(&mut self, pairs: usize, tokens: usize) {
        let (pairs, tokens) = (pairs.min(self.admitted.0), tokens.min(self.admitted.1));
        self.reranker
            .inner
            .admission
            .release(self.request.id, pairs, tokens);
        self.admitted = (self.admitted.0 - pairs, self.admitted.1 - tokens);
    }

    fn release_bytes(&mut self, bytes: usize) {
        let bytes = bytes.min(self.documents.held_bytes);
        self.reranker.inner.admission.release_bytes(bytes);
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

/// Texts a return_documents session holds: the chunks with documents still waiting for scores, and copies of
/// the scored documents that can still be returned (with top_n, only the best top_n so far). So a stream's
/// memory follows its window and top_n, not its length.
#[derive(Default)]
struct Documents {
    /// Chunks by the global index of their first document, with how many of their documents are unscored.
    chunks: BTreeMap<usize, (Arc<[String]>, usize)>,
    /// Scored documents that may be returned, by index.
    kept: HashMap<u32, String>,
    /// With top_n: the kept documents, worst on top, to know which to drop.
    ranking: BinaryHeap<Reverse<Rank>>,
    /// Bytes of chunks and kept copies, charged to admission.
    held_bytes: usize,
}

impl Documents {
    fn hold_chunk(&mut self, first_index: usize, documents: Arc<[String]>) {
        let count = documents.len();
        self.chunks.insert(first_index, (documents, count));
    }

    /// Keeps the scored document's text if it can still be returned; returns the bytes no longer held.
    fn scored(&mut self, index: u32, score: f32, top_n: usize) -> usize {
        let Some((&first, (chunk, unscored))) =
            self.chunks.range_mut(..=index as usize).next_back()
        else {
            return 0;
        };
        let text = chunk
            .get(index as usize - first)
            .cloned()
            .unwrap_or_default();
        *unscored -= 1;
        let mut freed = 0;
        if *unscored == 0 {
            freed += chunk.iter().map(String::len).sum::<usize>();
            self.chunks.remove(&first);
        }
        self.held_bytes += text.len();
        self.kept.insert(index, text);
        if top_n > 0 {
            self.ranking.push(Reverse(Rank { score, index }));
            if self.ranking.len() > top_n {
                if let Some(Reverse(worst)) = self.ranking.pop() {
                    freed += self.kept.remove(&worst.index).map_or(0, |text| text.len());
                }
            }
        }
        freed
    }
}

/// A scored document's place in the ranking: higher scores first, then lower indices (as `rank` orders).
#[derive(Debug, Clone, Copy)]
struct Rank {
    score: f32,
    index: u32,
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Rank {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Rank {}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// 20,000 documents of 8 KB stream through in chunks of 1,000 with top_n 5: the texts held stay those of
    /// the open chunk and the best five, never the stream.
    #[test]
    fn a_return_documents_stream_holds_its_window_and_top_n_not_its_length() {
        let mut documents = Documents::default();
        let text = |i: usize| format!("{i:08}").repeat(1024);
        let mut peak = 0;
        let mut charged = 0usize;
        for chunk in 0..20 {
            let first = chunk * 1000;
            let texts: Arc<[String]> = (first..first + 1000).map(text).collect();
            let bytes = texts.iter().map(String::len).sum::<usize>();
            charged += bytes;
            documents.held_bytes += bytes;
            documents.hold_chunk(first, texts);
            for i in first..first + 1000 {
                // Scores rise and fall, so the best five change along the way.
                let score = ((i * 7919) % 10_007) as f32;
                let before = documents.held_bytes;
                let freed = documents.scored(i as u32, score, 5);
                charged += documents.held_bytes - before;
                charged -= freed;
                documents.held_bytes -= freed;
                peak = peak.max(documents.held_bytes);
            }
        }
        assert!(
            peak <= 1000 * 8192 + 6 * 8192,
            "held {peak} bytes at the peak: more than one chunk and the top five"
        );
        assert_eq!(documents.kept.len(), 5);
        assert_eq!(documents.held_bytes, 5 * 8192);
        assert_eq!(charged, documents.held_bytes, "every byte held is charged");
        let mut best: Vec<u32> = (0..20_000u32).collect();
        best.sort_by_key(|&i| std::cmp::Reverse(((i as usize * 7919) % 10_007, u32::MAX - i)));
        let mut kept: Vec<u32> = documents.kept.keys().copied().collect();
        kept.sort_unstable();
        let mut expected = best[..5].to_vec();
        expected.sort_unstable();
        assert_eq!(kept, expected, "the kept texts are those of the best five");
        assert_eq!(documents.kept[&expected[0]], text(expected[0] as usize));
    }
}
