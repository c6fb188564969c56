//! What the rerank shapes share: documents as strings or objects, the optional fields every shape accepts, and
//! the core call's options built from them.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::cohere::CohereRequest;
use super::tei::TeiRequest;
use super::{deadline, HttpError};
use crate::error::RerankError;
use crate::rerank::clients::ClientId;
use crate::rerank::limits::Limits;
use crate::rerank::{ModelDescription, RerankOptions};
use crate::tokenization::Truncation;

/// The largest count a JSON number carries exactly (2^53 - 1): counts above it are refused.
pub(super) const MAX_COUNT: u64 = (1 << 53) - 1;

/// A document as Cohere v1 and Jina accept it: a string or an object with `text`.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub(super) enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    pub(super) fn into_text(self) -> String {
        match self {
            Self::Text(text) | Self::Object { text } => text,
        }
    }
}

/// The values of `truncation` (documentation only: the field is read as a string and checked by hand).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub(super) enum TruncationName {
    LongestFirst,
    Reject,
    ChunkMax,
}

/// The values of `rank_fields` items.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub(super) enum RankField {
    Text,
}

/// The top-level fields of a body that its shape does not know, by name (their values are skipped unread).
pub(super) type Unknown = BTreeMap<String, IgnoredAny>;

/// Refuses a body with fields its shape does not know: a client asking for something this server does not do
/// (a newer API field, a misspelt option) learns so instead of getting results that silently ignore it.
fn refuse_unknown(unknown: &Unknown, known: &[&str]) -> Result<(), RerankError> {
    if unknown.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = unknown.keys().take(8).map(|k| format!("{k:?}")).collect();
    Err(RerankError::invalid(format!(
        "unknown field{} {}; this API takes {}",
        if unknown.len() == 1 { "" } else { "s" },
        names.join(", "),
        known.join(", ")
    )))
}

/// Fields every shape shares; absent and null mean the server's default. Fields no shape knows are refused.
#[derive(Deserialize, Default, ToSchema)]
pub(super) struct Common {
    /// The served model: its id or the id's last path part ("" or absent: the served model); another name is
    /// refused.
    model: Option<String>,
    /// How many results to return, highest first (0 or absent: all).
    #[serde(default, deserialize_with = "count")]
    #[schema(value_type = Option<u64>, maximum = 9007199254740991_u64)]
    top_n: Option<usize>,
    /// Return each document's text with its result.
    return_documents: Option<bool>,
    /// "longest_first" (the default), "reject" (an over-length pair is refused) or "chunk_max" (long documents
    /// scored in windows, the best window's score).
    #[schema(value_type = Option<TruncationName>)]
    truncation: Option<String>,
    /// Cohere v1: windows per long document; setting it selects chunk_max (0: the server's limit).
    #[serde(default, deserialize_with = "count")]
    #[schema(value_type = Option<u64>, maximum = 9007199254740991_u64)]
    max_chunks_per_doc: Option<usize>,
    /// Cohere v2: documents are first cut to this many tokens.
    #[serde(default, deserialize_with = "count")]
    #[schema(value_type = Option<u64>, maximum = 9007199254740991_u64)]
    max_tokens_per_doc: Option<usize>,
    /// Only ["text"] is supported.
    #[schema(value_type = Option<Vec<RankField>>)]
    rank_fields: Option<Vec<String>>,
    /// Instruction-following rerankers (Qwen3-Reranker): the task instruction instead of the model's default.
    instruction: Option<String>,
    /// Layerwise rerankers (bge-reranker-v2-minicpm-layerwise): the layer whose score head gives the score; the
    /// model computes no layer past it (see `cutoff_layers` in `GET /info`).
    #[serde(default, deserialize_with = "count")]
    #[schema(value_type = Option<u64>, maximum = 9007199254740991_u64)]
    cutoff_layer: Option<usize>,
}

