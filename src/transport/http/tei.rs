//! text-embeddings-inference's rerank API: `POST /rerank`, a list of `{index, score, text?}`, highest first.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::common::{parse, split, Common, RerankErrors, Shape, Unknown};
use super::{read_body, HttpError, HttpState};

#[derive(Deserialize, ToSchema)]
pub(super) struct TeiRequest {
    /// What the texts are ranked against: at least one character that is not white space.
    #[schema(pattern = r"\S")]
    pub(super) query: String,
    /// The texts to rank.
    #[schema(min_items = 1)]
    pub(super) texts: Vec<String>,
    /// Scores before the activation (the logit).
    pub(super) raw_scores: Option<bool>,
    /// Return each text with its result.
    pub(super) return_text: Option<bool>,
    /// false: an over-length pair is refused instead of truncated.
    pub(super) truncate: Option<bool>,
    /// Only "Right" (pairs keep their first tokens).
    #[schema(pattern = "^[Rr][Ii][Gg][Hh][Tt]$")]
    pub(super) truncation_direction: Option<String>,
    #[serde(flatten)]
    pub(super) common: Common,
    /// Fields no shape knows (after `common` has taken its own): refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub(super) unknown: Unknown,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TeiResult {
    /// The text's position in the request.
    index: u32,
    score: f32,
    /// With `return_text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    /// With chunk_max: the window whose score this is.
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk: Option<u32>,
}

/// text-embeddings-inference rerank.
#[utoipa::path(
    post,
    path = "/rerank",
    request_body = TeiRequest,
    responses((status = 200, description = "The texts ranked, highest score first", body = [TeiResult]), RerankErrors)
)]
pub(super) async fn rerank(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, HttpError> {
    let (call, body) = split(request);
    let reranker = state.reranker()?.clone();
    let mut receiving = reranker.receiving(call.client.clone());
    let body = read_body(&state, body, &mut receiving).await?;
    let parsed = parse(Shape::Tei, &body, reranker.description(), reranker.limits())?;
    // The decoded texts are admitted again as the call holds them; the raw body is done with.
    drop((body, receiving));
    let options = call.options(parsed.options)?;
    let _slot = state.call_slot(call.client.as_ref())?;
    let outcome = reranker
        .rerank("http_tei", &parsed.query, parsed.documents, options)
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
