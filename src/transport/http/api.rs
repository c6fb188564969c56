//! The JSON shapes of the rerank APIs clients already use — Cohere v2, Cohere v1 / Jina, and TEI — decoded
//! into one core call and encoded back.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{deadline, read_json, HttpError, HttpState};
use crate::error::RerankError;
use crate::rerank::clients::ClientId;
use crate::rerank::limits::Limits;
use crate::rerank::{RankedDocument, RerankOptions, RerankOutcome, Reranker};
use crate::tokenization::Truncation;

/// A document as Cohere v1 and Jina accept it: a string or an object with `text`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    fn into_text(self) -> String {
        match self {
            Self::Text(text) | Self::Object { text } => text,
        }
    }
}

/// Fields every shape shares; absent and null mean the server's default. Unknown fields are ignored, as the
/// hosted APIs grow fields clients then send.
#[derive(Deserialize, Default)]
struct Common {
    model: Option<String>,
    top_n: Option<usize>,
    return_documents: Option<bool>,
    /// "longest_first" (default), "reject" or "chunk_max".
    truncation: Option<String>,
    /// Cohere v1: windows per long document; setting it selects chunk_max.
    max_chunks_per_doc: Option<usize>,
    /// Cohere v2: documents are first cut to this many tokens.
    max_tokens_per_doc: Option<usize>,
    rank_fields: Option<Vec<String>>,
    /// Instruction-following rerankers (Qwen3-Reranker): the task instruction instead of the model's default.
    instruction: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct CohereRequest {
    query: String,
    documents: Vec<Document>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
pub(super) struct TeiRequest {
    query: String,
    texts: Vec<String>,
    raw_scores: Option<bool>,
    return_text: Option<bool>,
    truncate: Option<bool>,
    truncation_direction: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Serialize)]
struct CohereResult {
    index: u32,
    relevance_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    document: Option<DocumentText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk: Option<u32>,
}

#[derive(Serialize)]
struct DocumentText {
    text: String,
}

/// Cohere's response (v2; v1 and Jina add `model` and `usage`). Typed, so scores keep their f32 digits.
#[derive(Serialize)]
struct CohereResponse {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    results: Vec<CohereResult>,
    meta: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct TeiResult {
    index: u32,
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk: Option<u32>,
}

/// The options of one call from the shared fields; `truncate` is TEI's flag (false = reject over-long pairs).
fn options(
    reranker: &Reranker,
    common: &Common,
    truncate: Option<bool>,
    call: &Call,
) -> Result<RerankOptions, HttpError> {
    let headers = &call.headers;
    let description = reranker.description();
    if let Some(model) = common
        .model
        .as_deref()
        .filter(|m| !description.answers_to(m))
    {
        return Err(RerankError::invalid(format!(
            "model {model:?} is not served here; this server serves {:?}",
            description.model_id
        ))
        .into());
    }
    if let Some(fields) = &common.rank_fields {
        if fields.iter().any(|field| field != "text") {
            return Err(RerankError::invalid("rank_fields: only \"text\" is supported").into());
        }
    }
    let truncation = truncation(reranker.limits(), common, truncate)?;
    if matches!(truncation, Truncation::ChunkMax { .. }) && common.max_tokens_per_doc.is_some() {
        return Err(RerankError::invalid(
            "max_tokens_per_doc cuts documents, chunk_max scores them whole: choose one",
        )
        .into());
    }
    Ok(RerankOptions {
        top_n: common.top_n.unwrap_or(0),
        return_documents: common.return_documents.unwrap_or(false),
        raw_scores: false,
        truncation,
        max_document_tokens: common.max_tokens_per_doc,
        deadline: deadline(headers)?,
        instruction: common.instruction.clone(),
        client: call.client.clone(),
    })
}

fn truncation(
    limits: &Limits,
    common: &Common,
    truncate: Option<bool>,
) -> Result<Truncation, HttpError> {
    let chunked = |requested: usize| -> Result<Truncation, HttpError> {
        Ok(Truncation::ChunkMax {
            max_chunks: limits.chunks_per_doc(requested)?,
        })
    };
    match (
        common.truncation.as_deref(),
        common.max_chunks_per_doc,
        truncate,
    ) {
        (Some("chunk_max"), chunks, _) | (None, chunks @ Some(_), _) => {
            chunked(chunks.unwrap_or(0))
        }
        (Some("longest_first"), _, _) | (None, None, None | Some(true)) => {
            Ok(Truncation::LongestFirst)
        }
        (Some("reject"), _, _) | (None, None, Some(false)) => Ok(Truncation::Reject),
        (Some(other), _, _) => Err(RerankError::invalid(format!(
            "truncation {other:?}: expected \"longest_first\", \"reject\" or \"chunk_max\""
        ))
        .into()),
    }
}

/// Cohere bills one search unit per query with up to 100 documents (each window of a long document counts).
fn search_units(outcome: &RerankOutcome) -> u32 {
    outcome.usage.pairs.div_ceil(100).max(1)
}

fn cohere_results(results: Vec<RankedDocument>) -> Vec<CohereResult> {
    results
        .into_iter()
        .map(|doc| CohereResult {
            index: doc.index,
            relevance_score: doc.score,
            document: doc.document.map(|text| DocumentText { text }),
            chunk: doc.chunk,
        })
        .collect()
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default()
}

/// What a handler takes from the HTTP request besides its body.
struct Call {
    headers: HeaderMap,
    client: Option<ClientId>,
}

fn split(request: Request) -> (Call, Body) {
    let (parts, body) = request.into_parts();
    let client = parts.extensions.get::<ClientId>().cloned();
    let call = Call {
        headers: parts.headers,
        client,
    };
    (call, body)
}

/// Decodes a Cohere-shaped request and runs it: the part v1 and v2 share.
async fn cohere_call(
    state: &HttpState,
    endpoint: &'static str,
    call: &Call,
    body: Body,
) -> Result<(Reranker, RerankOutcome), HttpError> {
    let reranker = state.reranker()?.clone();
    let request: CohereRequest = read_json(state, body).await?;
    let _slot = state.call_slot(call.client.as_ref())?;
    let options = options(&reranker, &request.common, None, call)?;
    let documents = request
        .documents
        .into_iter()
        .map(Document::into_text)
        .collect();
    let outcome = reranker
        .rerank(endpoint, &request.query, documents, options)
        .await
        .map_err(HttpError::counted)?;
    Ok((reranker, outcome))
}

/// `POST /v2/rerank`: Cohere v2.
pub(super) async fn cohere_v2(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, HttpError> {
    let (call, body) = split(request);
    let (_, outcome) = cohere_call(&state, "http_v2", &call, body).await?;
    let body = CohereResponse {
        id: request_id(&call.headers),
        model: None,
        meta: json!({
            "api_version": { "version": "2" },
            "billed_units": { "search_units": search_units(&outcome) },
            "tokens": { "input_tokens": outcome.usage.tokens, "output_tokens": 0 },
        }),
        usage: None,
        results: cohere_results(outcome.results),
    };
    Ok(Json(body).into_response())
}

/// `POST /v1/rerank`: Cohere v1 and Jina (documents as strings or `{text}` objects).
pub(super) async fn cohere_v1(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, HttpError> {
    let (call, body) = split(request);
    let (reranker, outcome) = cohere_call(&state, "http_v1", &call, body).await?;
    let tokens = outcome.usage.tokens;
    let body = CohereResponse {
        id: request_id(&call.headers),
        model: Some(reranker.description().model_id.clone()),
        meta: json!({
            "api_version": { "version": "1" },
            "billed_units": { "search_units": search_units(&outcome) },
        }),
        usage: Some(json!({ "total_tokens": tokens, "prompt_tokens": tokens })),
        results: cohere_results(outcome.results),
    };
    Ok(Json(body).into_response())
}

/// `POST /rerank`: text-embeddings-inference. A list of `{index, score, text?}`, highest first.
pub(super) async fn tei(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, HttpError> {
    let (call, body) = split(request);
    let reranker = state.reranker()?.clone();
    let request: TeiRequest = read_json(&state, body).await?;
    let _slot = state.call_slot(call.client.as_ref())?;
    if let Some(direction) = request.truncation_direction.as_deref() {
        if !direction.eq_ignore_ascii_case("right") {
            return Err(RerankError::invalid(format!(
                "truncation_direction {direction:?}: only \"Right\" is supported (pairs keep their first tokens)"
            ))
            .into());
        }
    }
    let mut options = options(&reranker, &request.common, request.truncate, &call)?;
    options.raw_scores = request.raw_scores.unwrap_or(false);
    options.return_documents = request.return_text.unwrap_or(false);
    let outcome = reranker
        .rerank("http_tei", &request.query, request.texts, options)
        .await
        .map_err(HttpError::counted)?;
    let results: Vec<TeiResult> = outcome
        .results
        .into_iter()
        .map(|doc| TeiResult {
            index: doc.index,
            score: doc.score,
            text: doc.document,
            chunk: doc.chunk,
        })
        .collect();
    Ok(Json(results).into_response())
}

/// `GET /info`: the gRPC Info response as JSON.
pub(super) async fn info(State(state): State<HttpState>) -> Result<Response, HttpError> {
    let reranker = state.reranker()?;
    Ok(Json(crate::transport::grpc::info(reranker)).into_response())
}
