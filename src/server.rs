//! Assembles the server: one listener serving gRPC (rerank, health, reflection) and HTTP/JSON through one
//! router (and optionally a plaintext health listener), the lifecycle that health and the drain read, and the
//! model loading in the background.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::assembly::build_reranker_with;
pub use crate::assembly::{build_reranker, ModelWrapper};
use crate::config::{Config, IpRange};
use crate::error::StartupError;
use crate::lifecycle::{Lifecycle, State};
use crate::metrics::Metrics;
use crate::proto::reranker_service_server::RerankerServiceServer;
use crate::transport::access::ApiKey;
use crate::transport::call_slots::CallSlots;
use crate::transport::connections::{self, ConnectionLimits, Listener};
use crate::transport::grpc::GrpcReranker;
use crate::transport::grpc_gate::GrpcGate;
use crate::transport::http::{self, HttpState};
use crate::transport::tls;

/// The gRPC service name health reports on, besides the overall "" entry.
const SERVICE_NAME: &str = "rerank.v1.RerankerService";

/// How long connections get, after drain_timeout has ended their calls with UNAVAILABLE, to carry those
/// answers to their clients before they are dropped.
const FLUSH_TIME: Duration = Duration::from_secs(1);

/// A started server: listening at once (health answers NOT_SERVING) while the model loads.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// The plaintext health listener's address, when `health_port` is set.
    pub health_addr: Option<SocketAddr>,
    lifecycle: Arc<Lifecycle>,
    listener: Listener,
    health_listener: Option<Listener>,
    health: HealthReporter,
    drain_delay: Duration,
    drain_timeout: Duration,
}

