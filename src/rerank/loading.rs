//! Model loading and warm-up: resolves the model, loads weights and tokenizer, runs the largest batch shape
//! once, and starts the scheduler and engine that the `Reranker` then feeds.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::admission::{Admission, AdmissionLimits};
use super::limits::Limits;
use super::{ModelDescription, Reranker};
use crate::config::Config;
use crate::engine::{self, EngineContext};
use crate::error::StartupError;
use crate::hub;
use crate::metrics::Metrics;
use crate::model::{self, CrossEncoder, LoadedModel, PackedBatch};
use crate::scheduler::{self, BatchPolicy, BatchShape, Pacing};
use crate::throughput::Throughput;
use crate::tokenization::PairTokenizer;

/// Wraps the loaded model after its warm-up, before it serves: lets tests put a stub in front of a real model
/// (one that blocks until released, or fails like a broken device).
pub type ModelWrapper = Arc<dyn Fn(Box<dyn CrossEncoder>) -> Box<dyn CrossEncoder> + Send + Sync>;

/// Loads model and tokenizer, warms the model up at the largest batch shape, and starts engine and scheduler.
pub async fn build_reranker(config: &Config) -> Result<Reranker, StartupError> {
    build_reranker_with(config, None, Arc::new(Metrics::new())).await
}

/// `build_reranker`, with the model wrapped by `wrapper` after its warm-up.
pub async fn build_reranker_with(
    config: &Config,
    wrapper: Option<ModelWrapper>,
    metrics: Arc<Metrics>,
) -> Result<Reranker, StartupError> {
    let started = Instant::now();
    let dir = hub::resolve(&config.model_id, &config.revision).await?;
    let targets = engine::compute_targets(&config.device, &config.dtype)?;
    let Some(first) = targets.first().cloned() else {
        return Err(StartupError::Config("no compute device".into()));
    };
    let device_name = targets
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let on_gpu = !first.device.is_cpu();
    let (model, tokenizer) = {
        let (config, dir, metrics) = (config.clone(), dir.clone(), Arc::clone(&metrics));
        tokio::task::spawn_blocking(move || {
            load_model_and_tokenizer(&dir, &first.device, first.dtype, &config, metrics)
        })
        .await
        .map_err(|e| StartupError::Config(format!("model loader failed: {e}")))??
    };
    let mut models = vec![model];
    for target in targets.iter().skip(1).cloned() {
        let dir = dir.clone();
        let loaded =
            tokio::task::spawn_blocking(move || model::load(&dir, &target.device, target.dtype))
                .await
                .map_err(|e| StartupError::Config(format!("model loader failed: {e}")))??;
        models.push(loaded);
    }
    let policy = BatchPolicy {
        max_batch_tokens: config.max_batch_tokens,
        max_batch_size: config.max_batch_size,
        max_wait: config.max_wait,
    };
    let max_length = tokenizer.max_length();
    // The CPU computes real tokens only; the CUDA attention kernels read padded batches.
    let shape = if on_gpu {
        BatchShape::Padded
    } else {
        BatchShape::Packed {
            attention_span: models[0].attention_span,
        }
    };
    // Each engine gets its share of the CPU threads.
    let threads = (config.cpu_threads() / models.len()).max(1);
    let count = models.len();
    let name = |i: usize| {
        if count == 1 {
            "engine".to_string()
        } else {
            format!("engine-{i}")
        }
    };
    let mut engines = Vec::with_capacity(count);
    let mut throughput = None;
    for (i, model) in models.into_iter().enumerate() {
        let pool = engine::compute_pool(threads, &name(i))?;
        let warm_up_pool = Arc::clone(&pool);
        let (mut model, measured) = tokio::task::spawn_blocking(move || {
            warm_up_pool
                .install(|| warm_up(&model, &policy, shape, max_length))
                .map(|throughput| (model, throughput))
        })
        .await
        .map_err(|e| StartupError::Config(format!("warm-up failed: {e}")))??;
        if let Some(wrap) = &wrapper {
            model.model = wrap(model.model);
        }
        // The first engine's warm-up gives the speed estimate; the engines are alike.
        throughput.get_or_insert(measured);
        engines.push((Arc::new(model), pool));
    }
    let throughput = Arc::new(throughput.ok_or_else(|| StartupError::Config("no engine".into()))?);
    throughput.set_engines(engines.len());
    let description = ModelDescription {
        model_id: config.model_id.clone(),
        architecture: engines[0].0.architecture.clone(),
        max_length,
        device: device_name,
        dtype: format!("{:?}", engines[0].0.dtype).to_lowercase(),
        scoring: engines[0].0.scoring,
        max_message_bytes: config.max_message_bytes,
        prompt: engines[0].0.prompt.clone(),
    };
    let (batches, engine_inbox) = tokio::sync::mpsc::channel(engine::QUEUE_DEPTH);
    let batch_time = target_batch_time(config.target_batch_time, on_gpu);
    let pacing = Pacing {
        throughput: Arc::clone(&throughput),
        target_batch_time: batch_time,
        cut_ahead: on_gpu,
    };
    let scheduler = scheduler::spawn(
        policy,
        pacing,
        max_length,
        shape,
        batches,
        Arc::clone(&metrics),
    );
    let inbox: engine::Inbox = Arc::new(std::sync::Mutex::new(engine_inbox));
    for (i, (model, pool)) in engines.into_iter().enumerate() {
        let context = EngineContext {
            metrics: Arc::clone(&metrics),
            throughput: Arc::clone(&throughput),
            target_batch_time: batch_time,
            max_consecutive_failures: config.max_consecutive_failures,
            pool,
        };
        engine::spawn(model, Arc::clone(&inbox), context, name(i))?;
    }
    drop(inbox);
    let limits = Limits {
        max_documents: config.max_documents,
        max_stream_documents: config.max_stream_documents,
        max_document_bytes: config.max_document_bytes,
        max_query_bytes: config.max_query_bytes,
        max_stream_pending_pairs: config.max_stream_pending_pairs,
        stream_idle_timeout: config.stream_idle_timeout,
        request_read_timeout: config.request_read_timeout,
        max_chunks_per_doc: config.max_chunks_per_doc,
        chunk_overlap_tokens: config.chunk_overlap_tokens,
        max_concurrent_calls: config.max_concurrent_calls,
    };
    tracing::info!(
        architecture = %description.architecture,
        max_length,
        scoring = description.scoring.name(),
        seconds = started.elapsed().as_secs_f32(),
        "model ready"
    );
    let admission = Admission::new(
        AdmissionLimits {
            max_pending_pairs: config.max_pending_pairs,
            max_pending_tokens: config.max_pending_tokens,
            max_inflight_bytes: config.max_inflight_bytes,
            max_queue_time: config.max_queue_time,
            batches_in_flight: batch_time * if on_gpu { 2 } else { 1 },
            max_client_share: config.max_client_share,
        },
        throughput,
    );
    Ok(Reranker::new(
        Arc::new(tokenizer),
        scheduler,
        admission,
        limits,
        policy,
        description,
        metrics,
    ))
}

