//! What a gRPC rerank call passes before its handler, as HTTP does: the API key first; then, for unary calls,
//! a time limit on the arrival of the request message. Call slots are taken by the handlers, once a call's
//! request has arrived. A call refused here is counted in `rerank_requests_total` like any other.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::server::NamedService;
use tonic::Status;

use crate::error::RerankError;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::rerank::clients::ClientId;
use crate::rerank::Receiving;
use crate::transport::access::ApiKey;

/// Wraps the RerankerService: checks the API key (Info too), and bounds how long a unary call's request may
/// take to arrive (request_read_timeout) and, as admission's request bytes, what it holds while it arrives.
#[derive(Clone)]
pub struct GrpcGate<S> {
    inner: S,
    api_key: ApiKey,
    read_timeout: Duration,
    lifecycle: Arc<Lifecycle>,
}

impl<S> GrpcGate<S> {
    pub fn new(
        inner: S,
        api_key: ApiKey,
        read_timeout: Duration,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Self {
            inner,
            api_key,
            read_timeout,
            lifecycle,
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

impl<S, ResponseBody> Service<http::Request<Body>> for GrpcGate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
    ResponseBody: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResponseBody::Error: Into<StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let endpoint = endpoint_of(request.uri().path());
        let key = request.headers().get("authorization").map(|v| v.as_bytes());
        let metrics = Arc::clone(self.lifecycle.metrics());
        if let Err(refused) = self.api_key.check(key) {
            if let Some(endpoint) = endpoint {
                metrics.record_call::<()>(endpoint, &Err(refused.clone()), 0.0);
            }
            let status = Status::from(refused);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // A stream's first message has its own limit (the core's); a unary call's message must arrive whole.
        let request = if endpoint == Some("grpc_stream") {
            request
        } else {
            let client = request.extensions().get::<ClientId>().cloned();
            let receiving = endpoint
                .and_then(|_| self.lifecycle.reranker().ok())
                .map(|reranker| reranker.receiving(client));
            let timed = ReadWithin::new(self.read_timeout, endpoint, metrics, receiving);
            request.map(|body| Body::new(timed.wrap(body)))
        };
        boxed(self.inner.call(request))
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
    ResponseBody::Error: Into<StdError>,
{
    Box::pin(async move { Ok(response.await?.map(Body::new)) })
}

/// Records a call that failed in its handler before reaching the core (not serving yet, bad options).
pub fn record_early(metrics: &Metrics, endpoint: &str, error: &RerankError) {
    metrics.record_call::<()>(endpoint, &Err(error.clone()), 0.0);
}

/// A time limit on a request body's arrival, counted from its headers, and its bytes held in admission.
struct ReadWithin {
    timeout: Duration,
    endpoint: Option<&'static str>,
    metrics: Arc<Metrics>,
    receiving: Option<Receiving>,
}

impl ReadWithin {
    fn new(
        timeout: Duration,
        endpoint: Option<&'static str>,
        metrics: Arc<Metrics>,
        receiving: Option<Receiving>,
    ) -> Self {
        Self {
            timeout,
            endpoint,
            metrics,
            receiving,
        }
    }

    fn wrap(self, body: Body) -> TimedBody {
        TimedBody {
            inner: body,
            due: Some(Box::pin(tokio::time::sleep(self.timeout))),
            limit: self,
        }
    }
}

/// A request body that fails with DEADLINE_EXCEEDED when it has not ended by its due time.
struct TimedBody {
    inner: Body,
    /// None once the body has ended.
    due: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: ReadWithin,
}

impl TimedBody {
    /// Counts the call that ends here, before its handler could.
    fn fail(&self, error: &RerankError) {
        if let Some(endpoint) = self.limit.endpoint {
            record_early(&self.limit.metrics, endpoint, error);
        }
    }
}

impl http_body::Body for TimedBody {
    type Data = tonic::codegen::Bytes;
    type Error = StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.due = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                let counted = match (frame.data_ref(), self.limit.receiving.as_mut()) {
                    (Some(data), Some(receiving)) => receiving.add(data.len()),
                    _ => Ok(()),
                };
                match counted {
                    Ok(()) => Poll::Ready(Some(Ok(frame))),
                    Err(refused) => {
                        self.fail(&refused);
                        Poll::Ready(Some(Err(Box::new(Status::from(refused)))))
                    }
                }
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Pending => match self.due.as_mut().map(|due| due.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    self.due = None;
                    let error = RerankError::RequestTimeout(format!(
                        "the request did not arrive within {:?} (request_read_timeout)",
                        self.limit.timeout
                    ));
                    self.fail(&error);
                    Poll::Ready(Some(Err(Box::new(Status::from(error)))))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_request_body_that_does_not_end_in_time_fails_with_deadline_exceeded() {
        let metrics = Arc::new(Metrics::new());
        let never_ends = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<http_body::Frame<tonic::codegen::Bytes>, Status>,
        >());
        let limit = ReadWithin::new(
            Duration::from_millis(20),
            Some("grpc"),
            Arc::clone(&metrics),
            None,
        );
        let mut body = limit.wrap(Body::new(never_ends));
        let error = body
            .frame()
            .await
            .expect("a frame")
            .expect_err("the body timed out");
        let status = error.downcast::<Status>().expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["grpc", "request_timeout"])
                .get(),
            1
        );

        let whole = Body::new(http_body_util::Full::new(
            tonic::codegen::Bytes::from_static(b"x"),
        ));
        let limit = ReadWithin::new(Duration::from_millis(20), None, metrics, None);
        let collected = limit
            .wrap(whole)
            .collect()
            .await
            .expect("a body that ends in time");
        assert_eq!(collected.to_bytes().as_ref(), b"x");
    }
}
