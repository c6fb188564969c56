//! Fuzzes what a request meets before the model: protobuf decoding, option mapping, limit validation and pair
//! tokenization (every truncation mode, chunk windows included) with the fixture's real WordPiece tokenizer, and the ASCII fast path
//! against the tokenizer itself. Any panic is a bug.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rerank_server::proto::{RerankRequest, RerankStreamRequest};
use rerank_server::rerank::limits::Limits;
use rerank_server::rerank::{RerankOptions, StreamRequest};
use rerank_server::tokenization::{PairTokenizer, Truncation};
use rerank_server::transport::grpc::{decode_stream_message, unary_options};

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
    request_read_timeout: std::time::Duration::from_secs(10),
    max_chunks_per_doc: 8,
    chunk_overlap_tokens: 16,
    max_concurrent_calls: 8,
};

fn exercise(query: &str, documents: &[String], options: RerankOptions) {
    if LIMITS.check_query(query).is_err() || LIMITS.check_documents(0, documents).is_err() {
        return;
    }
    let tokenizer = tokenizer();
    let Ok(encoded_query) = tokenizer.encode_query(query, None) else { return };
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
        if let Ok(windows) = tokenizer.encode_windows(&encoded_query, document, LIMITS.max_chunks_per_doc, i) {
            assert!(!windows.is_empty() && windows.len() <= LIMITS.max_chunks_per_doc);
            assert!(windows.iter().all(|w| w.input_ids.len() <= tokenizer.max_length()), "a window passed max_length");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = RerankRequest::decode(data) {
        if let Ok(options) = unary_options(&LIMITS, &request) {
            exercise(&request.query, &request.documents, options);
        }
    }
    if let Ok(message) = RerankStreamRequest::decode(data) {
        match decode_stream_message(&LIMITS, Ok(message)) {
            Ok(StreamRequest::Start { query, options }) => exercise(&query, &[String::new()], options),
            Ok(StreamRequest::Documents(documents)) => exercise("query", &documents, RerankOptions::default()),
            Err(_) => {}
        }
    }
    // Raw text as a query and a document, so the tokenizer also sees inputs protobuf would not produce.
    if let Ok(text) = std::str::from_utf8(data) {
        exercise(text, &[text.to_string()], RerankOptions::default());
    }
});
