//! The server's composition root: resolves the model, loads it on every compute target with its tokenizer, warms
//! each engine up, and wires scheduler, engines and admission into the `Reranker` the transports call.

mod warm_up;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::{self, ComputeTarget, EngineContext};
use crate::error::StartupError;
use crate::hub;
use crate::metrics::Metrics;
use crate::model::{self, CrossEncoder, LoadedModel};
use crate::rerank::admission::{Admission, AdmissionLimits};
use crate::rerank::limits::Limits;
use crate::rerank::{ModelDescription, Reranker};
use crate::scheduler::{self, BatchPolicy, Pacing, SchedulerHandle};
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
    let (models, tokenizer) = load_models(&dir, &targets, config, &metrics).await?;
    let first = &targets[0];
    let policy = BatchPolicy::from(config);
    let max_length = tokenizer.max_length();
    let shape = first.batch_shape(models[0].attention_span);
    // Each engine gets its share of the CPU threads.
    let threads = (config.cpu_threads() / models.len()).max(1);
    let (engines, throughput) = warm_up::warm_engines(
        models,
        (policy, shape, max_length),
        threads,
        wrapper.as_ref(),
    )
    .await?;
    let description = describe(config, &targets, &engines[0].0, max_length);
    let batch_time = target_batch_time(config.target_batch_time, first.is_gpu());
    let pacing = Pacing {
        throughput: Arc::clone(&throughput),
        target_batch_time: batch_time,
        cut_ahead: first.is_gpu(),
    };
    let (batches, engine_inbox) = tokio::sync::mpsc::channel(engine::QUEUE_DEPTH);
    let scheduler = scheduler::spawn(
        policy,
        pacing,
        max_length,
        shape,
        batches,
        Arc::clone(&metrics),
    );
    start_engines(
        engines,
        engine_inbox,
        config,
        (&metrics, &throughput, batch_time),
    )?;
    tracing::info!(
        architecture = %description.architecture,
        max_length,
        scoring = description.scoring.name(),
        seconds = started.elapsed().as_secs_f32(),
        "model ready"
    );
    let in_flight = batch_time * if first.is_gpu() { 2 } else { 1 };
    let admission = Admission::new(AdmissionLimits::from_config(config, in_flight), throughput);
    Ok(assemble(
        tokenizer,
        scheduler,
        admission,
        config,
        policy,
        description,
        metrics,
    ))
}

/// The `Reranker` from its parts.
fn assemble(
    tokenizer: PairTokenizer,
    scheduler: SchedulerHandle,
    admission: Admission,
    config: &Config,
    policy: BatchPolicy,
    description: ModelDescription,
    metrics: Arc<Metrics>,
) -> Reranker {
    Reranker::new(
        Arc::new(tokenizer),
        scheduler,
        admission,
        Limits::from(config),
        policy,
        description,
        metrics,
    )
}

/// The model on every target (the first with the tokenizer), each loaded off the async runtime.
async fn load_models(
    dir: &Path,
    targets: &[ComputeTarget],
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Vec<LoadedModel>, PairTokenizer), StartupError> {
    let Some(first) = targets.first().cloned() else {
        return Err(StartupError::Config("no compute device".into()));
    };
    let failed =
        |e: tokio::task::JoinError| StartupError::Config(format!("model loader failed: {e}"));
    let (model, tokenizer) = {
        let (config, dir, metrics) = (config.clone(), dir.to_path_buf(), Arc::clone(metrics));
        tokio::task::spawn_blocking(move || {
            load_model_and_tokenizer(&dir, &first.device, first.dtype, &config, metrics)
        })
        .await
        .map_err(failed)??
    };
    let mut models = vec![model];
    for target in targets.iter().skip(1).cloned() {
        let dir = dir.to_path_buf();
        let loaded =
            tokio::task::spawn_blocking(move || model::load(&dir, &target.device, target.dtype))
                .await
                .map_err(failed)??;
        models.push(loaded);
    }
    Ok((models, tokenizer))
}

/// What `Info` reports of the served model.
fn describe(
    config: &Config,
    targets: &[ComputeTarget],
    model: &LoadedModel,
    max_length: usize,
) -> ModelDescription {
    ModelDescription {
        model_id: config.model_id.clone(),
        architecture: model.architecture.clone(),
        max_length,
        device: targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        dtype: format!("{:?}", model.dtype).to_lowercase(),
        scoring: model.scoring,
        max_message_bytes: config.max_message_bytes,
        prompt: model.prompt.clone(),
        cutoff_layers: model.cutoff_layers,
    }
}

/// One engine per warmed model, all taking batches from one inbox.
fn start_engines(
    engines: Vec<(Arc<LoadedModel>, Arc<rayon::ThreadPool>)>,
    inbox: tokio::sync::mpsc::Receiver<crate::batch::Batch>,
    config: &Config,
    (metrics, throughput, batch_time): (&Arc<Metrics>, &Arc<Throughput>, Duration),
) -> Result<(), StartupError> {
    let inbox: engine::Inbox = Arc::new(std::sync::Mutex::new(inbox));
    let count = engines.len();
    for (i, (model, pool)) in engines.into_iter().enumerate() {
        let context = EngineContext {
            metrics: Arc::clone(metrics),
            throughput: Arc::clone(throughput),
            target_batch_time: batch_time,
            max_consecutive_failures: config.max_consecutive_failures,
            pool,
        };
        engine::spawn(
            model,
            Arc::clone(&inbox),
            context,
            warm_up::engine_name(i, count),
        )?;
    }
    Ok(())
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
