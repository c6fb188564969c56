//! The scheduler task: takes pairs from every request into one queue and feeds cut batches to the engine.

mod cost;
mod queue;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use cost::{BatchPolicy, BatchShape};
pub use queue::{bucket_bounds, BatchQueue};

use crate::batch::{engine_gone, Batch, BatchOutcome, Pair, RequestHandle, RequestId};
use crate::error::RerankError;
use crate::metrics::Metrics;
use crate::throughput::Throughput;

fn record_batch(metrics: &Metrics, batch: &Batch) {
    let real = batch.inputs.real_tokens();
    metrics.batch_pairs.observe(batch.pairs.len() as f64);
    metrics.batch_tokens.observe(batch.device_tokens as f64);
    metrics
        .batch_padding_ratio
        .observe(batch.device_tokens as f64 / real.max(1) as f64);
    metrics.device_tokens.inc_by(batch.device_tokens as u64);
    metrics.real_tokens.inc_by(real as u64);
}

enum Command {
    Submit(Vec<Pair>),
    Cancel(RequestId),
}

/// The way into the scheduler; cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    commands: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    engine_stopped: tokio::sync::watch::Receiver<bool>,
}

impl SchedulerHandle {
    /// Registers a new request; its outcomes arrive on the returned receiver.
    pub fn new_request(&self) -> (Arc<RequestHandle>, mpsc::UnboundedReceiver<BatchOutcome>) {
        self.new_request_exiting_after(0)
    }

    /// A request whose pairs a layerwise reranker scores after `exit_layer` (0: the model's default).
    pub fn new_request_exiting_after(
        &self,
        exit_layer: u32,
    ) -> (Arc<RequestHandle>, mpsc::UnboundedReceiver<BatchOutcome>) {
        RequestHandle::exiting_after(self.next_id.fetch_add(1, Ordering::Relaxed), exit_layer)
    }

    /// Queues pairs for computation.
    pub fn submit(&self, pairs: Vec<Pair>) -> Result<(), RerankError> {
        if self.has_engine_stopped() {
            return Err(engine_gone());
        }
        self.commands
            .send(Command::Submit(pairs))
            .map_err(|_| RerankError::Unavailable("the scheduler has stopped".into()))
    }

    pub fn has_engine_stopped(&self) -> bool {
        *self.engine_stopped.borrow()
    }

    /// Drops a request's pairs that are still queued.
    pub fn cancel(&self, request: &RequestHandle) {
        request.cancel();
        let _ = self.commands.send(Command::Cancel(request.id));
    }

    /// Resolves once the engine has stopped taking batches (the server can then no longer score).
    pub async fn engine_stopped(&self) {
        let mut stopped = self.engine_stopped.clone();
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }
}

/// How batches are sized and handed over, besides the policy's limits.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// The engine's measured speed; batches hold what it computes in `target_batch_time`.
    pub throughput: Arc<Throughput>,
    pub target_batch_time: Duration,
    /// Cut the next batch while the engine runs the current one (a GPU overlaps host work with the device).
    /// Without it a batch is cut only when the engine is idle, so work that arrived meanwhile (a small
    /// request) gets into the very next batch, and cancelled work is never cut.
    pub cut_ahead: bool,
}

