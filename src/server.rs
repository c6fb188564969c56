//! Assembles the server: loads the model, starts engine and scheduler, and serves gRPC with health and reflection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::admission::{Admission, AdmissionLimits};
use crate::config::Config;
use crate::engine::{self, EngineContext};
use crate::error::StartupError;
use crate::hub;
use crate::model::{self, CrossEncoder, LoadedModel, PackedBatch};
use crate::proto::reranker_server::RerankerServer;
use crate::rerank::{Limits, ModelDescription, Reranker};
use crate::scheduler::{self, BatchPolicy, BatchShape, Pacing};
use crate::throughput::Throughput;
use crate::tokenization::PairTokenizer;
use crate::transport::call_limit::CallLimit;
use crate::transport::grpc::{ApiKeyCheck, GrpcReranker};
use tonic::service::interceptor::InterceptedService;

/// The gRPC service name health reports on, besides the overall "" entry.
const SERVICE_NAME: &str = "rerank.v1.Reranker";

/// Loading state, observable by `RunningServer::ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Loading,
    Ready,
    Failed(String),
}

/// Accepted connections with Nagle's algorithm off (as tonic sets on the listeners it binds itself): a
/// response's last small HTTP/2 frames (the trailers) must not wait for the client's delayed ACK, which costs
/// about 40 ms per call on Linux.
fn accept_without_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        Ok(stream)
    })
}

/// A started server: listening at once (health answers NOT_SERVING) while the model loads.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    readiness: watch::Receiver<Readiness>,
    shutdown: Option<oneshot::Sender<()>>,
    serve: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    health: HealthReporter,
    draining: Arc<AtomicBool>,
    drain_timeout: Duration,
}

impl RunningServer {
    /// Waits until the model is loaded and warmed up (Ok) or failed to load (Err, with why).
    pub async fn ready(&mut self) -> Result<(), StartupError> {
        loop {
            match &*self.readiness.borrow_and_update() {
                Readiness::Ready => return Ok(()),
                Readiness::Failed(reason) => return Err(StartupError::Load(reason.clone())),
                Readiness::Loading => {}
            }
            if self.readiness.changed().await.is_err() {
                return Err(StartupError::Load("the loader stopped".into()));
            }
        }
    }

