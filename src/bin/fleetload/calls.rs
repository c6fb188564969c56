//! The calls fleetload makes beyond the plain ones: a unary call or stream retried once when its first attempt
//! never left the client, and the hostile kinds (cancelled mid-call, streams never read, HTTP clients that hang up).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rerank_server::proto::{
    rerank_stream_request, DocumentChunk, RerankRequest, RerankResponse, RerankStart,
    RerankStreamRequest, RerankStreamResponse,
};

use super::{Load, POOL};

/// Whether a call failed before its request left the client: hyper had it queued for a connection that closed
/// (the server's `max_connection_age` or drain sent GOAWAY). The server never saw it, so it is safe to send
/// again; gRPC's own clients do so transparently (gRFC A6), tonic does not.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        source = error.source();
    }
    false
}

impl Load {
    /// Sends call `n` as a unary Rerank, once more if the first attempt never left the client.
    pub(super) async fn call_unary(
        &self,
        n: u64,
    ) -> Result<tonic::Response<RerankResponse>, tonic::Status> {
        let mut client = self.grpc(n);
        match client.rerank(self.unary_request(n)).await {
            Err(status) if never_sent(&status) => {
                self.unsent_retried.fetch_add(1, Ordering::Relaxed);
                client.rerank(self.unary_request(n)).await
            }
            other => other,
        }
    }

    /// Opens call `n` as a RerankStream sending what `outbound` makes (with the call's deadline when `timed`),
    /// once more if the first attempt never left the client.
    pub(super) async fn open_stream<S>(
        &self,
        n: u64,
        timed: bool,
        outbound: impl Fn() -> S,
    ) -> Result<tonic::Response<tonic::Streaming<RerankStreamResponse>>, tonic::Status>
    where
        S: futures::Stream<Item = RerankStreamRequest> + Send + 'static,
    {
        let request = || {
            let mut request = tonic::Request::new(outbound());
            if timed {
                request.set_timeout(self.args.deadline.into());
            }
            request
        };
        let mut client = self.grpc(n);
        match client.rerank_stream(request()).await {
            Err(status) if never_sent(&status) => {
                self.unsent_retried.fetch_add(1, Ordering::Relaxed);
                client.rerank_stream(request()).await
            }
            other => other,
        }
    }

    pub(super) fn unary_request(&self, n: u64) -> tonic::Request<RerankRequest> {
        let i = self.pick(n);
        let mut request = tonic::Request::new(RerankRequest {
            query: self.pool.queries[i].clone(),
            documents: self.pool.documents[i].clone(),
            ..Default::default()
        });
        request.set_timeout(self.args.deadline.into());
        request
    }

    pub(super) fn stream_messages(&self, n: u64) -> Vec<RerankStreamRequest> {
        let i = self.pick(n);
        let start = RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Start(RerankStart {
                query: self.pool.queries[i].clone(),
                top_n: 5,
                ..Default::default()
            })),
        };
        std::iter::once(start)
            .chain((0..self.args.stream_chunks).map(|c| RerankStreamRequest {
                item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                    documents: self.pool.documents[(i + c + 1) % POOL].clone(),
                })),
            }))
            .collect()
    }

    /// A unary call dropped by its client after a few milliseconds (a user who gave up).
    pub(super) async fn cancelled_unary(self, n: u64) {
        let started = Instant::now();
        let call = self.call_unary(n);
        let outcome = match tokio::time::timeout(Duration::from_millis(5 + n % 40), call).await {
            Err(_) => "cancelled_by_client".to_string(),
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(status)) => code_name(status.code()),
        };
        self.record("cancelled_unary", started, outcome);
    }

    /// A stream whose client sends `start` and one chunk, reads nothing and goes away.
    pub(super) async fn cancelled_stream(self, n: u64) {
        let started = Instant::now();
        // The request side stays open (no half-close), so the call is still running when it is dropped.
        let outbound = || {
            let messages: Vec<RerankStreamRequest> =
                self.stream_messages(n).into_iter().take(2).collect();
            futures::stream::iter(messages).chain(futures::stream::pending())
        };
        let call = async {
            let mut inbound = self.open_stream(n, false, outbound).await?.into_inner();
            inbound.message().await
        };
        let outcome = match tokio::time::timeout(Duration::from_millis(20 + n % 50), call).await {
            Err(_) | Ok(Ok(_)) => "cancelled_by_client".to_string(),
            Ok(Err(status)) => code_name(status.code()),
        };
        self.record("cancelled_stream", started, outcome);
    }

    /// A stream that sends everything and never reads: the server must end it (stream_idle_timeout) once its
    /// unread scores fill the window, or finish it; the client lets go after --unread-hold.
    pub(super) async fn unread_stream(self, n: u64) {
        let started = Instant::now();
        let outbound = || futures::stream::iter(self.stream_messages(n));
        let outcome = match self.open_stream(n, false, outbound).await {
            Ok(response) => {
                let held = response.into_inner();
                tokio::time::sleep(self.args.unread_hold.into()).await;
                drop(held);
                "unread_dropped".to_string()
            }
            Err(status) => code_name(status.code()),
        };
        self.record("unread_stream", started, outcome);
    }

    /// An HTTP/1.1 client that sends its request and closes the connection without waiting for the answer.
    pub(super) async fn http_disconnect(self, n: u64) {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        let body = self.pool.bodies[self.pick(n)].clone();
        let head = format!(
            "POST /v2/rerank HTTP/1.1\r\nhost: load\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let sent = async {
            let mut socket = tokio::net::TcpStream::connect(&self.args.target).await?;
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(&body).await?;
            socket.flush().await
        };
        let outcome = match sent.await {
            Ok(()) => "cancelled_by_client".to_string(),
            Err(_) => "http_conn_error".to_string(),
        };
        self.record("http_disconnect", started, outcome);
    }
}

pub(super) fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}
