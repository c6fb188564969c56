//! The engine: one dedicated thread that owns the model and its device and runs batches to logits.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::batch::{Batch, BatchOutcome, RequestHandle, ScoredPairs};
use crate::error::{RerankError, StartupError};
use crate::metrics::Metrics;
use crate::model::{LoadedModel, PackedBatch};
use crate::throughput::Throughput;

mod device;
pub use device::{compute_target, compute_targets, ComputeTarget};

/// Batches the scheduler may have ready while the engine computes one.
pub const QUEUE_DEPTH: usize = 1;

/// Runs one batch and catches a panic inside the model, so a bad batch cannot kill the engine.
pub fn run_batch(model: &LoadedModel, inputs: &PackedBatch) -> Result<Vec<Vec<f32>>, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| model.logits(inputs))) {
        Ok(Ok(rows)) if rows.len() == inputs.size() => Ok(rows),
        Ok(Ok(rows)) => Err(format!(
            "model returned {} rows for {} pairs",
            rows.len(),
            inputs.size()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the model panicked".into()),
    }
}

/// What the engine thread reports to and reads from the rest of the server.
pub struct EngineContext {
    pub metrics: Arc<Metrics>,
    pub throughput: Arc<Throughput>,
    /// Only batches of at least a quarter of what fits this time update the speed estimate: small batches
    /// are dominated by fixed costs and would make a loaded engine look slower than it is.
    pub target_batch_time: std::time::Duration,
    /// Consecutive batches that fail on the device, even pair by pair, before the engine stops for good.
    pub max_consecutive_failures: usize,
    /// The threads the model's CPU work runs on (every CPU kernel and GEMM of a batch).
    pub pool: Arc<rayon::ThreadPool>,
}

/// The engine's compute threads: the CPU kernels run on these and nowhere else, so the model's parallelism is
/// bounded by the configured budget instead of rayon's global pool (which takes every core).
pub fn compute_pool(threads: usize, engine: &str) -> Result<Arc<rayon::ThreadPool>, StartupError> {
    let prefix = engine.to_string();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{prefix}-compute-{i}"))
        .build()
        .map_err(|e| StartupError::Config(format!("compute thread pool: {e}")))?;
    tracing::info!(
        engine,
        threads = pool.current_num_threads(),
        simd = crate::model::ops::cpu_simd_level(),
        "CPU compute pool"
    );
    Ok(Arc::new(pool))
}

/// The batches every engine takes from: whichever engine frees first takes the next batch.
pub type Inbox = Arc<std::sync::Mutex<mpsc::Receiver<Batch>>>;

/// Waits for the next batch; None once the scheduler has stopped.
fn next_batch(inbox: &Inbox) -> Option<Batch> {
    // One engine waits at a time; the others queue for the lock, so a batch goes to the engine that freed first.
    let mut receiver = inbox.lock().unwrap_or_else(|e| e.into_inner());
    receiver.blocking_recv()
}

/// Starts an engine thread, `name`, on its own device. It stops when the scheduler drops its end of the channel,
/// when the device keeps failing, or if it panics. When the last engine has stopped, the inbox is dropped,
/// which the scheduler sees and reports (every pending call then fails with UNAVAILABLE and health turns
/// NOT_SERVING); until then the other engines carry the work.
pub fn spawn(
    model: Arc<LoadedModel>,
    inbox: Inbox,
    context: EngineContext,
    name: String,
) -> Result<JoinHandle<()>, StartupError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let mut failures = 0;
            while let Some(batch) = next_batch(&inbox) {
                let started = Instant::now();
                let (real, cost) = (batch.inputs.real_tokens(), batch.cost);
                let span = batch_span(&batch, real);
                let outcome = span.in_scope(|| context.pool.install(|| process(&model, batch)));
                let elapsed = started.elapsed();
                context.metrics.engine_busy.inc_by(elapsed.as_secs_f64());
                context.throughput.set_idle();
                match outcome {
                    BatchRun::Skipped => {}
                    BatchRun::Computed(inference) => {
                        context.metrics.inference_duration.observe(inference.as_secs_f64());
                        failures = 0;
                        let full = context.throughput.cost_in(context.target_batch_time);
                        if cost * 4 >= full {
                            context.throughput.record(real, cost, elapsed);
                            context.metrics.engine_tokens_per_second.set(context.throughput.tokens_per_second());
                        }
                    }
                    BatchRun::Failed(reason) => {
                        failures += 1;
                        if failures < context.max_consecutive_failures {
                            continue;
                        }
                        // Inputs that always fail could look like a broken device: a batch of padding tells.
                        if context.pool.install(|| device_works(&model)) {
                            tracing::warn!(failures, %reason, "batches failed but the device computes a probe batch; serving on");
                            failures = 0;
                            continue;
                        }
                        tracing::error!(
                            failures,
                            %reason,
                            "the device failed every pair of the last batches and a probe batch; the engine \
                             stops and the server reports NOT_SERVING"
                        );
                        break;
                    }
                }
            }
            context.throughput.engine_stopped();
            tracing::info!(engine = %name, "engine stopped");
        })
        .map_err(StartupError::Io)
}

