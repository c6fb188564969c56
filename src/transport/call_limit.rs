//! The global limit on Reranker calls in progress (unary and streams alike, from arrival until the response
//! has been sent): past it a call is refused at once with RESOURCE_EXHAUSTED, before its request is read.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Bytes, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Wraps a gRPC service so that at most `max_calls` of its calls are in progress at once. The permit of a
/// call lives in its response body, so a stream holds it until it ends.
#[derive(Clone)]
pub struct CallLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max_calls: usize,
}

impl<S> CallLimit<S> {
    pub fn new(inner: S, max_calls: usize) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_calls)),
            max_calls,
        }
    }
}

impl<S: NamedService> NamedService for CallLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for CallLimit<S>
where
    S: Service<
        http::Request<RequestBody>,
        Response = http::Response<ResponseBody>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
    ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResponseBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            let status = Status::resource_exhausted(format!(
                "the server has {} calls in progress (max_concurrent_calls); retry later",
                self.max_calls
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                Body::new(HoldsPermit {
                    body: Body::new(body),
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body that keeps its call's permit until it is dropped.
struct HoldsPermit {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for HoldsPermit {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