/// A count: a non-negative integer, also when written as a whole float (`5.0`, as some JSON encoders write
/// numbers); anything else is refused.
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=MAX_COUNT as f64).contains(f))
            .map(|f| f as u64)
    });
    whole
        .filter(|n| *n <= MAX_COUNT)
        .and_then(|n| usize::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a whole number from 0 to {MAX_COUNT}, found {number}"
            ))
        })
}

/// An error body: `{"message": ...}`.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    message: String,
}

/// The error answers of the rerank routes, each `{"message": ...}`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(super) enum RerankErrors {
    /// Malformed JSON, a wrong type, an invalid option, an empty query or document list, a model not served
    /// here, or (with `reject`) a pair over the model's length.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// The API key is missing or wrong (only when the server has one).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The body did not arrive within request_read_timeout.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// Over a size limit: the body (max_message_bytes), documents, bytes of a document or the query, chunks.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Refused at once by admission (the server or this client is at capacity); `Retry-After` says when to
    /// try again.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// A batch failed on the device.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The model is loading, or the server is shutting down or cannot score; another replica can serve it.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The call's `x-request-timeout` passed before its scores were ready.
    #[response(status = 504)]
    DeadlineExceeded(ErrorBody),
}

/// What a handler takes from the HTTP request besides its body.
pub(super) struct Call {
    pub(super) headers: HeaderMap,
    pub(super) client: Option<ClientId>,
}

impl Call {
    /// The core call of a parsed body, with this request's deadline and client.
    pub(super) fn options(&self, parsed: RerankOptions) -> Result<RerankOptions, HttpError> {
        Ok(RerankOptions {
            deadline: deadline(&self.headers)?,
            client: self.client.clone(),
            ..parsed
        })
    }
}

pub(super) fn split(request: Request) -> (Call, Body) {
    let (parts, body) = request.into_parts();
    let client = parts.extensions.get::<ClientId>().cloned();
    let call = Call {
        headers: parts.headers,
        client,
    };
    (call, body)
}

pub(super) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default()
}

/// Which API a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Cohere v1 / v2 and Jina: `query`, `documents` (strings or `{text}`).
    Cohere,
    /// text-embeddings-inference: `query`, `texts`.
    Tei,
}

/// A rerank body decoded and mapped to the core's call, before the transport adds the deadline and client.
#[derive(Debug)]
pub struct Parsed {
    pub query: String,
    pub documents: Vec<String>,
    pub options: RerankOptions,
}

/// Decodes a JSON body of `shape` and maps its fields to a core call for the served model: every malformed
/// body and refused option is an error that names the field (400, or 413 past a limit).
pub fn parse(
    shape: Shape,
    body: &[u8],
    description: &ModelDescription,
    limits: &Limits,
) -> Result<Parsed, RerankError> {
    let invalid = |e: serde_json::Error| RerankError::invalid(format!("invalid JSON body: {e}"));
    match shape {
        Shape::Cohere => {
            let request: CohereRequest = serde_json::from_slice(body).map_err(invalid)?;
            refuse_unknown(&request.unknown, &known(&["query", "documents"]))?;
            Ok(Parsed {
                options: options(description, limits, &request.common, None)?,
                query: request.query,
                documents: request
                    .documents
                    .into_iter()
                    .map(Document::into_text)
                    .collect(),
            })
        }
        Shape::Tei => {
            let request: TeiRequest = serde_json::from_slice(body).map_err(invalid)?;
            refuse_unknown(
                &request.unknown,
                &known(&[
                    "query",
                    "texts",
                    "raw_scores",
                    "return_text",
                    "truncate",
                    "truncation_direction",
                ]),
            )?;
            if let Some(direction) = request.truncation_direction.as_deref() {
                if !direction.eq_ignore_ascii_case("right") {
                    return Err(RerankError::invalid(format!(
                        "truncation_direction {direction:?}: only \"Right\" is supported (pairs keep their first tokens)"
                    )));
                }
            }
            let mut options = options(description, limits, &request.common, request.truncate)?;
            options.raw_scores = request.raw_scores.unwrap_or(false);
            options.return_documents = request.return_text.unwrap_or(false);
            Ok(Parsed {
                options,
                query: request.query,
                documents: request.texts,
            })
        }
    }
}