    /// Graceful shutdown: health turns NOT_SERVING, new Reranker calls are refused with UNAVAILABLE, the
    /// listener stops, and in-flight calls get `drain_timeout` to finish; then it returns.
    pub async fn shutdown(mut self) -> Result<(), StartupError> {
        // Refuse new calls before health says so, so that a client that sees NOT_SERVING is also refused.
        self.draining.store(true, Ordering::Release);
        set_health(&self.health, ServingStatus::NotServing).await;
        if let Some(signal) = self.shutdown.take() {
            let _ = signal.send(());
        }
        match tokio::time::timeout(self.drain_timeout, &mut self.serve).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(StartupError::Config(format!("server error: {e}"))),
            Ok(Err(e)) => Err(StartupError::Config(format!("server task failed: {e}"))),
            Err(_) => {
                tracing::warn!(timeout = ?self.drain_timeout, "in-flight calls did not finish within drain_timeout");
                self.serve.abort();
                Ok(())
            }
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Wraps the loaded model after its warm-up, before it serves: lets tests put a stub in front of a real model
/// (one that blocks until released, or fails like a broken device).
pub type ModelWrapper = Arc<dyn Fn(Box<dyn CrossEncoder>) -> Box<dyn CrossEncoder> + Send + Sync>;

/// Binds the listener and starts serving; the model loads in the background.
pub async fn start(config: Config) -> Result<RunningServer, StartupError> {
    start_with(config, None).await
}

/// `start`, with the model wrapped by `wrapper`.
pub async fn start_with(
    config: Config,
    wrapper: Option<ModelWrapper>,
) -> Result<RunningServer, StartupError> {
    let config_drain_timeout = config.drain_timeout;
    let listener = TcpListener::bind(config.listen_addr()?).await?;
    let local_addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let slot = Arc::new(OnceLock::new());
    let draining = Arc::new(AtomicBool::new(false));
    let rerank_service =
        RerankerServer::new(GrpcReranker::new(Arc::clone(&slot), Arc::clone(&draining)))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
    let rerank_service = InterceptedService::new(
        rerank_service,
        ApiKeyCheck::new(config.api_key.as_ref().map(|key| key.expose())),
    );
    let rerank_service = CallLimit::new(rerank_service, config.max_concurrent_calls);
    let reflection = reflection_services()?;
    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout));
    if let Some(tls) = tls_config(&config)? {
        builder = builder
            .tls_config(tls)
            .map_err(|e| StartupError::Config(format!("TLS configuration: {e}")))?;
    }
    let serve = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection.0)
            .add_service(reflection.1)
            .add_service(rerank_service)
            .serve_with_incoming_shutdown(accept_without_delay(listener), async {
                let _ = shutdown_signal.await;
            }),
    );
    tracing::info!(%local_addr, "listening (NOT_SERVING until the model is loaded)");
    let (ready_sender, readiness) = watch::channel(Readiness::Loading);
    let loader_health = health.clone();
    tokio::spawn(async move {
        let state = match build_reranker_with(&config, wrapper).await {
            Ok(reranker) => {
                let watched = reranker.clone();
                let engine_health = loader_health.clone();
                tokio::spawn(async move {
                    watched.engine_stopped().await;
                    tracing::error!("the inference engine stopped; health is NOT_SERVING");
                    set_health(&engine_health, ServingStatus::NotServing).await;
                });
                let _ = slot.set(reranker);
                set_health(&loader_health, ServingStatus::Serving).await;
                tracing::info!("model loaded and warmed up; SERVING");
                Readiness::Ready
            }
            Err(e) => {
                tracing::error!(error = %e, "model failed to load");
                Readiness::Failed(e.to_string())
            }
        };
        let _ = ready_sender.send(state);
    });
    let drain_timeout = config_drain_timeout;
    Ok(RunningServer {
        local_addr,
        readiness,
        shutdown: Some(shutdown),
        serve,
        health,
        draining,
        drain_timeout,
    })
}

/// The listener's TLS identity from `tls_cert` and `tls_key`, when configured.
fn tls_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, StartupError> {
    let (Some(cert_path), Some(key_path)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &Path, expected: &str| {
        std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StartupError::MissingFile {
                path: path.to_path_buf(),
                expected: expected.to_string(),
            },
            _ => StartupError::InvalidFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })
    };
    let cert = read(
        cert_path,
        "the TLS certificate chain (PEM) named by tls_cert",
    )?;
    let key = read(key_path, "the TLS private key (PEM) named by tls_key")?;
    let identity = tonic::transport::Identity::from_pem(cert, key);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new().identity(identity),
    ))
}

type Reflection<A, B> = (A, B);

fn reflection_services() -> Result<
    Reflection<
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    >,
    StartupError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error =
        |e: tonic_reflection::server::Error| StartupError::Config(format!("reflection: {e}"));
    Ok((
        builder().build_v1().map_err(reflection_error)?,
        builder().build_v1alpha().map_err(reflection_error)?,
    ))
}

/// Loads model and tokenizer, warms the model up at the largest batch shape, and starts engine and scheduler.
pub async fn build_reranker(config: &Config) -> Result<Reranker, StartupError> {
    build_reranker_with(config, None).await
}

