//! The engine: one dedicated thread that owns the model and its device and runs batches to logits.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Device;
use tokio::sync::mpsc;

use crate::error::{RerankError, StartupError};
use crate::model::{LoadedModel, PaddedBatch};
use crate::scheduler::request::{BatchOutcome, RequestHandle, ScoredPairs};
use crate::scheduler::Batch;

/// Batches the scheduler may have ready while the engine computes one.
pub const QUEUE_DEPTH: usize = 1;

/// The compute device named in the configuration.
pub fn device(name: &str) -> Result<Device, StartupError> {
    match name.trim() {
        "cpu" => Ok(Device::Cpu),
        other if other.starts_with("cuda") => Err(StartupError::Config(format!(
            "device {other:?}: this build has no CUDA support; use device = \"cpu\""
        ))),
        other => Err(StartupError::Config(format!(
            "unknown device {other:?}; expected \"cpu\""
        ))),
    }
}

/// Runs one batch and catches a panic inside the model, so a bad batch cannot kill the engine.
pub fn run_batch(model: &LoadedModel, inputs: &PaddedBatch) -> Result<Vec<Vec<f32>>, String> {
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

/// Starts the engine thread. It stops when the scheduler drops its end of the channel.
pub fn spawn(
    model: Arc<LoadedModel>,
    mut batches: mpsc::Receiver<Batch>,
) -> Result<JoinHandle<()>, StartupError> {
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            while let Some(batch) = batches.blocking_recv() {
                process(&model, batch);
            }
            tracing::info!("engine stopped");
        })
        .map_err(StartupError::Io)
}

fn process(model: &LoadedModel, batch: Batch) {
    if batch.pairs.iter().all(|pair| pair.request.is_cancelled()) {
        return;
    }
    let started = Instant::now();
    let result = run_batch(model, &batch.inputs);
    let inference = started.elapsed();
    match result {
        Ok(rows) => {
            for (request, scored) in group_by_request(&batch, rows, started, inference) {
                request.deliver(BatchOutcome::Scored(scored));
            }
        }
        Err(reason) => {
            tracing::error!(pairs = batch.pairs.len(), seq_len = batch.inputs.seq_len, %reason, "batch failed");
            let mut notified: Vec<u64> = Vec::new();
            for pair in &batch.pairs {
                if !notified.contains(&pair.request.id) {
                    notified.push(pair.request.id);
                    pair.request
                        .deliver(BatchOutcome::Failed(RerankError::internal(format!(
                            "inference failed for a batch of this request: {reason}"
                        ))));
                }
            }
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
                    started,
                    inference,
                };
                groups.push((Arc::clone(&pair.request), empty));
                groups.len() - 1
            }
        };
        let scored = &mut groups[position].1;
        scored.pairs.push((pair.index, logits));
        scored.tokens += pair.len() as u64;
    }
    groups
}
