//! The gRPC transport (tonic): maps `rerank.v1` messages to the core rerank path and errors to status codes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::RerankError;
use crate::proto::reranker_server::Reranker as RerankerRpc;
use crate::proto::{self, rerank_stream_request, rerank_stream_response};
use crate::rerank::{RankedDocument, RerankOptions, RerankOutcome, Reranker, Usage};
use crate::tokenization::Truncation;
use crate::transport::call_limit::CallSlot;

/// The one place rerank errors become gRPC status codes.
impl From<RerankError> for Status {
    fn from(error: RerankError) -> Self {
        match error {
            RerankError::InvalidArgument(message) => Status::invalid_argument(message),
            RerankError::Unavailable(message) => Status::unavailable(message),
            RerankError::Internal(message) => Status::internal(message),
            RerankError::ResourceExhausted(message) => Status::resource_exhausted(message),
            RerankError::DeadlineExceeded(message) => Status::deadline_exceeded(message),
        }
    }
}

/// Serves `rerank.v1.Reranker`; answers UNAVAILABLE until the model is loaded and once draining.
#[derive(Clone)]
pub struct GrpcReranker {
    reranker: Arc<OnceLock<Reranker>>,
    draining: Arc<AtomicBool>,
}

/// Checks `authorization: Bearer <key>` on Reranker calls when an API key is configured, comparing in
/// constant time. Health and reflection are separate services and stay open.
#[derive(Clone)]
pub struct ApiKeyCheck {
    expected: Option<Arc<[u8]>>,
}

impl ApiKeyCheck {
    pub fn new(api_key: Option<&str>) -> Self {
        Self {
            expected: api_key.map(|key| format!("Bearer {key}").into_bytes().into()),
        }
    }
}

impl tonic::service::Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong API key: send `authorization: Bearer <key>`",
            ))
        }
    }
}

/// Byte equality whose time depends only on the lengths, not on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        difference |= usize::from(std::hint::black_box(x ^ y));
    }
    difference == 0
}

/// Messages the server may have in flight towards a slow stream reader before it stops reading its input.
const STREAM_OUTBOX: usize = 16;

impl GrpcReranker {
    pub fn new(reranker: Arc<OnceLock<Reranker>>, draining: Arc<AtomicBool>) -> Self {
        Self { reranker, draining }
    }

    fn reranker(&self) -> Result<&Reranker, Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable("the server is shutting down"));
        }
        self.reranker
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }
}

/// The call's deadline from its `grpc-timeout` header. The server answers a little before the transport's
/// own timer fires, so the caller sees DEADLINE_EXCEEDED rather than a cancelled stream.
pub fn parse_deadline(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Instant>, Status> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let invalid = || Status::invalid_argument("grpc-timeout header is not a valid timeout");
    let text = value.to_str().map_err(|_| invalid())?;
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(invalid()),
    };
    let margin = (timeout / 10).min(Duration::from_millis(20));
    Ok(Instant::now().checked_add(timeout - margin))
}

pub fn request_options(
    top_n: u32,
    return_documents: bool,
    raw_scores: bool,
    truncation: i32,
) -> Result<RerankOptions, Status> {
    let truncation = match proto::Truncation::try_from(truncation) {
        Ok(proto::Truncation::Unspecified) => Truncation::LongestFirst,
        Ok(proto::Truncation::None) => Truncation::Reject,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "truncation: unknown value {truncation}"
            )))
        }
    };
    Ok(RerankOptions {
        top_n: top_n as usize,
        return_documents,
        raw_scores,
        truncation,
        deadline: None,
    })
}

fn ranked(doc: RankedDocument) -> proto::RankedDocument {
    proto::RankedDocument {
        index: doc.index,
        score: doc.score,
        document: doc.document,
    }
}

fn usage(usage: Usage) -> proto::Usage {
    proto::Usage {
        pairs: usage.pairs,
        tokens: usage.tokens,
        queue_ns: usage.queue_ns,
        tokenize_ns: usage.tokenize_ns,
        inference_ns: usage.inference_ns,
        total_ns: usage.total_ns,
    }
}

fn response(outcome: RerankOutcome, model: &str) -> proto::RerankResponse {
    proto::RerankResponse {
        results: outcome.results.into_iter().map(ranked).collect(),
        usage: Some(usage(outcome.usage)),
        model: model.to_string(),
    }
}

fn stream_message(item: rerank_stream_response::Item) -> proto::RerankStreamResponse {
    proto::RerankStreamResponse { item: Some(item) }
}

