//! The gRPC transport (tonic): decodes `rerank.v1` messages, calls the rerank core, encodes its answers and
//! maps its errors to status codes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::call_slots::CallSlots;
use crate::error::RerankError;
use crate::lifecycle::Lifecycle;
use crate::proto::reranker_service_server::RerankerService as RerankerRpc;
use crate::proto::{self, rerank_stream_request, rerank_stream_response};
use crate::rerank::clients::ClientId;
use crate::rerank::limits::Limits;
use crate::rerank::{
    EventStream, RankedDocument, RerankOptions, RerankOutcome, Reranker, StreamEvent,
    StreamRequest, Usage,
};
use crate::tokenization::Truncation;
use crate::transport::grpc_gate::record_early;

/// The one place rerank errors become gRPC status codes.
impl From<RerankError> for Status {
    fn from(error: RerankError) -> Self {
        match error {
            RerankError::InvalidArgument(message) | RerankError::TooLarge(message) => {
                Status::invalid_argument(message)
            }
            RerankError::Unauthenticated(message) => Status::unauthenticated(message),
            RerankError::Unavailable(message) => Status::unavailable(message),
            RerankError::Internal(message) => Status::internal(message),
            RerankError::ResourceExhausted { message, .. } => Status::resource_exhausted(message),
            RerankError::DeadlineExceeded(message) | RerankError::RequestTimeout(message) => {
                Status::deadline_exceeded(message)
            }
            RerankError::Aborted(message) => Status::aborted(message),
            RerankError::Cancelled(message) => Status::cancelled(message),
        }
    }
}

/// A transport error on a stream's inbound side, as the core sees it.
fn inbound_error(status: Status) -> RerankError {
    match status.code() {
        tonic::Code::InvalidArgument => RerankError::invalid(status.message()),
        _ => RerankError::Cancelled(format!("the stream's input failed: {}", status.message())),
    }
}

/// Serves `rerank.v1.RerankerService` for whatever the lifecycle holds.
#[derive(Clone)]
pub struct GrpcReranker {
    lifecycle: Arc<Lifecycle>,
    slots: CallSlots,
}

impl GrpcReranker {
    pub fn new(lifecycle: Arc<Lifecycle>, slots: CallSlots) -> Self {
        Self { lifecycle, slots }
    }

