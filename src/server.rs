//! Assembles the server: one listener serving gRPC (rerank, health, reflection) and HTTP/JSON through one
//! router, the lifecycle that health and shutdown read, and the model loading in the background.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::error::StartupError;
use crate::lifecycle::{Lifecycle, State};
use crate::metrics::Metrics;
use crate::proto::reranker_service_server::RerankerServiceServer;
use crate::rerank::access::ApiKey;
use crate::rerank::limits::CallSlots;
use crate::rerank::loading::build_reranker_with;
pub use crate::rerank::loading::{build_reranker, ModelWrapper};
use crate::transport::grpc::GrpcReranker;
use crate::transport::grpc_gate::GrpcGate;
use crate::transport::http::{self, HttpState};
use crate::transport::tls;

/// The gRPC service name health reports on, besides the overall "" entry.
const SERVICE_NAME: &str = "rerank.v1.RerankerService";

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
    lifecycle: Arc<Lifecycle>,
    shutdown: Option<oneshot::Sender<()>>,
    serve: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    health: HealthReporter,
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
                State::Draining => {
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

    /// Graceful shutdown: health turns NOT_SERVING, new rerank calls are refused with UNAVAILABLE (503), the
    /// listener stops, and in-flight calls get `drain_timeout` to finish; then it returns.
    pub async fn shutdown(mut self) -> Result<(), StartupError> {
        // Refuse new calls before health says so, so that a client that sees NOT_SERVING is also refused.
        self.lifecycle.drain();
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
    let metrics = Arc::new(Metrics::new());
    let lifecycle = Lifecycle::new(Arc::clone(&metrics));
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    follow_lifecycle(&lifecycle, health.clone());
    let api_key = ApiKey::new(config.api_key.as_ref().map(|key| key.expose()));
    let slots = CallSlots::new(config.max_concurrent_calls, Arc::clone(&metrics));
    let rerank_service = RerankerServiceServer::new(GrpcReranker::new(Arc::clone(&lifecycle)))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let rerank_service = GrpcGate::new(
        rerank_service,
        api_key.clone(),
        slots.clone(),
        Arc::clone(&metrics),
    );
    let reflection = reflection_services()?;
    let grpc = tonic::service::Routes::new(health_service)
        .add_service(reflection.0)
        .add_service(reflection.1)
        .add_service(rerank_service);
    let http = http::router(HttpState {
        lifecycle: Arc::clone(&lifecycle),
        api_key,
        slots,
        max_body_bytes: config.max_message_bytes,
    });
    let router = grpc
        .into_axum_router()
        .merge(http)
        .fallback(not_found)
        .layer(axum::middleware::from_fn(crate::transport::with_request_id));
    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout));
    let routes = tonic::service::Routes::from(router);
    let stopped = async {
        let _ = shutdown_signal.await;
    };
    let serve = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = tls::server_config(cert, key)?;
            let incoming = tls::incoming(listener, tls);
            tokio::spawn(
                builder
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming, stopped),
            )
        }
        _ => tokio::spawn(
            builder
                .add_routes(routes)
                .serve_with_incoming_shutdown(accept_without_delay(listener), stopped),
        ),
    };
    tracing::info!(%local_addr, "listening for gRPC and HTTP (not serving until the model is loaded)");
    load_in_background(config.clone(), wrapper, Arc::clone(&lifecycle));
    Ok(RunningServer {
        local_addr,
        lifecycle,
        shutdown: Some(shutdown),
        serve,
        health,
        drain_timeout: config.drain_timeout,
    })
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
