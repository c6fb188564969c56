//! Cohere's rerank API: `POST /v2/rerank`, and `POST /v1/rerank` (Cohere v1 and Jina, whose documents may
//! also be `{text}` objects).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::common::{
    parse, request_id, split, Call, Common, Document, RerankErrors, Shape, Unknown,
};
use super::{read_body, HttpError, HttpState};
use crate::rerank::{RankedDocument, RerankOutcome, Reranker};

#[derive(Deserialize, ToSchema)]
pub(super) struct CohereRequest {
    /// What the documents are ranked against: at least one character that is not white space.
    #[schema(pattern = r"\S")]
    pub(super) query: String,
    /// The documents to rank: strings, or (v1, Jina) objects with `text`.
    #[schema(min_items = 1)]
    pub(super) documents: Vec<Document>,
    #[serde(flatten)]
    pub(super) common: Common,
    /// Fields no shape knows (after `common` has taken its own): refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub(super) unknown: Unknown,
}

#[derive(Serialize, ToSchema)]
pub(super) struct CohereResult {
    /// The document's position in the request.
    index: u32,
    relevance_score: f32,
    /// With `return_documents`.
    #[serde(skip_serializing_if = "Option::is_none")]
    document: Option<DocumentText>,
    /// With chunk_max: the window whose score this is.
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct DocumentText {
    text: String,
}

/// Cohere's response (v2; v1 and Jina add `model` and `usage`). Typed, so scores keep their f32 digits.
#[derive(Serialize, ToSchema)]
pub(super) struct CohereResponse {
    /// The request id (`x-request-id`).
    id: String,
    /// v1 and Jina: the served model.
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Highest score first.
    results: Vec<CohereResult>,
    /// `api_version`, `billed_units.search_units` and, in v2, `tokens.input_tokens`.
    meta: serde_json::Value,
    /// v1 and Jina: `total_tokens`, `prompt_tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<serde_json::Value>,
}

/// Cohere bills one search unit per query with up to 100 documents (each window of a long document counts).
fn search_units(outcome: &RerankOutcome) -> u32 {
    outcome.usage.pairs.div_ceil(100).max(1)
}

fn results(results: Vec<RankedDocument>) -> Vec<CohereResult> {
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

/// Decodes a Cohere-shaped request and runs it: the part v1 and v2 share.
async fn call(
    state: &HttpState,
    endpoint: &'static str,
    call: &Call,
    body: Body,
) -> Result<(Reranker, RerankOutcome), HttpError> {
    let reranker = state.reranker()?.clone();
    let mut receiving = reranker.receiving(call.client.clone());
    let body = read_body(state, body, &mut receiving).await?;
    let parsed = parse(
        Shape::Cohere,
        &body,
        reranker.description(),
        reranker.limits(),
    )?;
    // The decoded texts are admitted again as the call holds them; the raw body is done with.
    drop((body, receiving));
    let options = call.options(parsed.options)?;
    let _slot = state.call_slot(call.client.as_ref())?;
    let outcome = reranker
        .rerank(endpoint, &parsed.query, parsed.documents, options)
        .await
        .map_err(HttpError::counted)?;
    Ok((reranker, outcome))
}

/// Cohere v2 rerank.
#[utoipa::path(
    post,
    path = "/v2/rerank",
    request_body = CohereRequest,
    responses((status = 200, description = "The documents ranked", body = CohereResponse), RerankErrors)
)]
pub(super) async fn v2(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, HttpError> {
    let (http, body) = split(request);
    let (_, outcome) = call(&state, "http_v2", &http, body).await?;
    let body = CohereResponse {
        id: request_id(&http.headers),
        model: None,
        meta: json!({
            "api_version": { "version": "2" },
            "billed_units": { "search_units": search_units(&outcome) },
            "tokens": { "input_tokens": outcome.usage.tokens, "output_tokens": 0 },
        }),
        usage: None,
        results: results(outcome.results),
    };
    Ok(Json(body).into_response())
}

/// Cohere v1 and Jina rerank (documents as strings or `{text}` objects).
#[utoipa::path(
    post,
    path = "/v1/rerank",
    request_body = CohereRequest,
    responses((status = 200, description = "The documents ranked", body = CohereResponse), RerankErrors)
)]
pub(super) async fn v1(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, HttpError> {
    let (http, body) = split(request);
    let (reranker, outcome) = call(&state, "http_v1", &http, body).await?;
    let tokens = outcome.usage.tokens;
    let body = CohereResponse {
        id: request_id(&http.headers),
        model: Some(reranker.description().model_id.clone()),
        meta: json!({
            "api_version": { "version": "1" },
            "billed_units": { "search_units": search_units(&outcome) },
        }),
        usage: Some(json!({ "total_tokens": tokens, "prompt_tokens": tokens })),
        results: results(outcome.results),
    };
    Ok(Json(body).into_response())
}
