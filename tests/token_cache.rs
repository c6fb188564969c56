//! The document token cache: a document seen again gives exactly the pair it gave when tokenized, in every
//! truncation mode and on both tokenizer kinds, the hits are counted, and the cache stays within its bytes.

mod common;

use std::sync::Arc;

use common::{expected, fixture, ALL_MODELS};
use rerank_server::metrics::Metrics;
use rerank_server::tokenization::{PairTokenizer, Truncation};

fn tokenizers(model: &str, cache_bytes: usize) -> (PairTokenizer, PairTokenizer, Arc<Metrics>) {
    let load = || PairTokenizer::load(&fixture(model), None, 512, 1).expect("tokenizer");
    let metrics = Arc::new(Metrics::new());
    let cached = load()
        .with_metrics(Arc::clone(&metrics))
        .with_token_cache(cache_bytes);
    (load(), cached, metrics)
}

#[test]
fn a_cached_document_gives_the_pair_it_gave_when_tokenized() {
    for model in ALL_MODELS {
        let (plain, cached, metrics) = tokenizers(model, 1 << 20);
        let mut lookups = 0;
        for case in expected(model).cases {
            let query = plain.encode_query(&case.query, None).expect("query");
            for (i, document) in case.documents.iter().enumerate() {
                for mode in [Truncation::LongestFirst, Truncation::Reject] {
                    let want = plain.encode_pair(&query, document, mode, i);
                    // The first lookup of a document misses and fills the cache; the second hits it.
                    for _ in 0..2 {
                        assert_eq!(
                            cached.encode_pair(&query, document, mode, i),
                            want,
                            "{model} {}",
                            case.name
                        );
                        lookups += 1;
                    }
                }
                let windows = plain
                    .encode_windows(&query, document, 8, i)
                    .expect("windows");
                assert_eq!(
                    cached
                        .encode_windows(&query, document, 8, i)
                        .expect("windows"),
                    windows
                );
                lookups += 1;
            }
        }
        let (hits, misses) = (
            metrics.token_cache_hits.get(),
            metrics.token_cache_misses.get(),
        );
        assert_eq!(hits + misses, lookups, "{model}: every lookup is counted");
        assert!(hits * 2 > lookups, "{model}: {hits} hits of {lookups}");
    }
}

#[test]
fn the_cache_stays_within_its_bytes() {
    let budget = 64 * 1024;
    let (_, cached, _) = tokenizers(common::ONE_LABEL, budget);
    let query = cached.encode_query("harbour market", None).expect("query");
    for i in 0..5000 {
        let document = format!("document {i} about the old harbour market and the river");
        cached
            .encode_pair(&query, &document, Truncation::LongestFirst, i)
            .expect("pair");
    }
    let held = cached.token_cache_bytes();
    assert!(
        held > 0 && held <= budget as u64,
        "{held} bytes held, budget {budget}"
    );
}
