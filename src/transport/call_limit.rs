//! The core's cap on rerank calls in progress applied to gRPC calls (Rerank and RerankStream, from arrival
//! until the handler's work is done): past it a call is refused at once with RESOURCE_EXHAUSTED, before its
//! request is read.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::rerank::limits::CallSlots;

/// Wraps a gRPC service so that its rerank calls take a slot of `CallSlots`. A call's slot travels in its
/// request extensions; the handler keeps it for as long as it works on the call (a stream's task until the
/// stream ends). Info calls are not counted.
#[derive(Clone)]
pub struct CallLimit<S> {
    inner: S,
    slots: CallSlots,
}

impl<S> CallLimit<S> {
    pub fn new(inner: S, slots: CallSlots) -> Self {
        Self { inner, slots }
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
        let slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(refused) => {
                let status = Status::from(refused);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        request.extensions_mut().insert(slot);
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
