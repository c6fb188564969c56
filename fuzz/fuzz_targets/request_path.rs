//! Fuzzes what a request meets before the model: protobuf decoding, option mapping, limit validation and pair
//! tokenization (both truncation modes) with the fixture's real WordPiece tokenizer, and the ASCII fast path
//! against the tokenizer itself. Any panic is a bug.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rerank_server::proto::{rerank_stream_request, RerankRequest, RerankStreamRequest};
use rerank_server::rerank::Limits;
use rerank_server::tokenization::{PairTokenizer, Truncation};
use rerank_server::transport::grpc::request_options;

fn tokenizer() -> &'static PairTokenizer {
    static TOKENIZER: OnceLock<PairTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bert-tiny-1label");
        PairTokenizer::load(&dir, None, 80, 1).expect("fixture tokenizer")
    })
}

const LIMITS: Limits = Limits {
    max_documents: 64,
    max_stream_documents: 1000,
    max_document_bytes: 4096,
    max_query_bytes: 1024,
    max_stream_pending_pairs: 64,
    stream_idle_timeout: std::time::Duration::from_secs(60),
};

fn exercise(query: &str, documents: &[String], top_n: u32, raw: bool, truncation: i32) {
    let Ok(options) = request_options(top_n, false, raw, truncation) else { return };
    if LIMITS.check_query(query).is_err() || LIMITS.check_documents(0, documents).is_err() {
        return;
    }
    let tokenizer = tokenizer();
    let Ok(encoded_query) = tokenizer.encode_query(query) else { return };
    for (i, document) in documents.iter().enumerate() {
        // Where the ASCII WordPiece fast path applies, it must give exactly the tokenizer's ids.
        if let Some(fast) = tokenizer.fast_document_ids(document) {
            assert_eq!(Ok(fast), tokenizer.reference_document_ids(document), "fast path differs on {document:?}");
        }
        for mode in [options.truncation, Truncation::LongestFirst, Truncation::Reject] {
            if let Ok(pair) = tokenizer.encode_pair(&encoded_query, document, mode, i) {
                assert_eq!(pair.input_ids.len(), pair.type_ids.len());
                assert!(pair.input_ids.len() <= tokenizer.max_length(), "a pair passed max_length");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = RerankRequest::decode(data) {
        exercise(&request.query, &request.documents, request.top_n, request.raw_scores, request.truncation);
    }
    if let Ok(RerankStreamRequest { item: Some(item) }) = RerankStreamRequest::decode(data) {
        match item {
            rerank_stream_request::Item::Start(start) => {
                exercise(&start.query, &[String::new()], start.top_n, start.raw_scores, start.truncation)
            }
            rerank_stream_request::Item::Documents(chunk) => exercise("query", &chunk.documents, 0, false, 0),
        }
    }
    // Raw text as a query and a document, so the tokenizer also sees inputs protobuf would not produce.
    if let Ok(text) = std::str::from_utf8(data) {
        exercise(text, &[text.to_string()], 0, false, 0);
    }
});
