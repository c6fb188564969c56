//! The HTTP/JSON transport (axum, on the gRPC listener): the rerank APIs users' clients already speak
//! (Cohere v1/v2, Jina, TEI; one file per shape), health, info, Prometheus metrics and the OpenAPI document.
//! Errors are `{"message": ...}` with the status each core error maps to here, in one place.

mod cohere;
mod common;
pub mod openapi;
mod tei;

pub use common::{parse, Parsed, Shape};

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::RerankError;
use crate::lifecycle::{Lifecycle, State as Life};
use crate::rerank::clients::ClientId;
use crate::rerank::{Receiving, Reranker};
use crate::transport::access::ApiKey;
use crate::transport::call_slots::{CallSlot, CallSlots};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub lifecycle: Arc<Lifecycle>,
    pub api_key: ApiKey,
    pub slots: CallSlots,
    /// Largest request body read (max_message_bytes).
    pub max_body_bytes: usize,
    /// A body must arrive whole within this time (request_read_timeout).
    pub read_timeout: Duration,
}

impl HttpState {
    fn reranker(&self) -> Result<&Reranker, HttpError> {
        Ok(self.lifecycle.reranker()?)
    }

    /// The call's slot among max_concurrent_calls and its client's share, taken once its body has arrived.
    fn call_slot(&self, client: Option<&ClientId>) -> Result<CallSlot, HttpError> {
        Ok(self.slots.try_acquire(client)?)
    }
}

/// The HTTP routes. Rerank calls and /info need the API key when one is set; health and metrics stay open
/// for probes and scrapers.
pub fn router(state: HttpState) -> Router {
    let guarded = Router::new()
        .route("/v2/rerank", post(cohere::v2))
        .route("/v1/rerank", post(cohere::v1))
        .route("/rerank", post(tei::rerank))
        .route("/info", get(info))
        .route_layer(middleware::from_fn_with_state(state.clone(), check_api_key))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_early_failures,
        ));
    Router::new()
        .merge(guarded)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_document))
        .with_state(state)
}

/// GET /health alone: the plaintext health listener's HTTP side.
pub fn health_router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .with_state(state)
}

/// A rerank error as an HTTP response.
pub struct HttpError {
    error: RerankError,
    /// Whether the core already counted the call (it does for every call it ran).
    counted: bool,
}

impl From<RerankError> for HttpError {
    fn from(error: RerankError) -> Self {
        Self {
            error,
            counted: false,
        }
    }
}

impl HttpError {
    /// An error of a call the core ran, and so counted.
    pub fn counted(error: RerankError) -> Self {
        Self {
            error,
            counted: true,
        }
    }
}

/// A failure before the core that `count_early_failures` still has to count.
#[derive(Clone)]
struct Uncounted(RerankError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match &self.error {
            RerankError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            RerankError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RerankError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            RerankError::ResourceExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            RerankError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RerankError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            RerankError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RerankError::Internal(_) | RerankError::Aborted(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // The client is gone; nobody reads this (499 in nginx's terms).
            RerankError::Cancelled(_) => StatusCode::BAD_REQUEST,
        };
        let body = Json(serde_json::json!({ "message": self.error.to_string() }));
        let mut response = (status, body).into_response();
        if !self.counted {
            response.extensions_mut().insert(Uncounted(self.error));
        }
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn check_api_key(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Result<Response, HttpError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    state.api_key.check(given)?;
    Ok(next.run(request).await)
}

/// Reads a body within max_message_bytes and request_read_timeout, its bytes counted in `receiving` as they
/// arrive: 413 past the size, 408 past the time, 429 past the bytes the server (or this client) may hold, 400
/// for a body that could not be read.
async fn read_body(
    state: &HttpState,
    body: Body,
    receiving: &mut Receiving,
) -> Result<Vec<u8>, HttpError> {
    let too_large = || {
        RerankError::too_large(format!(
            "the request body is over the limit of {} bytes (max_message_bytes)",
            state.max_body_bytes
        ))
    };
    // A body that announces more than the limit is refused before any of it is read.
    let announced = http_body::Body::size_hint(&body).lower();
    if announced > state.max_body_bytes as u64 {
        return Err(too_large().into());
    }
    let read = async {
        let mut body = http_body_util::Limited::new(body, state.max_body_bytes);
        // The frames as they came (no copy, no regrowing buffer); joined once the body is whole.
        let mut received = Vec::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            let frame = frame.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    RerankError::invalid(format!("the request body could not be read: {e}"))
                }
            })?;
            if let Ok(data) = frame.into_data() {
                receiving.add(data.len())?;
                received.push(data);
            }
        }
        Ok::<_, RerankError>(received.concat())
    };
    match tokio::time::timeout(state.read_timeout, read).await {
        Ok(read) => Ok(read?),
        Err(_) => Err(RerankError::RequestTimeout(format!(
            "the request body did not arrive within {:?} (request_read_timeout)",
            state.read_timeout
        ))
        .into()),
    }
}

