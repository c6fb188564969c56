//! Criterion benches of the request path's stages: tokenization, batch assembly, and the model forward at the
//! MiniLM-L6 shape (BERT, hidden 384, 6 layers, 12 heads) with seeded random weights.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rerank_server::batch::{Pair, RequestHandle};
use rerank_server::model::architectures::bert::Bert;
use rerank_server::model::hf_config::ModelConfig;
use rerank_server::model::ops::{FeedForwardActivation, GemmPrecision, Weights};
use rerank_server::model::{CrossEncoder, PackedBatch};
use rerank_server::scheduler::{BatchPolicy, BatchQueue, BatchShape};
use rerank_server::tokenization::{PairTokenizer, PairTokens, Truncation};

/// A tokenizer directory: RERANK_BENCH_MODEL (e.g. the MiniLM reranker from scripts/fixtures/make_bench_model.py minilm),
/// else the tiny test fixture (a real WordPiece tokenizer with a reduced vocabulary).
fn tokenizer_dir() -> PathBuf {
    std::env::var_os("RERANK_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-tiny-1label")
        })
}

fn documents(count: usize, words: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the", "market", "river", "city", "bread", "fish", "people", "sell", "history", "bridge",
    ];
    (0..count)
        .map(|i| {
            (0..words)
                .map(|w| WORDS[(i * 7 + w * 3) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn tokenization(c: &mut Criterion) {
    let Ok(tokenizer) = PairTokenizer::load(&tokenizer_dir(), None, 512, 2) else {
        eprintln!(
            "skipping tokenization bench: no tokenizer at {}",
            tokenizer_dir().display()
        );
        return;
    };
    let tokenizer = Arc::new(tokenizer);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let query = Arc::new(
        tokenizer
            .encode_query("which market by the river sells fresh fish", None)
            .expect("query"),
    );
    let docs: Arc<[String]> = documents(100, 150).into();
    let mut group = c.benchmark_group("tokenize");
    group.throughput(Throughput::Elements(docs.len() as u64));
    group.bench_function("100 documents x 150 words, 2 workers", |b| {
        b.iter(|| {
            runtime
                .block_on(tokenizer.encode_documents(
                    Arc::clone(&query),
                    Arc::clone(&docs),
                    0,
                    Truncation::LongestFirst,
                    None,
                ))
                .expect("encode")
        })
    });
    group.finish();
}

fn batch_assembly(c: &mut Criterion) {
    let policy = BatchPolicy {
        max_batch_tokens: 16_384,
        max_batch_size: 256,
        max_wait: Duration::ZERO,
    };
    let (request, _receiver) = RequestHandle::new(1);
    let lengths: Vec<usize> = (0..1000).map(|i| 48 + (i * 7919) % 450).collect();
    let mut group = c.benchmark_group("batch_assembly");
    group.throughput(Throughput::Elements(lengths.len() as u64));
    group.bench_function("queue and cut 1000 pairs of 48..498 tokens", |b| {
        b.iter_batched(
            || {
                let now = Instant::now();
                lengths
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| Pair {
                        request: Arc::clone(&request),
                        index: i as u32,
                        tokens: PairTokens {
                            input_ids: vec![1; len],
                            type_ids: vec![0; len],
                        },
                        enqueued_at: now,
                    })
                    .collect::<Vec<_>>()
            },
            |pairs| {
                let mut queue = BatchQueue::new(policy, 512, BatchShape::Padded);
                pairs.into_iter().for_each(|p| queue.push(p));
                let now = Instant::now();
                std::iter::from_fn(|| queue.cut(now)).count()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

const MINILM_CONFIG: &str = r#"{"architectures": ["BertForSequenceClassification"], "hidden_size": 384,
    "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
    "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "vocab_size": 30522,
    "num_labels": 1}"#;

/// Seeded random weights with every tensor name and shape of a MiniLM-L6 BertForSequenceClassification.
fn minilm_weights(config: &ModelConfig) -> candle_core::Result<HashMap<String, Tensor>> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let dev = Device::Cpu;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "bert.embeddings.word_embeddings.weight".into(),
            vec![config.vocab_size, h],
        ),
        (
            "bert.embeddings.position_embeddings.weight".into(),
            vec![config.max_position_embeddings, h],
        ),
        (
            "bert.embeddings.token_type_embeddings.weight".into(),
            vec![config.type_vocab_size, h],
        ),
        ("bert.pooler.dense.weight".into(), vec![h, h]),
        ("bert.pooler.dense.bias".into(), vec![h]),
        ("classifier.weight".into(), vec![1, h]),
        ("classifier.bias".into(), vec![1]),
    ];
    let mut norms = vec!["bert.embeddings.LayerNorm".to_string()];
    for l in 0..config.num_hidden_layers {
        let p = format!("bert.encoder.layer.{l}");
        for name in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![h, h]));
            shapes.push((format!("{p}.{name}.bias"), vec![h]));
        }
        shapes.push((format!("{p}.intermediate.dense.weight"), vec![i, h]));
        shapes.push((format!("{p}.intermediate.dense.bias"), vec![i]));
        shapes.push((format!("{p}.output.dense.weight"), vec![h, i]));
        shapes.push((format!("{p}.output.dense.bias"), vec![h]));
        norms.push(format!("{p}.attention.output.LayerNorm"));
        norms.push(format!("{p}.output.LayerNorm"));
    }
    let mut tensors = HashMap::new();
    for (name, shape) in shapes {
        tensors.insert(name, Tensor::randn(0f32, 0.05, shape, &dev)?);
    }
    for norm in norms {
        tensors.insert(format!("{norm}.weight"), Tensor::ones(h, DType::F32, &dev)?);
        tensors.insert(format!("{norm}.bias"), Tensor::zeros(h, DType::F32, &dev)?);
    }
    Ok(tensors)
}

/// A packed batch: `rows` sequences whose lengths cycle through `lengths`.
fn packed_batch(rows: usize, lengths: &[usize]) -> PackedBatch {
    let ids: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..lengths[r % lengths.len()])
                .map(|t| ((r * 31 + t * 17) % 30000) as u32 + 100)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = ids.iter().map(|i| vec![0; i.len()]).collect();
    PackedBatch::from_sequences(ids.iter().zip(&types).map(|(i, t)| (&i[..], &t[..])))
}

