//! Document tokenization throughput, one core: the tokenizer (Hugging Face tokenizers) against our fast paths, on
//! the documents `scripts/fixtures/make_bench_tokenizer.py` writes beside its tokenizer (English, and ten languages).
//!
//! RERANK_BENCH_TOKENIZER=models/xlmr-bench-tokenizer cargo bench --bench tokenizer

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rerank_server::tokenization::PairTokenizer;

/// Runs `encode` over every document until at least `min_time` has passed; returns (tokens, documents) per second.
fn throughput(
    documents: &[String],
    min_time: Duration,
    encode: impl Fn(&str) -> usize,
) -> (f64, f64) {
    let start = Instant::now();
    let (mut tokens, mut count) = (0usize, 0usize);
    while start.elapsed() < min_time {
        for document in documents {
            tokens += encode(document);
            count += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    (tokens as f64 / seconds, count as f64 / seconds)
}

fn main() {
    let Some(dir) = std::env::var_os("RERANK_BENCH_TOKENIZER").map(PathBuf::from) else {
        eprintln!("skipping: set RERANK_BENCH_TOKENIZER to a directory from scripts/fixtures/make_bench_tokenizer.py");
        return;
    };
    let tokenizer = match PairTokenizer::load(&dir, None, 512, 1) {
        Ok(tokenizer) => tokenizer,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let sets: serde_json::Value = match std::fs::read_to_string(dir.join("documents.json"))
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
    {
        Ok(sets) => sets,
        Err(e) => {
            eprintln!("skipping: documents.json: {e}");
            return;
        }
    };
    let min_time = Duration::from_secs(3);
    println!("| documents | fast path takes | tokenizers tokens/s | ours tokens/s | ratio |");
    println!("|---|---|---|---|---|");
    for name in ["english", "multilingual"] {
        let documents: Vec<String> = sets[name]
            .as_array()
            .map(|docs| {
                docs.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let taken = documents
            .iter()
            .filter(|d| tokenizer.fast_document_ids(d).is_some())
            .count();
        let differing = documents
            .iter()
            .filter(|d| {
                tokenizer
                    .fast_document_ids(d)
                    .is_some_and(|fast| Ok(fast) != tokenizer.reference_document_ids(d))
            })
            .count();
        if differing > 0 {
            eprintln!("{name}: the fast path differs from the tokenizer on {differing} documents");
            std::process::exit(1);
        }
        let (reference, _) = throughput(&documents, min_time, |d| {
            tokenizer
                .reference_document_ids(d)
                .map_or(0, |ids| ids.len())
        });
        let (ours, _) = throughput(&documents, min_time, |d| {
            tokenizer
                .fast_document_ids(d)
                .or_else(|| tokenizer.reference_document_ids(d).ok())
                .map_or(0, |ids| ids.len())
        });
        println!(
            "| {name} ({}) | {:.0}% | {:.0} | {:.0} | {:.2} |",
            documents.len(),
            100.0 * taken as f64 / documents.len().max(1) as f64,
            reference,
            ours,
            ours / reference
        );
    }
}
