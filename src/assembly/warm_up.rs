//! Warm-up: each engine runs the largest batch its device must take once before serving, and times a smaller
//! one for the first speed estimate.

use std::sync::Arc;
use std::time::Instant;

use super::ModelWrapper;
use crate::engine;
use crate::error::StartupError;
use crate::model::{LoadedModel, PackedBatch};
use crate::scheduler::{BatchPolicy, BatchShape};
use crate::throughput::Throughput;

/// The engines' models after warm-up, each with its compute pool, and the first engine's speed estimate.
pub(super) type WarmEngines = (
    Vec<(Arc<LoadedModel>, Arc<rayon::ThreadPool>)>,
    Arc<Throughput>,
);

/// Warms each model up on its own compute pool (`threads` each), then wraps it with `wrapper`.
pub(super) async fn warm_engines(
    models: Vec<LoadedModel>,
    (policy, shape, max_length): (BatchPolicy, BatchShape, usize),
    threads: usize,
    wrapper: Option<&ModelWrapper>,
) -> Result<WarmEngines, StartupError> {
    let count = models.len();
    let mut engines = Vec::with_capacity(count);
    let mut throughput = None;
    for (i, model) in models.into_iter().enumerate() {
        let pool = engine::compute_pool(threads, &engine_name(i, count))?;
        let warm_up_pool = Arc::clone(&pool);
        let (mut model, measured) = tokio::task::spawn_blocking(move || {
            warm_up_pool
                .install(|| warm_up(&model, &policy, shape, max_length))
                .map(|throughput| (model, throughput))
        })
        .await
        .map_err(|e| StartupError::Config(format!("warm-up failed: {e}")))??;
        if let Some(wrap) = wrapper {
            model.model = wrap(model.model);
        }
        // The first engine's warm-up gives the speed estimate; the engines are alike.
        throughput.get_or_insert(measured);
        engines.push((Arc::new(model), pool));
    }
    let throughput = Arc::new(throughput.ok_or_else(|| StartupError::Config("no engine".into()))?);
    throughput.set_engines(engines.len());
    Ok((engines, throughput))
}

/// "engine" for one engine, "engine-{i}" for several.
pub(super) fn engine_name(i: usize, count: usize) -> String {
    match count {
        1 => "engine".to_string(),
        _ => format!("engine-{i}"),
    }
}

/// The longest pair, and the most rows, a CPU warms up with.
const CPU_WARM_UP_LENGTH: usize = 512;
const CPU_WARM_UP_ROWS: usize = 4;

/// Runs the largest batch the policy allows, so a shape that does not fit fails at start, not under load.
/// Its time is the engine's first speed measurement.
fn warm_up(
    model: &LoadedModel,
    policy: &BatchPolicy,
    shape: BatchShape,
    max_length: usize,
) -> Result<Throughput, StartupError> {
    // A GPU warms up at the largest shape so that one that does not fit its memory fails now. A CPU has the
    // memory for any shape; what it lacks is the time (minutes for a 0.6B decoder at full size), and the speed
    // it measures on a few rows of CPU_WARM_UP_LENGTH scales to other lengths through the cost model.
    let (max_length, row_cap) = match shape {
        BatchShape::Packed { .. } => (max_length.min(CPU_WARM_UP_LENGTH), CPU_WARM_UP_ROWS),
        BatchShape::Padded => (max_length, policy.max_batch_size),
    };
    let rows = (policy.max_batch_tokens / shape.pair_cost(max_length))
        .clamp(1, policy.max_batch_size.min(row_cap));
    // Rows differ from their first token, so a decoder computes every row whole (no shared prompt to reuse).
    let rows_ids: Vec<Vec<u32>> = (0..rows)
        .map(|row| {
            let mut ids = vec![model.pad_token_id; max_length];
            if let Some(first) = ids.first_mut() {
                *first = (row % model.vocab_size.max(1)) as u32;
            }
            ids
        })
        .collect();
    let types = vec![0; max_length];
    let batch = PackedBatch::from_sequences(rows_ids.iter().map(|ids| (&ids[..], &types[..])));
    let started = Instant::now();
    engine::run_batch(model, &batch)
        .map_err(|e| StartupError::Config(format!("warm-up batch failed: {e}")))?;
    let cold = started.elapsed();
    // What the warm-up left for later batches would make the timed run (and requests) reuse padding.
    model.model.clear_prefix_cache();
    // The first run pays one-time costs (allocations, kernel loading on a GPU): a second, smaller run of the
    // same length gives the first speed estimate.
    let timed_rows = (rows / 4).max(1);
    let timed = PackedBatch::from_sequences(
        rows_ids
            .iter()
            .take(timed_rows)
            .map(|ids| (&ids[..], &types[..])),
    );
    let started = Instant::now();
    engine::run_batch(model, &timed)
        .map_err(|e| StartupError::Config(format!("warm-up batch failed: {e}")))?;
    let warm = started.elapsed();
    model.model.clear_prefix_cache();
    tracing::info!(
        rows,
        max_length,
        cold_ms = cold.as_millis() as u64,
        timed_rows,
        warm_ms = warm.as_millis() as u64,
        "warm-up batches done"
    );
    Ok(Throughput::new(
        timed_rows * max_length,
        shape.batch_cost(&timed),
        warm,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A decoder's warm-up computes every row whole (its rows share no prompt to reuse) and leaves nothing in the
    /// prefix cache for requests to reuse.
    #[test]
    fn warm_up_computes_decoder_rows_whole_and_leaves_no_prefix() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/qwen3-reranker-tiny");
        let model = crate::model::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)
            .expect("fixture loads");
        let policy = BatchPolicy {
            max_batch_tokens: 4096,
            max_batch_size: 8,
            max_wait: Duration::from_millis(1),
        };
        let shape = BatchShape::Packed {
            attention_span: model.attention_span,
        };
        warm_up(&model, &policy, shape, 64).expect("warm-up runs");
        let stats = || model.model.prefix_cache_stats().expect("a decoder");
        // Rows sharing a prompt would make the largest batch look one up (a miss): only the one-row timed batch
        // may, and it finds nothing of the first batch.
        assert_eq!(
            (stats().hits, stats().misses),
            (0, 1),
            "warm-up rows share nothing"
        );
        // A request's pair afterwards finds nothing cached, even one that starts as a warm-up row did.
        let mut ids = [model.pad_token_id; 40];
        ids[0] = 0;
        let pair = PackedBatch::from_sequences([(&ids[..], &[][..])]);
        engine::run_batch(&model, &pair).expect("scores");
        assert_eq!(stats().hits, 0, "nothing was left to reuse");
    }
}
