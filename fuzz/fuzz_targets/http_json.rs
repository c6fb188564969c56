//! Fuzzes the HTTP JSON decoding of the rerank shapes (Cohere v1/v2 and Jina, text-embeddings-inference): any
//! body decodes to a call or is refused with an error naming what is wrong, never a panic; a decoded call keeps
//! the limits' invariants, and the request limits judge its texts without panicking.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rerank_server::error::RerankError;
use rerank_server::model::scoring::{Activation, Scoring};
use rerank_server::rerank::limits::Limits;
use rerank_server::rerank::ModelDescription;
use rerank_server::tokenization::Truncation;
use rerank_server::transport::http::{parse, Shape};

const LIMITS: Limits = Limits {
    max_documents: 64,
    max_stream_documents: 1000,
    max_document_bytes: 4096,
    max_query_bytes: 1024,
    max_stream_pending_pairs: 64,
    stream_idle_timeout: std::time::Duration::from_secs(60),
    request_read_timeout: std::time::Duration::from_secs(10),
    max_chunks_per_doc: 8,
    chunk_overlap_tokens: 16,
    max_concurrent_calls: 8,
};

fn description() -> &'static ModelDescription {
    static DESCRIPTION: OnceLock<ModelDescription> = OnceLock::new();
    DESCRIPTION.get_or_init(|| ModelDescription {
        model_id: "cross-encoder/ms-marco-MiniLM-L6-v2".into(),
        architecture: "BertForSequenceClassification".into(),
        max_length: 512,
        device: "cpu".into(),
        dtype: "f32".into(),
        scoring: Scoring::SingleLogit(Activation::Sigmoid),
        max_message_bytes: 1 << 20,
        prompt: None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let shape = if selector & 1 == 0 { Shape::Cohere } else { Shape::Tei };
    match parse(shape, body, description(), &LIMITS) {
        Ok(parsed) => {
            assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok(), "decoded a body that is not JSON");
            if let Truncation::ChunkMax { max_chunks } = parsed.options.truncation {
                assert!((1..=LIMITS.max_chunks_per_doc).contains(&max_chunks), "{max_chunks} windows");
                assert!(parsed.options.max_document_tokens.is_none(), "chunk_max with a per-document cut");
            }
            let _ = LIMITS.check_query(&parsed.query);
            let _ = LIMITS.check_documents(0, &parsed.documents);
        }
        Err(RerankError::InvalidArgument(message) | RerankError::TooLarge(message)) => {
            assert!(!message.is_empty());
        }
        Err(other) => panic!("a body can only be invalid or too large, not {other:?}"),
    }
});