#[tonic::async_trait]
impl RerankerRpc for GrpcReranker {
    async fn rerank(
        &self,
        request: Request<proto::RerankRequest>,
    ) -> Result<Response<proto::RerankResponse>, Status> {
        let reranker = self.reranker()?;
        let deadline = parse_deadline(request.metadata())?;
        // The call's slot among max_concurrent_calls is held until its work is done, not its response sent.
        let _slot = request.extensions().get::<CallSlot>().cloned();
        let request = request.into_inner();
        let mut options = request_options(
            request.top_n,
            request.return_documents,
            request.raw_scores,
            request.truncation,
        )?;
        options.deadline = deadline;
        let outcome = reranker
            .rerank(&request.query, request.documents, options)
            .await?;
        Ok(Response::new(response(
            outcome,
            &reranker.description().model_id,
        )))
    }

    type RerankStreamStream = ResponseStream;

    async fn rerank_stream(
        &self,
        request: Request<Streaming<proto::RerankStreamRequest>>,
    ) -> Result<Response<Self::RerankStreamStream>, Status> {
        let reranker = self.reranker()?.clone();
        let deadline = parse_deadline(request.metadata())?;
        // The slot lives in the task that runs the stream: a stream that ended (finished, failed, or stalled
        // and aborted) frees it even while its last messages wait for a client that does not read.
        let slot = request.extensions().get::<CallSlot>().cloned();
        let inbound = request.into_inner();
        let (outbox, receiver) = mpsc::channel(STREAM_OUTBOX);
        // The call's error goes out after the messages already in the outbox, even when the outbox is full
        // because the client stopped reading.
        let (error_sender, error) = oneshot::channel::<Status>();
        tokio::spawn(async move {
            let _slot = slot;
            let stats = reranker.stats_home();
            if let Err(status) = drive_stream(reranker, inbound, deadline, &outbox).await {
                if status.code() == tonic::Code::Aborted {
                    stats.stalled_streams.fetch_add(1, Ordering::Relaxed);
                }
                let _ = error_sender.send(status);
            }
        });
        let error = futures::stream::once(error).filter_map(|status| status.ok().map(Err));
        Ok(Response::new(Box::pin(
            ReceiverStream::new(receiver).chain(error),
        )))
    }

    async fn info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let reranker = self.reranker()?;
        Ok(Response::new(info(reranker)))
    }
}

type Outbox = mpsc::Sender<Result<proto::RerankStreamResponse, Status>>;

/// The messages of one RerankStream call, then its error if it failed.
pub type ResponseStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::RerankStreamResponse, Status>> + Send>,
>;

/// Runs one RerankStream: `start`, then document chunks; partial scores flow back as batches finish, and the
/// final ranking follows the client's half-close. Returning (or the client going away) drops the session,
/// which cancels its pairs still queued.
async fn drive_stream(
    reranker: Reranker,
    inbound: Streaming<proto::RerankStreamRequest>,
    deadline: Option<Instant>,
    outbox: &Outbox,
) -> Result<(), Status> {
    let run = run_stream(reranker, inbound, deadline, outbox);
    match deadline {
        None => run.await,
        // Past the deadline the stream's future is dropped, and with it the session and its queued pairs.
        Some(deadline) => tokio::time::timeout_at(deadline.into(), run)
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(
                    "the call's deadline passed before the stream was ranked",
                ))
            }),
    }
}