impl RunningServer {
    /// Waits until the model is loaded and warmed up (Ok) or failed to load (Err, with why).
    pub async fn ready(&mut self) -> Result<(), StartupError> {
        let mut states = self.lifecycle.watch();
        loop {
            match &*states.borrow_and_update() {
                State::Serving => return Ok(()),
                State::Failed(reason) => return Err(StartupError::Load(reason.clone())),
                State::Draining | State::Stopped => {
                    return Err(StartupError::Load("the server is shutting down".into()))
                }
                State::Loading => {}
            }
            if states.changed().await.is_err() {
                return Err(StartupError::Load("the loader stopped".into()));
            }
        }
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// The drain a load balancer expects: health turns NOT_SERVING at once while calls are still taken for
    /// `drain_delay`; then every connection is closed gracefully (HTTP/2 GOAWAY, HTTP/1.1 after its current
    /// response) and the listener stops; calls in flight get `drain_timeout`, after which those still open end
    /// with UNAVAILABLE. Returns once every connection has ended.
    pub async fn shutdown(self) -> Result<(), StartupError> {
        let delay = tokio::time::sleep(self.drain_delay);
        self.shutdown_after(delay).await
    }

    /// `shutdown`, with the time calls are still taken ended by `lame_duck_over` instead of `drain_delay`.
    pub async fn shutdown_after(
        self,
        lame_duck_over: impl std::future::Future<Output = ()>,
    ) -> Result<(), StartupError> {
        self.lifecycle.drain();
        set_health(&self.health, ServingStatus::NotServing).await;
        tracing::info!(
            drain_delay = ?self.drain_delay,
            "draining: health is NOT_SERVING; calls are still taken until the balancers have noticed"
        );
        lame_duck_over.await;
        tracing::info!(
            drain_timeout = ?self.drain_timeout,
            "closing connections (GOAWAY); calls in flight may finish"
        );
        self.listener.close_gracefully();
        let finished = tokio::time::timeout(self.drain_timeout, self.listener.closed()).await;
        self.lifecycle.stop();
        if finished.is_err() {
            tracing::warn!(
                drain_timeout = ?self.drain_timeout,
                "calls still open after drain_timeout end with UNAVAILABLE"
            );
            let _ = tokio::time::timeout(FLUSH_TIME, self.listener.closed()).await;
            self.listener.close_now();
        }
        if let Some(health) = &self.health_listener {
            health.close_now();
        }
        tracing::info!("drained");
        Ok(())
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Keeps gRPC health in step with the lifecycle: SERVING only while serving.
fn follow_lifecycle(lifecycle: &Arc<Lifecycle>, health: HealthReporter) {
    let mut states = lifecycle.watch();
    tokio::spawn(async move {
        loop {
            let status = match *states.borrow_and_update() {
                State::Serving => ServingStatus::Serving,
                _ => ServingStatus::NotServing,
            };
            set_health(&health, status).await;
            if states.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Binds the listener and starts serving; the model loads in the background.
pub async fn start(config: Config) -> Result<RunningServer, StartupError> {
    start_with(config, None).await
}

/// `start`, with the model wrapped by `wrapper`.
pub async fn start_with(
    config: Config,
    wrapper: Option<ModelWrapper>,
) -> Result<RunningServer, StartupError> {
    let listener = TcpListener::bind(config.listen_addr()?).await?;
    let local_addr = listener.local_addr()?;
    connections::raise_open_files_limit(config.max_connections);
    let metrics = Arc::new(Metrics::new());
    let lifecycle = Lifecycle::new(Arc::clone(&metrics));
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    follow_lifecycle(&lifecycle, health.clone());
    let (app, http_state) = app(&config, &lifecycle, health_service.clone(), &metrics)?;
    let limits = connection_limits(&config);
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let listener = Listener::serve(listener, tls, app, limits.clone(), Arc::clone(&metrics));
    tracing::info!(%local_addr, "listening for gRPC and HTTP (not serving until the model is loaded)");
    let (health_listener, health_addr) =
        serve_health(&config, health_service, http_state, limits, &metrics).await?;
    load_in_background(config.clone(), wrapper, Arc::clone(&lifecycle));
    Ok(RunningServer {
        local_addr,
        health_addr,
        lifecycle,
        listener,
        health_listener,
        health,
        drain_delay: config.drain_delay,
        drain_timeout: config.drain_timeout,
    })
}

/// The router of the main port: gRPC (rerank behind its gate, health, reflection) and HTTP, with the
/// client and request-id layers.
fn app(
    config: &Config,
    lifecycle: &Arc<Lifecycle>,
    health_service: HealthServer<impl Health>,
    metrics: &Arc<Metrics>,
) -> Result<(axum::Router, HttpState), StartupError> {
    let api_key = ApiKey::new(config.api_key.as_ref().map(|key| key.expose()));
    let slots = CallSlots::new(
        config.max_concurrent_calls,
        config.max_client_share,
        Arc::clone(metrics),
    );
    let rerank_service =
        RerankerServiceServer::new(GrpcReranker::new(Arc::clone(lifecycle), slots.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
    let rerank_service = GrpcGate::new(
        rerank_service,
        api_key.clone(),
        config.request_read_timeout,
        Arc::clone(lifecycle),
    );
    let reflection = reflection_services()?;
    let grpc = tonic::service::Routes::new(health_service)
        .add_service(reflection.0)
        .add_service(reflection.1)
        .add_service(rerank_service);
    let http_state = HttpState {
        lifecycle: Arc::clone(lifecycle),
        api_key,
        slots,
        max_body_bytes: config.max_message_bytes,
        read_timeout: config.request_read_timeout,
    };
    let trusted: Arc<[IpRange]> = config.trusted_proxies.clone().into();
    let app = grpc
        .into_axum_router()
        .merge(http::router(http_state.clone()))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            trusted,
            crate::transport::with_client,
        ))
        .layer(axum::middleware::from_fn(crate::transport::with_request_id));
    Ok((app, http_state))
}

/// The plaintext health port, when `health_port` is set.
async fn serve_health(
    config: &Config,
    health_service: HealthServer<impl Health>,
    http_state: HttpState,
    limits: ConnectionLimits,
    metrics: &Arc<Metrics>,
) -> Result<(Option<Listener>, Option<SocketAddr>), StartupError> {
    let port = match config.health_port {
        0 => return Ok((None, None)),
        port => port,
    };
    let bound = TcpListener::bind(SocketAddr::new(config.listen_addr()?.ip(), port)).await?;
    let addr = bound.local_addr()?;
    let app = tonic::service::Routes::new(health_service)
        .into_axum_router()
        .merge(http::health_router(http_state))
        .fallback(not_found);
    tracing::info!(%addr, "health (gRPC and GET /health, plaintext) listening");
    let served = Listener::serve(bound, None, app, limits, Arc::clone(metrics));
    Ok((Some(served), Some(addr)))
}

fn connection_limits(config: &Config) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: config.max_connections,
        max_connection_age: Some(config.max_connection_age).filter(|age| !age.is_zero()),
        age_grace: config.drain_timeout,
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        max_headers: config.max_headers,
        max_header_bytes: config.max_header_bytes,
        max_concurrent_streams: config.max_concurrent_streams,
        keepalive_interval: config.keepalive_interval,
        keepalive_timeout: config.keepalive_timeout,
    }
}

/// Loads the model; the lifecycle then serves it, or fails with why. A stopped engine fails it later.
fn load_in_background(config: Config, wrapper: Option<ModelWrapper>, lifecycle: Arc<Lifecycle>) {
    tokio::spawn(async move {
        let metrics = Arc::clone(lifecycle.metrics());
        match build_reranker_with(&config, wrapper, metrics).await {
            Ok(reranker) => {
                let watched = reranker.clone();
                let engine_lifecycle = Arc::clone(&lifecycle);
                tokio::spawn(async move {
                    watched.engine_stopped().await;
                    tracing::error!("the inference engine stopped; health is NOT_SERVING");
                    engine_lifecycle.fail("the inference engine stopped");
                });
                lifecycle.serve(reranker);
                tracing::info!("model loaded and warmed up; SERVING");
            }
            Err(e) => {
                tracing::error!(error = %e, "model failed to load");
                lifecycle.fail(e.to_string());
            }
        }
    });
}

/// Unknown paths: gRPC's UNIMPLEMENTED for gRPC requests, a JSON 404 otherwise.
async fn not_found(request: axum::extract::Request) -> Response {
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        return tonic::Status::unimplemented(format!("unknown method {}", request.uri().path()))
            .into_http::<axum::body::Body>();
    }
    let message = format!(
        "no such endpoint: {} {}",
        request.method(),
        request.uri().path()
    );
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "message": message })),
    )
        .into_response()
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
