//! The OpenAPI 3.1 document of the HTTP routes, generated from the handlers' own types (utoipa) and completed
//! with what only the running server knows (the model's names, the limits, the options the model refuses);
//! served at `GET /openapi.json`.

use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use super::common::ErrorBody;
use super::HealthBody;
use crate::rerank::Reranker;
use crate::tokenization::Truncation;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rerank-server",
        description = "Cross-encoder and LLM rerankers: Cohere v2, Cohere v1 / Jina and text-embeddings-inference \
                       rerank APIs, health, info and Prometheus metrics. The same port serves gRPC \
                       (rerank.v1.RerankerService)."
    ),
    paths(
        super::cohere::v2,
        super::cohere::v1,
        super::tei::rerank,
        super::info,
        super::health,
        super::metrics
    ),
    components(schemas(ErrorBody, HealthBody))
)]
struct ApiDoc;

/// The request schemas whose fields the server completes, and each one's list of documents.
const REQUESTS: [(&str, &str); 2] = [("CohereRequest", "documents"), ("TeiRequest", "texts")];

/// The document; with a loaded model, its names, limits and refused options are written in.
pub fn document(reranker: Option<&Reranker>) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    flatten_all_of(&mut doc);
    if let Some(reranker) = reranker {
        for (name, documents) in REQUESTS {
            if let Some(schema) = doc["components"]["schemas"].get_mut(name) {
                complete(schema, documents, reranker);
            }
        }
    }
    doc
}

/// `#[serde(flatten)]` comes out as `allOf` of the shared fields and the shape's own; one object with both
/// describes the same bodies and lets generated requests vary every field together.
fn flatten_all_of(doc: &mut Value) {
    let all = doc["components"]["schemas"].clone();
    let Some(schemas) = doc["components"]["schemas"].as_object_mut() else {
        return;
    };
    for schema in schemas.values_mut() {
        let Some(parts) = schema.get("allOf").and_then(Value::as_array).cloned() else {
            continue;
        };
        let (mut properties, mut required) = (Map::new(), Vec::new());
        for part in parts {
            let part = match part.get("$ref").and_then(Value::as_str) {
                Some(reference) => {
                    all[reference.trim_start_matches("#/components/schemas/")].clone()
                }
                None => part,
            };
            if let Some(own) = part.get("properties").and_then(Value::as_object) {
                properties.extend(own.clone());
            }
            if let Some(own) = part.get("required").and_then(Value::as_array) {
                required.extend(own.iter().cloned());
            }
        }
        // Request bodies: a field the shape does not know is refused (400).
        *schema = json!({"type": "object", "properties": properties, "required": required,
                         "additionalProperties": false});
    }
}