/// A shape's own fields followed by the shared ones, for error messages.
fn known<'a>(own: &[&'a str]) -> Vec<&'a str> {
    let mut names = own.to_vec();
    names.extend(COMMON_FIELDS);
    names
}

/// The fields of [`Common`], as they are written in JSON.
const COMMON_FIELDS: [&str; 9] = [
    "model",
    "top_n",
    "return_documents",
    "truncation",
    "max_chunks_per_doc",
    "max_tokens_per_doc",
    "rank_fields",
    "instruction",
    "cutoff_layer",
];

/// The options of one call from the shared fields; `truncate` is TEI's flag (false = reject over-long pairs).
fn options(
    description: &ModelDescription,
    limits: &Limits,
    common: &Common,
    truncate: Option<bool>,
) -> Result<RerankOptions, RerankError> {
    if let Some(model) = common
        .model
        .as_deref()
        .filter(|m| !description.answers_to(m))
    {
        return Err(RerankError::invalid(format!(
            "model {model:?} is not served here; this server serves {:?}",
            description.model_id
        )));
    }
    if let Some(fields) = &common.rank_fields {
        if fields.iter().any(|field| field != "text") {
            return Err(RerankError::invalid(
                "rank_fields: only \"text\" is supported",
            ));
        }
    }
    // The published schema marks the field as not accepted where the model cannot chunk.
    if let (Some(prompt), Some(_)) = (&description.prompt, common.max_chunks_per_doc) {
        return Err(RerankError::invalid(format!(
            "max_chunks_per_doc is not available for {} models",
            prompt.family
        )));
    }
    let truncation = truncation(limits, common, truncate)?;
    if matches!(truncation, Truncation::ChunkMax { .. }) && common.max_tokens_per_doc.is_some() {
        return Err(RerankError::invalid(
            "max_tokens_per_doc cuts documents, chunk_max scores them whole: choose one",
        ));
    }
    Ok(RerankOptions {
        top_n: common.top_n.unwrap_or(0),
        return_documents: common.return_documents.unwrap_or(false),
        raw_scores: false,
        truncation,
        max_document_tokens: common.max_tokens_per_doc,
        deadline: None,
        instruction: common.instruction.clone(),
        cutoff_layer: common.cutoff_layer,
        client: None,
    })
}

fn truncation(
    limits: &Limits,
    common: &Common,
    truncate: Option<bool>,
) -> Result<Truncation, RerankError> {
    // Over the limit is refused whatever the truncation, as the published schema says.
    if let Some(requested) = common.max_chunks_per_doc {
        limits.chunks_per_doc(requested)?;
    }
    let chunked = |requested: usize| -> Result<Truncation, RerankError> {
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
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Counted {
        #[serde(default, deserialize_with = "count")]
        n: Option<usize>,
    }

    fn parse(json: &str) -> Result<Option<usize>, String> {
        serde_json::from_str::<Counted>(json)
            .map(|c| c.n)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn counts_are_whole_numbers_in_range_however_written() {
        assert_eq!(parse(r#"{"n": 5}"#), Ok(Some(5)));
        assert_eq!(parse(r#"{"n": 5.0}"#), Ok(Some(5)));
        assert_eq!(parse(r#"{"n": null}"#), Ok(None));
        assert_eq!(parse(r#"{}"#), Ok(None));
        assert_eq!(
            parse(r#"{"n": 9007199254740991}"#),
            Ok(Some(9007199254740991))
        );
        for refused in [
            "5.5",
            "-1",
            "-1.0",
            "9007199254740992",
            "1e300",
            "\"5\"",
            "true",
        ] {
            assert!(
                parse(&format!(r#"{{"n": {refused}}}"#)).is_err(),
                "{refused}"
            );
        }
    }
}
