//! Fuzzes both document fast paths against the tokenizers they stand in for: the ASCII WordPiece path with the
//! BERT fixture's tokenizer, and the SentencePiece Unigram path with the XLM-R fixture's, on arbitrary text.
//! Wherever a fast path takes a text, its ids must equal the tokenizer's; a difference or a panic is a bug.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rerank_server::tokenization::PairTokenizer;

fn tokenizers() -> &'static [PairTokenizer; 2] {
    static TOKENIZERS: OnceLock<[PairTokenizer; 2]> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        ["bert-tiny-1label", "xlmr-tiny-1label"].map(|name| {
            let tokenizer = PairTokenizer::load(&fixtures.join(name), None, 512, 1).expect("fixture tokenizer");
            assert!(tokenizer.fast_path_name().is_some(), "{name} has no fast path");
            tokenizer
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for tokenizer in tokenizers() {
        if let Some(fast) = tokenizer.fast_document_ids(&text) {
            assert_eq!(Ok(fast), tokenizer.reference_document_ids(&text), "fast path differs on {text:?}");
        }
    }
});