/// The packed MiniLM-L6 forward on the CPU at a few shapes, in fp32 and (where the CPU has AMX) with bf16 GEMMs.
fn model_forward(c: &mut Criterion) {
    let config: ModelConfig = serde_json::from_str(MINILM_CONFIG).expect("config");
    let weights = minilm_weights(&config).expect("weights");
    let mut precisions = vec![("f32", GemmPrecision::Weights)];
    if rerank_server::model::ops::cpu_has_bf16_tiles() {
        precisions.push(("bf16-amx", GemmPrecision::Bf16Tiles));
    }
    let mut group = c.benchmark_group("minilm_l6_packed_forward_cpu");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for (name, precision) in precisions {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let model = Bert::load(
            Weights::new(vb, precision),
            &config,
            FeedForwardActivation::GeluErf,
        )
        .expect("model");
        for (label, rows, lengths) in [
            ("8x128", 8usize, vec![128usize]),
            ("16x256", 16, vec![256]),
            (
                "16x mixed 48..496",
                16,
                vec![48, 496, 112, 432, 176, 368, 240, 304],
            ),
        ] {
            let batch = packed_batch(rows, &lengths);
            group.throughput(Throughput::Elements(rows as u64));
            group.bench_with_input(BenchmarkId::new(name, label), &batch, |b, batch| {
                b.iter(|| model.forward(batch).expect("forward"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, tokenization, batch_assembly, model_forward);
criterion_main!(benches);
