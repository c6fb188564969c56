//! Network transports over the one rerank core. Each stays thin: decode, call `Reranker`, encode. gRPC and
//! HTTP share one listener and one router; every call gets a request id and a tracing span here.

pub mod grpc;
pub mod grpc_gate;
pub mod http;
pub mod tls;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header (gRPC metadata key) that carries a call's request id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Takes the client's `x-request-id` (up to 128 visible ASCII characters) or makes one, runs the call inside
/// a span that carries it (tokenize, queue and batch events of the call are logged within), and returns it
/// in the response headers (gRPC: initial metadata).
pub async fn with_request_id(mut request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| v.len() <= 128 && v.to_str().is_ok_and(|s| !s.is_empty()))
        .cloned();
    let id = given.unwrap_or_else(|| {
        HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    });
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let span = tracing::info_span!(
        "call",
        request_id = id.to_str().unwrap_or_default(),
        path = request.uri().path()
    );
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}