    /// A failure before the call reaches the core, counted for `endpoint` like the core counts its own.
    fn early(&self, endpoint: &'static str) -> impl Fn(RerankError) -> Status + '_ {
        move |error| {
            record_early(self.lifecycle.metrics(), endpoint, &error);
            Status::from(error)
        }
    }
}

/// The call's deadline from its `grpc-timeout` header. The server answers a little before the transport's
/// own timer fires, so the caller sees DEADLINE_EXCEEDED rather than a cancelled stream.
pub fn parse_deadline(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<Instant>, RerankError> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let invalid = || RerankError::invalid("grpc-timeout header is not a valid timeout");
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

/// The fields every rerank request shape shares.
struct Requested {
    top_n: u32,
    return_documents: bool,
    raw_scores: bool,
    truncation: i32,
    max_chunks_per_doc: u32,
    instruction: Option<String>,
    cutoff_layer: Option<u32>,
}

fn request_options(limits: &Limits, requested: Requested) -> Result<RerankOptions, RerankError> {
    let truncation = match proto::Truncation::try_from(requested.truncation) {
        Ok(proto::Truncation::Unspecified | proto::Truncation::LongestFirst) => {
            Truncation::LongestFirst
        }
        Ok(proto::Truncation::Reject) => Truncation::Reject,
        Ok(proto::Truncation::ChunkMax) => Truncation::ChunkMax {
            max_chunks: limits.chunks_per_doc(requested.max_chunks_per_doc as usize)?,
        },
        Err(_) => {
            return Err(RerankError::invalid(format!(
                "truncation: unknown value {}",
                requested.truncation
            )))
        }
    };
    Ok(RerankOptions {
        top_n: requested.top_n as usize,
        return_documents: requested.return_documents,
        raw_scores: requested.raw_scores,
        truncation,
        max_document_tokens: None,
        deadline: None,
        instruction: requested.instruction,
        cutoff_layer: requested.cutoff_layer.map(|layer| layer as usize),
        client: None,
    })
}

fn ranked(doc: RankedDocument) -> proto::RankedDocument {
    proto::RankedDocument {
        index: doc.index,
        score: doc.score,
        document: doc.document,
        chunk: doc.chunk,
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

/// The options of a unary Rerank request.
pub fn unary_options(
    limits: &Limits,
    request: &proto::RerankRequest,
) -> Result<RerankOptions, RerankError> {
    let requested = Requested {
        top_n: request.top_n,
        return_documents: request.return_documents,
        raw_scores: request.raw_scores,
        truncation: request.truncation,
        max_chunks_per_doc: request.max_chunks_per_doc,
        instruction: request.instruction.clone(),
        cutoff_layer: request.cutoff_layer,
    };
    request_options(limits, requested)
}

/// One inbound stream message as the core reads it.
pub fn decode_stream_message(
    limits: &Limits,
    message: Result<proto::RerankStreamRequest, Status>,
) -> Result<StreamRequest, RerankError> {
    match message.map_err(inbound_error)?.item {
        Some(rerank_stream_request::Item::Start(start)) => {
            let requested = Requested {
                top_n: start.top_n,
                return_documents: start.return_documents,
                raw_scores: start.raw_scores,
                truncation: start.truncation,
                max_chunks_per_doc: start.max_chunks_per_doc,
                instruction: start.instruction,
                cutoff_layer: start.cutoff_layer,
            };
            Ok(StreamRequest::Start {
                options: request_options(limits, requested)?,
                query: start.query,
            })
        }
        Some(rerank_stream_request::Item::Documents(chunk)) => {
            Ok(StreamRequest::Documents(chunk.documents))
        }
        None => Err(RerankError::invalid(
            "a stream message carried neither `start` nor `documents`",
        )),
    }
}

fn encode_stream_event(model: &str, event: StreamEvent) -> proto::RerankStreamResponse {
    let item = match event {
        StreamEvent::Scores(scores) => rerank_stream_response::Item::Scores(proto::ScoredChunk {
            results: scores.into_iter().map(ranked).collect(),
        }),
        StreamEvent::Final(outcome) => {
            rerank_stream_response::Item::Final(response(outcome, model))
        }
    };
    proto::RerankStreamResponse { item: Some(item) }
}

/// The messages of one RerankStream call, then its error if it failed.
pub type ResponseStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<proto::RerankStreamResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl RerankerRpc for GrpcReranker {
    async fn rerank(
        &self,
        request: Request<proto::RerankRequest>,
    ) -> Result<Response<proto::RerankResponse>, Status> {
        let early = self.early("grpc");
        let reranker = self.lifecycle.reranker().map_err(&early)?;
        let deadline = parse_deadline(request.metadata()).map_err(&early)?;
        let client = request.extensions().get::<ClientId>().cloned();
        // The request has arrived whole (tonic decoded it): now the call takes its slot among
        // max_concurrent_calls, held until its work is done, not its response sent.
        let _slot = self.slots.try_acquire(client.as_ref()).map_err(&early)?;
        let request = request.into_inner();
        let options = RerankOptions {
            deadline,
            client,
            ..unary_options(reranker.limits(), &request).map_err(&early)?
        };
        let outcome = reranker
            .rerank("grpc", &request.query, request.documents, options)
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
        let early = self.early("grpc_stream");
        let reranker = self.lifecycle.reranker().map_err(&early)?.clone();
        let deadline = parse_deadline(request.metadata()).map_err(&early)?;
        let client = request.extensions().get::<ClientId>().cloned();
        let limits = *reranker.limits();
        let caller = client.clone();
        let inbound = request.into_inner().map(move |message| {
            decode_stream_message(&limits, message).map(|decoded| match decoded {
                StreamRequest::Start { query, options } => StreamRequest::Start {
                    query,
                    options: RerankOptions {
                        client: caller.clone(),
                        ..options
                    },
                },
                documents => documents,
            })
        });
        // The stream takes its slot once its `start` message has arrived.
        let slots = self.slots.clone();
        let admit = move || slots.try_acquire(client.as_ref());
        let events: EventStream = reranker.rerank_stream("grpc_stream", inbound, deadline, admit);
        let model = reranker.description().model_id.clone();
        let messages = events.map(move |event| {
            event
                .map(|event| encode_stream_event(&model, event))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(messages)))
    }

    async fn info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        Ok(Response::new(info(self.lifecycle.reranker()?)))
    }
}

/// The server's description, limits and counters.
pub fn info(reranker: &Reranker) -> proto::InfoResponse {
    let description = reranker.description();
    let limits = reranker.limits();
    let policy = reranker.policy();
    let admission = reranker.admission_limits();
    reranker.refresh_gauges();
    let metrics = reranker.metrics();
    let pending = reranker.pending();
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    proto::InfoResponse {
        prompt: description.prompt.as_ref().map(|p| proto::PromptTemplate {
            family: p.family.clone(),
            prefix: p.prefix.clone(),
            body: p.body.clone(),
            suffix: p.suffix.clone(),
            default_instruction: p.default_instruction.clone(),
        }),
        model: description.model_id.clone(),
        architecture: description.architecture.clone(),
        supported_architectures: crate::model::registry::supported()
            .map(String::from)
            .collect(),
        cutoff_layers: description.cutoff_layers.map(|layers| proto::CutoffLayers {
            first: clamp(layers.first),
            last: clamp(layers.last),
            default_layer: clamp(layers.default),
        }),
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
        max_stream_documents: clamp(limits.max_stream_documents),
        max_stream_pending_pairs: clamp(limits.max_stream_pending_pairs),
        stream_idle_timeout_ms: millis(limits.stream_idle_timeout),
        max_pending_pairs: admission.max_pending_pairs as u64,
        max_pending_tokens: admission.max_pending_tokens as u64,
        max_inflight_bytes: admission.max_inflight_bytes as u64,
        max_queue_time_ms: millis(admission.max_queue_time),
        max_concurrent_calls: clamp(limits.max_concurrent_calls),
        chunk_overlap_tokens: clamp(limits.chunk_overlap_tokens),
        max_chunks_per_doc: clamp(limits.max_chunks_per_doc),
        stats: Some(proto::SchedulerStats {
            batches: metrics.batch_pairs.get_sample_count(),
            pairs: metrics.batch_pairs.get_sample_sum() as u64,
            padded_tokens: metrics.device_tokens.get(),
            real_tokens: metrics.real_tokens.get(),
            padding_ratio: metrics.padding_ratio(),
            cancelled_pairs: metrics.cancelled_pairs.get(),
            queued_pairs: metrics.queue_pairs.get().max(0) as u64,
            engine_busy_seconds: metrics.engine_busy.get(),
            tokenizer_busy_seconds: metrics.tokenizer_busy.get(),
            pending_pairs: pending.pairs as u64,
            pending_tokens: pending.tokens as u64,
            held_bytes: pending.bytes as u64,
            tokens_per_second: reranker.tokens_per_second(),
            refused: metrics.refusals_total(),
            stalled_streams: metrics.stalled_streams.get(),
            token_cache_hits: metrics.token_cache_hits.get(),
            token_cache_misses: metrics.token_cache_misses.get(),
        }),
    }
}