/// The engine's span for one batch, linked to the span of every call whose pairs it holds (a trace of a
/// call then shows the batches that served it).
fn batch_span(batch: &Batch, real_tokens: usize) -> tracing::Span {
    let span = tracing::debug_span!(
        "batch",
        id = batch.id,
        pairs = batch.pairs.len(),
        tokens = real_tokens
    );
    if span.is_disabled() {
        return span;
    }
    let mut linked: Vec<u64> = Vec::new();
    for pair in &batch.pairs {
        if !linked.contains(&pair.request.id) {
            linked.push(pair.request.id);
            span.follows_from(&pair.request.span);
        }
    }
    span
}

/// Whether the model still computes a small batch of padding.
fn device_works(model: &LoadedModel) -> bool {
    let ids = [model.pad_token_id; 8];
    let types = [0; 8];
    let probe = PackedBatch::from_sequences([(&ids[..], &types[..])]);
    run_batch(model, &probe).is_ok()
}

/// What became of one batch.
#[derive(Debug, PartialEq)]
enum BatchRun {
    /// Every pair belonged to a cancelled call: nothing was computed.
    Skipped,
    /// At least one pair was scored; the model ran this long (retries in halves included).
    Computed(std::time::Duration),
    /// Every pair failed, even alone: the device itself is failing.
    Failed(String),
}

fn process(model: &LoadedModel, batch: Batch) -> BatchRun {
    if batch.pairs.iter().all(|pair| pair.request.is_cancelled()) {
        return BatchRun::Skipped;
    }
    let started = Instant::now();
    let rows = score_rows(model, &batch.inputs);
    let inference = started.elapsed();
    let run = match rows.iter().find_map(|row| row.as_ref().err()) {
        Some(reason) if rows.iter().all(Result::is_err) => BatchRun::Failed(reason.clone()),
        _ => BatchRun::Computed(inference),
    };
    let failed: Vec<(u64, &String)> = batch
        .pairs
        .iter()
        .zip(&rows)
        .filter_map(|(pair, row)| row.as_ref().err().map(|reason| (pair.request.id, reason)))
        .collect();
    let mut notified: Vec<u64> = Vec::new();
    for (id, reason) in &failed {
        if let Some(pair) = batch
            .pairs
            .iter()
            .find(|p| p.request.id == *id && !notified.contains(id))
        {
            notified.push(*id);
            pair.request
                .deliver(BatchOutcome::Failed(RerankError::internal(format!(
                    "inference failed for a batch of this request: {reason}"
                ))));
        }
    }
    let scored: Vec<Vec<f32>> = rows.into_iter().map(Result::unwrap_or_default).collect();
    for (request, scored) in group_by_request(&batch, scored, started, inference) {
        if !notified.contains(&request.id) {
            request.deliver(BatchOutcome::Scored(scored));
        }
    }
    run
}

/// Scores every row of a batch. A failed batch (a device error, out of memory) is retried in halves, so only
/// the rows that also fail on their own fail, and their requests with them.
fn score_rows(model: &LoadedModel, inputs: &PackedBatch) -> Vec<Result<Vec<f32>, String>> {
    match run_batch(model, inputs) {
        Ok(rows) => rows.into_iter().map(Ok).collect(),
        Err(reason) if inputs.size() <= 1 => {
            tracing::error!(tokens = inputs.max_len, %reason, "pair failed");
            vec![Err(reason)]
        }
        Err(reason) => {
            tracing::warn!(pairs = inputs.size(), max_len = inputs.max_len, %reason, "batch failed; retrying in halves");
            let (first, rest) = inputs.split_at(inputs.size() / 2);
            let mut rows = score_rows(model, &first);
            rows.extend(score_rows(model, &rest));
            rows
        }
    }
}