async fn run_stream(
    reranker: Reranker,
    mut inbound: Streaming<proto::RerankStreamRequest>,
    deadline: Option<Instant>,
    outbox: &Outbox,
) -> Result<(), Status> {
    let start = match inbound.next().await {
        Some(Ok(proto::RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Start(start)),
        })) => start,
        Some(Ok(_)) => {
            return Err(Status::invalid_argument(
                "the first stream message must be `start`",
            ))
        }
        Some(Err(status)) => return Err(status),
        None => {
            return Err(Status::invalid_argument(
                "the stream ended before its `start` message",
            ))
        }
    };
    let options = request_options(
        start.top_n,
        start.return_documents,
        start.raw_scores,
        start.truncation,
    )?;
    // Admission judges each chunk against the stream's deadline, as it does a unary call's.
    let options = RerankOptions {
        deadline,
        ..options
    };
    let mut session = reranker.start(&start.query, options)?;
    // While this many of the stream's pairs wait for scores, the server stops reading the stream; HTTP/2
    // flow control then holds the client back.
    let window = reranker.limits().max_stream_pending_pairs;
    let idle = reranker.limits().stream_idle_timeout;
    loop {
        tokio::select! {
            message = inbound.next(), if session.outstanding() < window => match message {
                Some(Ok(proto::RerankStreamRequest { item: Some(rerank_stream_request::Item::Documents(chunk)) })) => {
                    // Without room the push waits for the stream's own scores (a stream with nothing pending
                    // is refused); they go out right after.
                    session.push(chunk.documents).await?;
                }
                Some(Ok(proto::RerankStreamRequest { item: Some(rerank_stream_request::Item::Start(_)) })) => {
                    return Err(Status::invalid_argument("`start` was sent twice; it must be the first message only"));
                }
                Some(Ok(proto::RerankStreamRequest { item: None })) => {
                    return Err(Status::invalid_argument("a stream message carried neither `start` nor `documents`"));
                }
                Some(Err(status)) => return Err(status),
                None => break,
            },
            scores = session.next_scores(), if session.awaits_scores() => {
                send_scores(outbox, scores?, idle).await?;
            }
            _ = outbox.closed() => return Ok(()),
            _ = tokio::time::sleep(idle), if !session.awaits_scores() => {
                return Err(Status::aborted(format!(
                    "the client sent nothing for {idle:?} (stream_idle_timeout); the stream was ended"
                )));
            }
        }
    }
    while let Some(scores) = session.next_scores().await? {
        send_scores(outbox, Some(scores), idle).await?;
    }
    let model = reranker.description().model_id.clone();
    let outcome = session.finish().await?;
    let final_message = stream_message(rerank_stream_response::Item::Final(response(
        outcome, &model,
    )));
    outbox
        .send_timeout(Ok(final_message), idle)
        .await
        .map_err(|_| Status::cancelled("the client went away or stopped reading"))
}

/// Sends partial scores; a client that reads nothing for `idle` while the outbox is full ends the call, so a
/// stalled reader cannot hold its admitted work forever.
async fn send_scores(
    outbox: &Outbox,
    scores: Option<Vec<RankedDocument>>,
    idle: Duration,
) -> Result<(), Status> {
    let Some(scores) = scores.filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let chunk = proto::ScoredChunk {
        results: scores.into_iter().map(ranked).collect(),
    };
    let message = Ok(stream_message(rerank_stream_response::Item::Scores(chunk)));
    outbox
        .send_timeout(message, idle)
        .await
        .map_err(|error| match error {
            mpsc::error::SendTimeoutError::Timeout(_) => Status::aborted(format!(
                "the client read no scores for {idle:?} (stream_idle_timeout); the stream was ended and its \
                 pending work released"
            )),
            mpsc::error::SendTimeoutError::Closed(_) => Status::cancelled("the client went away"),
        })
}

fn info(reranker: &Reranker) -> proto::InfoResponse {
    let description = reranker.description();
    let limits = reranker.limits();
    let policy = reranker.policy();
    let stats = reranker.stats();
    let pending = reranker.pending();
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    proto::InfoResponse {
        model: description.model_id.clone(),
        architecture: description.architecture.clone(),
        max_length: clamp(description.max_length),
        device: description.device.clone(),
        dtype: description.dtype.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        max_batch_tokens: clamp(policy.max_batch_tokens),
        max_batch_size: clamp(policy.max_batch_size),
        max_wait_us: u64::try_from(policy.max_wait.as_micros()).unwrap_or(u64::MAX),
        max_documents: clamp(limits.max_documents),
        max_document_bytes: clamp(limits.max_document_bytes),
        max_query_bytes: clamp(limits.max_query_bytes),
        max_message_bytes: clamp(description.max_message_bytes),
        activation: description.scoring.name().to_string(),
        num_labels: clamp(description.scoring.num_labels()),
        stats: Some(proto::SchedulerStats {
            batches: stats.batches,
            pairs: stats.pairs,
            padded_tokens: stats.padded_tokens,
            real_tokens: stats.real_tokens,
            padding_ratio: stats.padding_ratio(),
            cancelled_pairs: stats.cancelled_pairs,
            queued_pairs: stats.queued_pairs,
            engine_busy_seconds: stats.engine_busy_seconds,
            tokenizer_busy_seconds: stats.tokenizer_busy_seconds,
            pending_pairs: pending.pairs as u64,
            pending_tokens: pending.tokens as u64,
            held_bytes: pending.bytes as u64,
            tokens_per_second: reranker.tokens_per_second(),
            refused: stats.refused,
            stalled_streams: stats.stalled_streams,
        }),
    }
}
