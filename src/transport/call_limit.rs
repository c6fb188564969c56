//! The global limit on rerank calls in progress (Rerank and RerankStream, from arrival until the handler's
//! work is done): past it a call is refused at once with RESOURCE_EXHAUSTED, before its request is read.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Wraps a gRPC service so that at most `max_calls` rerank calls are in progress at once. A call's slot
/// travels in its request extensions; the handler keeps it for as long as it works on the call (a stream's
/// task until the stream ends). Info calls are not counted.
#[derive(Clone)]
pub struct CallLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max_calls: usize,
}

/// A call's slot among max_concurrent_calls; the slot frees when the last clone is dropped.
#[derive(Clone)]
pub struct CallSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

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
        if request.uri().path().ends_with("/Info") {
            return boxed(self.inner.call(request));
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            let status = Status::resource_exhausted(format!(
                "the server has {} calls in progress (max_concurrent_calls); retry later",
                self.max_calls
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        request.extensions_mut().insert(CallSlot(Arc::new(permit)));
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
    ResponseBody::Error: Into<tonic::codegen::StdError>,
{
    Box::pin(async move { Ok(response.await?.map(Body::new)) })
}