/// Writes into a request schema what the running server accepts.
fn complete(schema: &mut Value, documents: &str, reranker: &Reranker) {
    let limits = reranker.limits();
    let description = reranker.description();
    let id = description.model_id.trim_end_matches('/');
    let short = id.rsplit('/').next().unwrap_or(id);
    let mut names = vec![Value::Null, json!(""), json!(id)];
    if short != id && !short.is_empty() {
        names.push(json!(short));
    }
    let chunked = reranker
        .supports(Truncation::ChunkMax { max_chunks: 1 }, None, None)
        .is_ok();
    let cut = reranker
        .supports(Truncation::LongestFirst, Some(1), None)
        .is_ok();
    let instructed = reranker
        .supports(Truncation::LongestFirst, None, Some("instruction"))
        .is_ok();
    let mut truncations = vec![Value::Null, json!("longest_first"), json!("reject")];
    if chunked {
        truncations.push(json!("chunk_max"));
    }
    let properties = &mut schema["properties"];
    properties["model"] = json!({
        "type": ["string", "null"],
        "enum": names,
        "description": "The served model (its id, or the id's last path part); absent or \"\": the served model.",
    });
    properties["truncation"] = json!({
        "type": ["string", "null"],
        "enum": truncations,
        "description": "longest_first (the default), reject (an over-length pair is refused with 400) or, \
                        where the model allows it, chunk_max (long documents scored in windows).",
    });
    properties[documents]["maxItems"] = json!(limits.max_documents);
    properties["max_chunks_per_doc"]["maximum"] = json!(limits.max_chunks_per_doc);
    let refused = json!({"type": "null", "description": "Not accepted by this model."});
    if !chunked {
        properties["max_chunks_per_doc"] = refused.clone();
    }
    if !cut {
        properties["max_tokens_per_doc"] = refused.clone();
    }
    if !instructed {
        properties["instruction"] = refused.clone();
    }
    match description.cutoff_layers {
        Some(layers) => {
            properties["cutoff_layer"] = json!({
                "type": ["integer", "null"],
                "minimum": layers.first,
                "maximum": layers.last,
                "description": format!(
                    "The layer whose score head gives the score ({} to {}; absent: {}).",
                    layers.first, layers.last, layers.default
                ),
            });
        }
        None => properties["cutoff_layer"] = refused,
    }
    // A document cut to max_tokens_per_doc cannot also be scored whole in windows (400).
    schema["not"] = json!({"anyOf": [
        {"properties": {"truncation": {"const": "chunk_max"}, "max_tokens_per_doc": {"type": "integer"}},
         "required": ["truncation", "max_tokens_per_doc"]},
        {"properties": {"truncation": {"type": "null"}, "max_chunks_per_doc": {"type": "integer"},
                        "max_tokens_per_doc": {"type": "integer"}},
         "required": ["max_chunks_per_doc", "max_tokens_per_doc"]},
    ]});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route_and_flat_request_objects() {
        let doc = document(None);
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, method) in [
            ("/v2/rerank", "post"),
            ("/v1/rerank", "post"),
            ("/rerank", "post"),
            ("/info", "get"),
            ("/health", "get"),
            ("/metrics", "get"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{path} {method}");
        }
        for status in [
            "200", "400", "401", "408", "413", "429", "500", "503", "504",
        ] {
            assert!(
                doc["paths"]["/v2/rerank"]["post"]["responses"][status].is_object(),
                "{status}"
            );
        }
        let cohere = &doc["components"]["schemas"]["CohereRequest"];
        assert!(cohere.get("allOf").is_none());
        for field in ["query", "documents", "top_n", "truncation", "instruction"] {
            assert!(cohere["properties"][field].is_object(), "{field}");
        }
        assert_eq!(cohere["required"], json!(["query", "documents"]));
        assert!(doc["components"]["schemas"]["InfoResponse"]["properties"]["model"].is_object());
    }

    fn description() -> crate::rerank::ModelDescription {
        crate::rerank::ModelDescription {
            model_id: "org/model".into(),
            architecture: "BertForSequenceClassification".into(),
            max_length: 512,
            device: "cpu".into(),
            dtype: "f32".into(),
            scoring: crate::model::scoring::Scoring::SingleLogit(
                crate::model::scoring::Activation::Sigmoid,
            ),
            max_message_bytes: 1 << 20,
            prompt: None,
            cutoff_layers: None,
        }
    }

    #[test]
    fn every_documented_field_is_taken_and_any_other_is_refused_by_name() {
        use super::super::common::{parse, Shape};
        let doc = document(None);
        let limits = crate::rerank::limits::Limits {
            max_documents: 8,
            max_stream_documents: 8,
            max_document_bytes: 1024,
            max_query_bytes: 1024,
            max_stream_pending_pairs: 8,
            stream_idle_timeout: std::time::Duration::from_secs(1),
            request_read_timeout: std::time::Duration::from_secs(1),
            max_chunks_per_doc: 4,
            chunk_overlap_tokens: 4,
            max_concurrent_calls: 4,
        };
        for (shape, name, base) in [
            (
                Shape::Cohere,
                "CohereRequest",
                json!({"query": "q", "documents": ["d"]}),
            ),
            (
                Shape::Tei,
                "TeiRequest",
                json!({"query": "q", "texts": ["d"]}),
            ),
        ] {
            let schema = &doc["components"]["schemas"][name];
            assert_eq!(schema["additionalProperties"], false, "{name}");
            let fields = schema["properties"].as_object().expect("properties");
            for field in fields.keys() {
                let mut body = base.clone();
                body[field.as_str()] = body.get(field.as_str()).cloned().unwrap_or(Value::Null);
                let bytes = serde_json::to_vec(&body).expect("json");
                assert!(
                    parse(shape, &bytes, &description(), &limits).is_ok(),
                    "{name}: documented field {field} with null should be taken"
                );
            }
            let mut body = base.clone();
            body["return_citations"] = json!(true);
            let bytes = serde_json::to_vec(&body).expect("json");
            let message = parse(shape, &bytes, &description(), &limits)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                message.contains("\"return_citations\""),
                "{name}: {message}"
            );
            for field in fields.keys() {
                assert!(
                    message.contains(field.as_str()),
                    "{name}: {field} missing from {message}"
                );
            }
        }
    }
}