/// `build_reranker`, with the model wrapped by `wrapper` after its warm-up.
pub async fn build_reranker_with(
    config: &Config,
    wrapper: Option<ModelWrapper>,
) -> Result<Reranker, StartupError> {
    let started = Instant::now();
    let dir = hub::resolve(&config.model_id, &config.revision).await?;
    let target = engine::compute_target(&config.device, &config.dtype)?;
    let device_name = target.name.clone();
    let (model, tokenizer) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            load_model_and_tokenizer(&dir, &target.device, target.dtype, &config)
        })
        .await
        .map_err(|e| StartupError::Config(format!("model loader failed: {e}")))??
    };
    let policy = BatchPolicy {
        max_batch_tokens: config.max_batch_tokens,
        max_batch_size: config.max_batch_size,
        max_wait: config.max_wait,
    };
    let max_length = tokenizer.max_length();
    // The CPU computes real tokens only; the CUDA attention kernels read padded batches.
    let shape = if model_device_is_cpu(&device_name) {
        BatchShape::Packed {
            attention_span: model.attention_span,
        }
    } else {
        BatchShape::Padded
    };
    let pool = engine::compute_pool(config.cpu_threads())?;
    let warm_up_pool = Arc::clone(&pool);
    let (mut model, throughput) = tokio::task::spawn_blocking(move || {
        warm_up_pool
            .install(|| warm_up(&model, &policy, shape, max_length))
            .map(|throughput| (model, throughput))
    })
    .await
    .map_err(|e| StartupError::Config(format!("warm-up failed: {e}")))??;
    if let Some(wrap) = wrapper {
        model.model = wrap(model.model);
    }
    let model = Arc::new(model);
    let throughput = Arc::new(throughput);
    let description = ModelDescription {
        model_id: config.model_id.clone(),
        architecture: model.architecture.clone(),
        max_length,
        device: device_name,
        dtype: format!("{:?}", model.dtype).to_lowercase(),
        scoring: model.scoring,
        max_message_bytes: config.max_message_bytes,
    };
    let (batches, engine_inbox) = tokio::sync::mpsc::channel(engine::QUEUE_DEPTH);
    let on_gpu = !model_device_is_cpu(&description.device);
    let batch_time = target_batch_time(config.target_batch_time, on_gpu);
    let pacing = Pacing {
        throughput: Arc::clone(&throughput),
        target_batch_time: batch_time,
        cut_ahead: on_gpu,
    };
    let scheduler = scheduler::spawn(policy, pacing, max_length, shape, batches);
    let context = EngineContext {
        stats: scheduler.shared_stats(),
        throughput: Arc::clone(&throughput),
        target_batch_time: batch_time,
        max_consecutive_failures: config.max_consecutive_failures,
        pool,
    };
    engine::spawn(model, engine_inbox, context)?;
    let limits = Limits {
        max_documents: config.max_documents,
        max_stream_documents: config.max_stream_documents,
        max_document_bytes: config.max_document_bytes,
        max_query_bytes: config.max_query_bytes,
        max_stream_pending_pairs: config.max_stream_pending_pairs,
        stream_idle_timeout: config.stream_idle_timeout,
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
    ))
}

fn load_model_and_tokenizer(
    dir: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    config: &Config,
) -> Result<(LoadedModel, PairTokenizer), StartupError> {
    let model = model::load(dir, device, dtype)?;
    let tokenizer = PairTokenizer::load(
        dir,
        config.max_length,
        model.max_positions,
        config.tokenizer_threads(device.is_cpu()),
    )?;
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

fn model_device_is_cpu(device: &str) -> bool {
    device == "cpu"
}

/// Runs the largest batch the policy allows, so a shape that does not fit fails at start, not under load.
/// Its time is the engine's first speed measurement.
fn warm_up(
    model: &LoadedModel,
    policy: &BatchPolicy,
    shape: BatchShape,
    max_length: usize,
) -> Result<Throughput, StartupError> {
    let rows =
        (policy.max_batch_tokens / shape.pair_cost(max_length)).clamp(1, policy.max_batch_size);
    let ids = vec![model.pad_token_id; max_length];
    let types = vec![0; max_length];
    let batch = PackedBatch::from_sequences((0..rows).map(|_| (&ids[..], &types[..])));
    let started = Instant::now();
    engine::run_batch(model, &batch)
        .map_err(|e| StartupError::Config(format!("warm-up batch failed: {e}")))?;
    let cold = started.elapsed();
    // The first run pays one-time costs (allocations, kernel loading on a GPU): a second, smaller run of the
    // same length gives the first speed estimate.
    let timed_rows = (rows / 4).max(1);
    let timed = PackedBatch::from_sequences((0..timed_rows).map(|_| (&ids[..], &types[..])));
    let started = Instant::now();
    engine::run_batch(model, &timed)
        .map_err(|e| StartupError::Config(format!("warm-up batch failed: {e}")))?;
    let warm = started.elapsed();
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
