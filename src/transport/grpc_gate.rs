//! What a gRPC rerank call passes before its handler, in the order HTTP applies it too: the API key, then a
//! slot among max_concurrent_calls (taken before the request is read, held until the call's work is done).
//! A call refused here is counted in `rerank_requests_total` like any other.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::error::RerankError;
use crate::metrics::Metrics;
use crate::rerank::access::ApiKey;
use crate::rerank::limits::CallSlots;

/// Wraps the RerankerService. A call's slot travels in its request extensions; the handler keeps it for as
/// long as it works on the call (a stream's task until the stream ends). Info needs the key but no slot.
#[derive(Clone)]
pub struct GrpcGate<S> {
    inner: S,
    api_key: ApiKey,
    slots: CallSlots,
    metrics: Arc<Metrics>,
}

impl<S> GrpcGate<S> {
    pub fn new(inner: S, api_key: ApiKey, slots: CallSlots, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            api_key,
            slots,
            metrics,
        }
    }
}

impl<S: NamedService> NamedService for GrpcGate<S> {
    const NAME: &'static str = S::NAME;
}

/// The `endpoint` label of a rerank method's path; None for Info (not a rerank call).
pub fn endpoint_of(path: &str) -> Option<&'static str> {
    match path.rsplit('/').next() {
        Some("Rerank") => Some("grpc"),
        Some("RerankStream") => Some("grpc_stream"),
        _ => None,
    }
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for GrpcGate<S>
where
    S: Service<
        http::Request<RequestBody>,
        Response = http::Response<ResponseBody>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
    ResponseBody: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResponseBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        let endpoint = endpoint_of(request.uri().path());
        let key = request.headers().get("authorization").map(|v| v.as_bytes());
        let admitted = self.api_key.check(key).and_then(|()| match endpoint {
            Some(_) => self.slots.try_acquire().map(Some),
            None => Ok(None),
        });
        match admitted {
            Ok(slot) => {
                if let Some(slot) = slot {
                    request.extensions_mut().insert(slot);
                }
                boxed(self.inner.call(request))
            }
            Err(refused) => {
                if let Some(endpoint) = endpoint {
                    self.metrics
                        .record_call::<()>(endpoint, &Err(refused.clone()), 0.0);
                }
                let status = Status::from(refused);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The inner service's response with its body as tonic's.
fn boxed<ResponseBody>(
    response: impl std::future::Future<Output = Result<http::Response<ResponseBody>, Infallible>>
        + Send
        + 'static,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    ResponseBody: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResponseBody::Error: Into<tonic::codegen::StdError>,
{
    Box::pin(async move { Ok(response.await?.map(Body::new)) })
}

/// Records a call that failed in its handler before reaching the core (not serving yet, bad options).
pub fn record_early(metrics: &Metrics, endpoint: &str, error: &RerankError) {
    metrics.record_call::<()>(endpoint, &Err(error.clone()), 0.0);
}