/// The `endpoint` label of a rerank route; None for /info.
fn endpoint_of(path: &str) -> Option<&'static str> {
    match path {
        "/v2/rerank" => Some("http_v2"),
        "/v1/rerank" => Some("http_v1"),
        "/rerank" => Some("http_tei"),
        _ => None,
    }
}

/// Counts rerank calls refused before they reached the core (API key, call slots, not serving, malformed
/// requests), so `rerank_requests_total` has every call once; the core counts the calls it runs.
async fn count_early_failures(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = endpoint_of(request.uri().path());
    let mut response = next.run(request).await;
    if let (Some(endpoint), Some(Uncounted(error))) =
        (endpoint, response.extensions_mut().remove::<Uncounted>())
    {
        state
            .lifecycle
            .metrics()
            .record_call::<()>(endpoint, &Err(error), 0.0);
    }
    response
}

/// The call's deadline from `x-request-timeout` ("2s", "500ms", or seconds as a number).
fn deadline(headers: &HeaderMap) -> Result<Option<Instant>, HttpError> {
    let Some(value) = headers.get("x-request-timeout") else {
        return Ok(None);
    };
    let invalid = || -> HttpError {
        RerankError::invalid("x-request-timeout is not a valid duration (e.g. \"2s\")").into()
    };
    let text = value.to_str().map_err(|_| invalid())?.trim();
    let timeout = match text.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| invalid())?,
        Err(_) => humantime::parse_duration(text).map_err(|_| invalid())?,
    };
    Ok(Instant::now().checked_add(timeout))
}

/// GET /health's body.
#[derive(Serialize, ToSchema)]
pub struct HealthBody {
    /// "serving"; otherwise "loading", "draining" or "failed: <why>".
    status: String,
}

/// 200 only while serving; 503 while loading, draining or failed.
#[utoipa::path(
    get,
    path = "/health",
    responses(
        (status = 200, description = "Serving", body = HealthBody),
        (status = 503, description = "Loading, draining or failed: go to another replica", body = HealthBody)
    )
)]
async fn health(State(state): State<HttpState>) -> Response {
    let (status, text) = match state.lifecycle.state() {
        Life::Serving => (StatusCode::OK, "serving".to_string()),
        Life::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading".to_string()),
        Life::Draining | Life::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "draining".to_string()),
        Life::Failed(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {reason}")),
    };
    (status, Json(HealthBody { status: text })).into_response()
}

/// The model, its limits and the scheduler's counters (the gRPC Info response as JSON).
#[utoipa::path(
    get,
    path = "/info",
    responses(
        (status = 200, description = "Model, limits and counters", body = crate::proto::InfoResponse),
        (status = 401, description = "The API key is missing or wrong", body = common::ErrorBody),
        (status = 503, description = "The model is loading, or the server is shutting down", body = common::ErrorBody)
    )
)]
async fn info(State(state): State<HttpState>) -> Result<Response, HttpError> {
    let reranker = state.reranker()?;
    Ok(Json(crate::transport::grpc::info(reranker)).into_response())
}

/// Every metric in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"))
)]
async fn metrics(State(state): State<HttpState>) -> Response {
    if let Ok(reranker) = state.lifecycle.reranker() {
        reranker.refresh_gauges();
    }
    let text = state.lifecycle.metrics().render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// GET /openapi.json: this API as OpenAPI 3.1, completed with the served model's names and limits.
async fn openapi_document(State(state): State<HttpState>) -> Response {
    Json(openapi::document(state.lifecycle.reranker().ok())).into_response()
}