fn load_model_and_tokenizer(
    dir: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(LoadedModel, PairTokenizer), StartupError> {
    let model = model::load(dir, device, dtype)?;
    // Unless configured, decoder rerankers stop at their published scoring length (far below their positions).
    let positions = match (config.max_length, model.default_max_length) {
        (None, Some(default)) => model.max_positions.min(default),
        _ => model.max_positions,
    };
    let mut tokenizer = PairTokenizer::load(
        dir,
        config.max_length,
        positions,
        config.tokenizer_threads(device.is_cpu()),
    )?
    .with_metrics(metrics)
    .with_chunk_overlap(config.chunk_overlap_tokens)
    .with_token_cache(config.token_cache_bytes);
    if let Some(prompt) = &model.prompt {
        tokenizer = tokenizer.with_prompt(prompt.clone(), model.max_positions)?;
    }
    if tokenizer.vocab_size() > model.vocab_size {
        return Err(StartupError::InvalidFile {
            path: dir.join("tokenizer.json"),
            reason: format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                model.vocab_size
            ),
        });
    }
    tracing::info!(
        max_length = tokenizer.max_length(),
        fast_path = tokenizer.fast_path_name().unwrap_or("none"),
        "tokenizer loaded"
    );
    Ok((model, tokenizer))
}

/// The batch time to aim for: the configured one, else 250 ms on a CPU (a small request waits about that
/// long behind other work) and 50 ms on a GPU (long enough to keep it busy).
fn target_batch_time(configured: Duration, on_gpu: bool) -> Duration {
    match (configured.is_zero(), on_gpu) {
        (false, _) => configured,
        (true, false) => Duration::from_millis(250),
        (true, true) => Duration::from_millis(50),
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