/// Starts the scheduler task on the current tokio runtime. Batches go to `engine`, a bounded channel.
pub fn spawn(
    policy: BatchPolicy,
    pacing: Pacing,
    max_length: usize,
    shape: BatchShape,
    engine: mpsc::Sender<Batch>,
    metrics: Arc<Metrics>,
) -> SchedulerHandle {
    let (commands, receiver) = mpsc::unbounded_channel();
    let queue = BatchQueue::new(policy, max_length, shape);
    let (stopped_sender, engine_stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(run(
        queue,
        pacing,
        receiver,
        engine,
        metrics,
        stopped_sender,
    ));
    SchedulerHandle {
        commands,
        next_id: Arc::new(AtomicU64::new(1)),
        engine_stopped,
    }
}

async fn run(
    mut queue: BatchQueue,
    pacing: Pacing,
    mut commands: mpsc::UnboundedReceiver<Command>,
    engine: mpsc::Sender<Batch>,
    stats: Arc<Metrics>,
    engine_stopped: tokio::sync::watch::Sender<bool>,
) {
    let throughput = Arc::clone(&pacing.throughput);
    loop {
        while let Ok(command) = commands.try_recv() {
            apply(&mut queue, command, &stats);
        }
        stats.queue_pairs.set(queue.len() as i64);
        stats.queue_tokens.set(queue.queued_tokens() as i64);
        queue.set_token_budget(throughput.cost_in(pacing.target_batch_time));
        queue.set_engine_idle(!throughput.is_busy());
        if queue.has_ready(Instant::now()) {
            let engine_can_take = async {
                if !pacing.cut_ahead {
                    throughput.idle().await;
                }
                engine.reserve().await
            };
            tokio::select! {
                biased;
                permit = engine_can_take => {
                    let Ok(permit) = permit else { break };
                    // Cut only now that the engine can take it, so the batch includes the latest arrivals.
                    let batch = queue.cut(Instant::now());
                    stats.cancelled_pairs.inc_by(queue.take_dropped() as u64);
                    if let Some(batch) = batch {
                        record_batch(&stats, &batch);
                        log_batch(&batch);
                        throughput.set_busy();
                        permit.send(batch);
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => apply(&mut queue, command, &stats),
                    None => return,
                },
                _ = engine.closed() => break,
            }
        } else {
            let deadline = queue.next_deadline();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => apply(&mut queue, command, &stats),
                    None => return,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {}
                // Pending pairs go at once when the engine runs dry, not at their max_wait.
                _ = throughput.idle(), if !queue.is_empty() && throughput.is_busy() => {}
                _ = engine.closed() => break,
            }
        }
    }
    let _ = engine_stopped.send(true);
    fail_everything(queue, commands, &stats).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

fn apply(queue: &mut BatchQueue, command: Command, stats: &Metrics) {
    match command {
        Command::Submit(pairs) => pairs.into_iter().for_each(|pair| queue.push(pair)),
        Command::Cancel(request) => {
            // The queue counts what it drops (here and when it meets flagged pairs while cutting) in one place.
            queue.cancel(request);
            stats.cancelled_pairs.inc_by(queue.take_dropped() as u64);
        }
    }
}

fn log_batch(batch: &Batch) {
    let (padded, real) = (batch.device_tokens, batch.inputs.real_tokens());
    tracing::debug!(
        batch = batch.id,
        pairs = batch.pairs.len(),
        max_len = batch.inputs.max_len,
        cost = batch.cost,
        padded_tokens = padded,
        real_tokens = real,
        padding_ratio = padded as f64 / real.max(1) as f64,
        "batch cut"
    );
}

/// The engine is gone: every queued and future pair fails instead of waiting forever.
async fn fail_everything(
    mut queue: BatchQueue,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stats: &Metrics,
) {
    tracing::error!("the engine stopped; failing all pending requests");
    let error = || BatchOutcome::Failed(engine_gone());
    let policy = *queue.policy();
    let far_future = Instant::now() + policy.max_wait + std::time::Duration::from_secs(3600);
    while let Some(batch) = queue.cut(far_future) {
        batch
            .pairs
            .iter()
            .for_each(|pair| pair.request.deliver(error()));
    }
    stats.queue_pairs.set(0);
    stats.queue_tokens.set(0);
    while let Some(command) = commands.recv().await {
        if let Command::Submit(pairs) = command {
            pairs.iter().for_each(|pair| pair.request.deliver(error()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenization::PairTokens;
    use std::collections::HashSet;

    fn policy() -> BatchPolicy {
        BatchPolicy {
            max_batch_tokens: 512,
            max_batch_size: 8,
            max_wait: Duration::from_millis(1),
        }
    }

    /// An engine measured at 1,000,000 tokens per second, batches of 1 ms, cut ahead.
    fn pacing() -> Pacing {
        Pacing {
            throughput: Arc::new(Throughput::new(
                1_000_000,
                1_000_000,
                Duration::from_secs(1),
            )),
            target_batch_time: Duration::from_millis(1),
            cut_ahead: true,
        }
    }

    fn pairs(request: &Arc<RequestHandle>, count: u32, len: usize) -> Vec<Pair> {
        (0..count)
            .map(|index| Pair {
                request: Arc::clone(request),
                index,
                tokens: PairTokens {
                    input_ids: vec![1; len],
                    type_ids: vec![0; len],
                },
                enqueued_at: Instant::now(),
            })
            .collect()
    }

    /// A scheduler of padded batches up to 128 tokens, the inbox an engine would read, and its metrics.
    fn scheduler_with_engine_inbox() -> (SchedulerHandle, mpsc::Receiver<Batch>, Arc<Metrics>) {
        let (engine, inbox) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::new());
        let scheduler = spawn(
            policy(),
            pacing(),
            128,
            BatchShape::Padded,
            engine,
            Arc::clone(&metrics),
        );
        (scheduler, inbox, metrics)
    }

    /// Answers each batch row with its document index as the logit, like an engine would.
    fn echo(batch: Batch) {
        type Rows = Vec<(u32, Vec<f32>)>;
        let mut by_request: Vec<(Arc<RequestHandle>, Rows)> = Vec::new();
        for pair in batch.pairs {
            match by_request.iter_mut().find(|(r, _)| r.id == pair.request.id) {
                Some((_, rows)) => rows.push((pair.index, vec![pair.index as f32])),
                None => by_request.push((
                    Arc::clone(&pair.request),
                    vec![(pair.index, vec![pair.index as f32])],
                )),
            }
        }
        for (request, rows) in by_request {
            let scored = crate::batch::ScoredPairs {
                pairs: rows,
                tokens: 0,
                batch: 0,
                started: Instant::now(),
                inference: Duration::ZERO,
                queued: Duration::ZERO,
            };
            request.deliver(BatchOutcome::Scored(scored));
        }
    }

    #[tokio::test]
    async fn an_idle_engine_gets_a_small_request_without_waiting_max_wait() {
        let (engine, mut inbox) = mpsc::channel(1);
        let patient = BatchPolicy {
            max_wait: Duration::from_secs(3600),
            ..policy()
        };
        let metrics = Arc::new(Metrics::new());
        let scheduler = spawn(patient, pacing(), 128, BatchShape::Padded, engine, metrics);
        let (request, _receiver) = scheduler.new_request();
        scheduler.submit(pairs(&request, 3, 10)).expect("submit");
        // Were max_wait applied, the batch would come after an hour.
        let batch = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
            .await
            .expect("cut at once")
            .expect("a batch");
        assert_eq!(batch.pairs.len(), 3, "the small request runs in one batch");
    }

    #[tokio::test]
    async fn every_pair_of_concurrent_requests_is_answered_exactly_once() {
        let (scheduler, mut inbox, metrics) = scheduler_with_engine_inbox();
        tokio::spawn(async move {
            while let Some(batch) = inbox.recv().await {
                echo(batch);
            }
        });
        let mut receivers = Vec::new();
        for (i, count) in [1u32, 7, 250, 33].into_iter().enumerate() {
            let (request, receiver) = scheduler.new_request();
            scheduler
                .submit(pairs(&request, count, 5 + i * 30))
                .expect("submit");
            receivers.push((request, receiver, count));
        }
        for (_request, mut receiver, count) in receivers {
            let mut seen = HashSet::new();
            while seen.len() < count as usize {
                let outcome = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
                    .await
                    .expect("in time");
                let Some(BatchOutcome::Scored(scored)) = outcome else {
                    panic!("scored outcome expected")
                };
                for (index, logits) in scored.pairs {
                    assert_eq!(logits, vec![index as f32]);
                    assert!(seen.insert(index), "index {index} answered twice");
                }
            }
            assert!(
                receiver.try_recv().is_err(),
                "nothing beyond the request's pairs"
            );
        }
        assert_eq!(metrics.batch_pairs.get_sample_sum() as u64, 291);
        assert!(
            metrics.device_tokens.get() >= metrics.real_tokens.get()
                && metrics.batch_pairs.get_sample_count() >= 291 / 8
        );
    }

    #[tokio::test]
    async fn cancelling_drops_pairs_that_have_not_reached_the_engine() {
        let (scheduler, mut inbox, metrics) = scheduler_with_engine_inbox();
        let (request, _receiver) = scheduler.new_request();
        scheduler.submit(pairs(&request, 80, 20)).expect("submit");
        // The engine takes one batch; at most one more waits in its inbox, the rest in the queue.
        let first = inbox.recv().await.expect("a batch");
        scheduler.cancel(&request);
        // Commands are applied in order: once this marker reaches the engine, the cancel has been applied.
        let (marker, _marker_receiver) = scheduler.new_request();
        scheduler.submit(pairs(&marker, 1, 20)).expect("submit");
        let mut reached_engine = first.pairs.len();
        loop {
            let batch = inbox.recv().await.expect("a batch");
            let cancelled_ones = batch
                .pairs
                .iter()
                .filter(|p| p.request.id == request.id)
                .count();
            reached_engine += cancelled_ones;
            if cancelled_ones < batch.pairs.len() {
                break;
            }
        }
        assert!(
            reached_engine <= 16,
            "{reached_engine} pairs reached the engine after cancel"
        );
        assert_eq!(metrics.cancelled_pairs.get() as usize + reached_engine, 80);
    }

    #[tokio::test]
    async fn a_stopped_engine_fails_requests_instead_of_hanging() {
        let (scheduler, inbox, _) = scheduler_with_engine_inbox();
        drop(inbox);
        let (request, mut receiver) = scheduler.new_request();
        scheduler.submit(pairs(&request, 3, 10)).expect("submit");
        let outcome = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .expect("in time");
        assert!(matches!(
            outcome,
            Some(BatchOutcome::Failed(RerankError::Unavailable(_)))
        ));
        tokio::time::timeout(Duration::from_secs(5), scheduler.engine_stopped())
            .await
            .expect("the stopped engine is reported");
    }
}
