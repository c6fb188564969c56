//! Pair tokenization at the edges: longest-first truncation gives exactly the ids of Hugging Face tokenizers
//! however long query and document are, and a call that stops waiting stops its tokenization.

mod common;

use std::sync::Arc;

use common::{fixture, ONE_LABEL, XLMR};
use proptest::prelude::*;
use rerank_server::tokenization::{PairTokenizer, Truncation};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::Tokenizer;

const MAX_LENGTH: usize = 48;

fn ours(model: &str) -> PairTokenizer {
    PairTokenizer::load(&fixture(model), Some(MAX_LENGTH), 512, 2).expect("tokenizer loads")
}

/// The tokenizer as transformers runs it for a pair with `truncation=True, max_length=MAX_LENGTH`.
fn reference(model: &str) -> Tokenizer {
    let mut tokenizer =
        Tokenizer::from_file(fixture(model).join("tokenizer.json")).expect("tokenizer.json");
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_LENGTH,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .expect("truncation");
    tokenizer
}

fn assert_same_pair(model: &str, query: &str, document: &str) {
    let ours = ours(model);
    let query_tokens = ours.encode_query(query, None).expect("query");
    let pair = ours
        .encode_pair(&query_tokens, document, Truncation::LongestFirst, 0)
        .expect("pair");
    let expected = reference(model)
        .encode((query, document), true)
        .expect("reference");
    assert_eq!(
        pair.input_ids,
        expected.get_ids(),
        "{model}: {query:?} / {document:?}"
    );
    assert_eq!(pair.type_ids, expected.get_type_ids(), "{model}: type ids");
}

fn text(max_words: usize) -> impl Strategy<Value = String> {
    let word = prop_oneof![
        3 => prop::sample::select(vec![
            "the", "market", "river", "fish", "bread", "history", "visitors", "unbelievable", "harbour",
        ])
        .prop_map(str::to_string),
        1 => "[a-z]{1,12}",
        1 => "[0-9]{1,4}",
    ];
    prop::collection::vec(word, 0..max_words).prop_map(|words| words.join(" "))
}

/// Text of any characters: words of the vocabulary, long words, digits, punctuation, other scripts.
fn any_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => prop::sample::select(vec!["the ", "market ", "unbelievable ", "harbour ", ". ", ", "])
            .prop_map(str::to_string),
        2 => "[a-zA-Z]{1,30} ",
        1 => "[a-z]{90,130}",
        1 => "[0-9]{1,8} ",
        1 => "[!-/:-@]{1,4}",
        1 => "\\PC{1,12} ",
    ];
    prop::collection::vec(piece, 0..120).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn truncated_pairs_match_the_tokenizer(query in text(80), document in text(160)) {
        prop_assume!(!query.trim().is_empty());
        assert_same_pair(ONE_LABEL, &query, &document);
        assert_same_pair(XLMR, &query, &document);
    }

    /// Admission refuses early on this estimate; it must never exceed the tokens the pairs really hold.
    #[test]
    fn the_early_token_estimate_is_a_lower_bound(
        query in any_text(),
        documents in prop::collection::vec(any_text(), 1..6),
    ) {
        prop_assume!(!query.trim().is_empty());
        for model in [ONE_LABEL, XLMR] {
            for max_length in [MAX_LENGTH, 512] {
                let tokenizer = PairTokenizer::load(&fixture(model), Some(max_length), 512, 1)
                    .expect("tokenizer loads");
                let query_tokens = tokenizer.encode_query(&query, None).expect("query");
                let real: usize = documents
                    .iter()
                    .map(|d| {
                        tokenizer
                            .encode_pair(&query_tokens, d, Truncation::LongestFirst, 0)
                            .expect("pair")
                            .len()
                    })
                    .sum();
                let estimate = tokenizer.least_tokens(&query_tokens, &documents, None);
                prop_assert!(estimate <= real, "{model} max_length {max_length}: {estimate} > {real}");
            }
        }
    }
}

#[test]
fn a_huge_query_and_document_give_the_pair_of_their_leading_tokens() {
    // tokenizers itself keeps every overflow piece and combines query pieces with document pieces, which for
    // these sizes takes gigabytes; truncation keeps the leading tokens of each text, so the reference is taken
    // on shorter texts of the same start that still overflow on both sides.
    let (query_words, document_words) = (
        "harbour market history ",
        "fresh fish bread river visitors ",
    );
    for model in [ONE_LABEL, XLMR] {
        let tokenizer = ours(model);
        let huge_query = query_words.repeat(700); // about 16 KB
        let huge_document = document_words.repeat(1900); // about 60 KB
        let query_tokens = tokenizer.encode_query(&huge_query, None).expect("query");
        let pair = tokenizer
            .encode_pair(&query_tokens, &huge_document, Truncation::LongestFirst, 0)
            .expect("pair");
        let expected = reference(model)
            .encode((query_words.repeat(20), document_words.repeat(40)), true)
            .expect("reference");
        assert_eq!(pair.input_ids, expected.get_ids(), "{model}");
        assert_eq!(pair.type_ids, expected.get_type_ids(), "{model}");
        assert_eq!(pair.len(), MAX_LENGTH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_stops_waiting_stops_its_tokenization() {
    let tokenizer = Arc::new(ours(ONE_LABEL));
    let query = Arc::new(
        tokenizer
            .encode_query("harbour market", None)
            .expect("query"),
    );
    let many: Arc<[String]> = (0..20_000)
        .map(|i| format!("document {i} about the history of the harbour market ").repeat(20))
        .collect();
    // Two large jobs start and their callers go away at once (a cancelled call, a passed deadline).
    for _ in 0..2 {
        let job = tokenizer.encode_documents(
            Arc::clone(&query),
            Arc::clone(&many),
            0,
            Truncation::LongestFirst,
            None,
        );
        let mut job = Box::pin(job);
        assert!(
            futures::poll!(job.as_mut()).is_pending(),
            "the job is queued"
        );
        drop(job);
    }
    // A small job after them is answered, and the abandoned jobs encoded almost nothing.
    let few: Arc<[String]> = vec!["one small document".to_string(); 2].into();
    let pairs = tokenizer
        .encode_documents(query, few, 0, Truncation::LongestFirst, None)
        .await
        .expect("small job");
    assert_eq!(pairs.len(), 2);
    let encoded = tokenizer.documents_encoded();
    assert!(
        encoded < 1000,
        "{encoded} documents were encoded for callers that had gone (40,002 without cancellation)"
    );
}