/// Splits a batch's rows into one report per request.
fn group_by_request(
    batch: &Batch,
    rows: Vec<Vec<f32>>,
    started: Instant,
    inference: std::time::Duration,
) -> Vec<(Arc<RequestHandle>, ScoredPairs)> {
    let mut groups: Vec<(Arc<RequestHandle>, ScoredPairs)> = Vec::new();
    for (pair, logits) in batch.pairs.iter().zip(rows) {
        let position = match groups
            .iter()
            .position(|(request, _)| request.id == pair.request.id)
        {
            Some(position) => position,
            None => {
                let empty = ScoredPairs {
                    pairs: Vec::new(),
                    tokens: 0,
                    batch: batch.id,
                    started,
                    inference,
                    queued: std::time::Duration::ZERO,
                };
                groups.push((Arc::clone(&pair.request), empty));
                groups.len() - 1
            }
        };
        let scored = &mut groups[position].1;
        scored.pairs.push((pair.index, logits));
        scored.tokens += pair.len() as u64;
        scored.queued = scored
            .queued
            .max(started.saturating_duration_since(pair.enqueued_at));
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Pair;
    use crate::model::scoring::{Activation, Scoring};
    use crate::model::CrossEncoder;
    use crate::tokenization::PairTokens;
    use candle_core::{DType, Device};

    const POISON: u32 = 666;

    /// Scores each row by its first id, and fails any batch holding the poison id, as a device fault would.
    struct Fragile;

    impl CrossEncoder for Fragile {
        fn forward(&self, batch: &PackedBatch) -> candle_core::Result<candle_core::Tensor> {
            if batch.input_ids.contains(&POISON) {
                candle_core::bail!("simulated device fault");
            }
            let firsts: Vec<f32> = batch.rows().map(|(ids, _)| ids[0] as f32).collect();
            candle_core::Tensor::from_vec(firsts, (batch.size(), 1), &Device::Cpu)
        }
    }

    #[test]
    fn a_failing_batch_fails_only_the_requests_of_the_rows_that_fail_alone() {
        let model = LoadedModel {
            model: Box::new(Fragile),
            architecture: "test".into(),
            max_positions: 16,
            vocab_size: 1000,
            scoring: Scoring::SingleLogit(Activation::Identity),
            dtype: DType::F32,
            pad_token_id: 0,
            attention_span: 1000,
            prompt: None,
            default_max_length: None,
            cutoff_layers: None,
        };
        let (good, mut good_rx) = RequestHandle::new(1);
        let (bad, mut bad_rx) = RequestHandle::new(2);
        let mut pairs = Vec::new();
        for (i, first) in [5u32, 6, POISON, 7, 8].into_iter().enumerate() {
            let request = if first == POISON { &bad } else { &good };
            let tokens = PairTokens {
                input_ids: vec![first, 1, 2],
                type_ids: vec![0; 3],
            };
            pairs.push(Pair {
                request: Arc::clone(request),
                index: i as u32,
                tokens,
                enqueued_at: Instant::now(),
            });
        }
        let inputs = PackedBatch::from_sequences(
            pairs
                .iter()
                .map(|p| (&p.tokens.input_ids[..], &p.tokens.type_ids[..])),
        );
        let (cost, device_tokens) = (inputs.real_tokens(), inputs.real_tokens());
        let batch = Batch {
            id: 1,
            pairs,
            inputs,
            cost,
            device_tokens,
        };
        assert!(matches!(process(&model, batch), BatchRun::Computed(_)));
        match good_rx.try_recv() {
            Ok(BatchOutcome::Scored(scored)) => {
                let logits: Vec<(u32, Vec<f32>)> = scored.pairs;
                assert_eq!(
                    logits,
                    vec![
                        (0, vec![5.0]),
                        (1, vec![6.0]),
                        (3, vec![7.0]),
                        (4, vec![8.0])
                    ]
                );
            }
            other => panic!("the healthy request is scored, got {other:?}"),
        }
        assert!(matches!(
            bad_rx.try_recv(),
            Ok(BatchOutcome::Failed(RerankError::Internal(_)))
        ));
        assert!(
            bad_rx.try_recv().is_err(),
            "one failure message per request"
        );
    }
}
