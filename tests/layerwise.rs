//! Layerwise LLM rerankers (bge-reranker-v2-minicpm-layerwise) on a seeded fixture with heads after layers 2 to 4,
//! against FlagEmbedding's layerwise scoring reproduced with transformers (gen_fixtures.py): the score after every
//! layer, a batch whose pairs stop at different layers, layers past the cutoff not computed (and prompts kept in
//! the prefix cache only when complete), and the `cutoff_layer` field on gRPC (unary and stream), HTTP and Info.

mod common;

use std::collections::BTreeMap;

use common::{fixture, test_config};
use futures::StreamExt;
use rerank_server::model::PackedBatch;
use rerank_server::proto::{rerank_stream_request, rerank_stream_response};
use rerank_server::proto::{
    DocumentChunk, InfoRequest, RerankRequest, RerankStart, RerankStreamRequest,
};
use rerank_server::rerank::RerankOptions;
use rerank_server::server::build_reranker;
use serde::Deserialize;

const NAME: &str = "bge-reranker-v2-minicpm-layerwise-tiny";
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Expected {
    cutoff_layers: Layers,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Layers {
    first: usize,
    last: usize,
    default: usize,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    query: String,
    documents: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    /// By layer: one [logit] per document.
    layers: BTreeMap<String, Vec<Vec<f32>>>,
}

impl Case {
    fn logit(&self, layer: usize, document: usize) -> f32 {
        self.layers[&layer.to_string()][document][0]
    }
}

fn expected() -> Expected {
    let path = fixture("expected").join(format!("{NAME}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("expected file")).expect("json")
}

fn load(dir: &std::path::Path) -> rerank_server::model::LoadedModel {
    rerank_server::model::load(dir, &candle_core::Device::Cpu, candle_core::DType::F32)
        .expect("model loads")
}

fn batch(rows: &[Vec<u32>], exits: Vec<u32>) -> PackedBatch {
    let mut batch = PackedBatch::from_sequences(rows.iter().map(|ids| (&ids[..], &[][..])));
    batch.exit_layers = exits;
    batch
}

#[test]
fn every_cutoff_layer_scores_as_flagembedding_alone_and_mixed_in_one_batch() {
    let expected = expected();
    let model = load(&fixture(NAME));
    let layers = model
        .cutoff_layers
        .expect("a layerwise model reports its layers");
    let want = &expected.cutoff_layers;
    assert_eq!(
        (layers.first, layers.last, layers.default),
        (want.first, want.last, want.default)
    );
    let mut worst = 0.0f32;
    for case in &expected.cases {
        let n = case.input_ids.len();
        for layer in layers.first..=layers.last {
            let logits = model
                .logits(&batch(&case.input_ids, vec![layer as u32; n]))
                .expect("forward");
            for (i, row) in logits.iter().enumerate() {
                let diff = (row[0] - case.logit(layer, i)).abs();
                worst = worst.max(diff);
                assert!(
                    diff <= TOLERANCE,
                    "{} layer {layer} doc {i}: {row:?}",
                    case.name
                );
            }
        }
        // Each pair at its own layer (0 = the default), in one batch.
        let exits: Vec<u32> = (0..n).map(|i| [0, 2, 3, 4][i % 4] as u32).collect();
        let logits = model
            .logits(&batch(&case.input_ids, exits.clone()))
            .expect("forward");
        for (i, row) in logits.iter().enumerate() {
            let layer = match exits[i] {
                0 => layers.default,
                layer => layer as usize,
            };
            let diff = (row[0] - case.logit(layer, i)).abs();
            assert!(
                diff <= TOLERANCE,
                "{} mixed doc {i} at {layer}: {row:?}",
                case.name
            );
        }
    }
    println!("{NAME}: max |logit - reference| over layers {worst:.2e}");
}

/// A pair scored after layer 2 runs two of the four layers: what it computed is too little for the prefix cache
/// (which keeps every layer's keys and values), so the same pair at the last layer finds nothing cached; the run to
/// the last layer is kept and found by the next one. Were every layer computed whatever the cutoff, the first run
/// would already have been kept.
#[test]
fn a_pair_cut_off_early_runs_only_the_layers_up_to_its_cutoff() {
    let expected = expected();
    let model = load(&fixture(NAME));
    let hits = || {
        model
            .model
            .prefix_cache_stats()
            .expect("a decoder keeps prompts")
            .hits
    };
    let case = &expected.cases[0];
    let ids = case
        .input_ids
        .iter()
        .max_by_key(|ids| ids.len())
        .expect("a pair");
    let index = case.input_ids.iter().position(|i| i == ids).expect("index");
    assert!(ids.len() > 20, "the pair is long enough to keep");
    let score = |layer: u32| {
        model
            .logits(&batch(std::slice::from_ref(ids), vec![layer]))
            .expect("forward")[0][0]
    };
    let before = hits();
    assert!((score(2) - case.logit(2, index)).abs() <= TOLERANCE);
    assert!((score(4) - case.logit(4, index)).abs() <= TOLERANCE);
    assert_eq!(
        hits(),
        before,
        "the run cut off after layer 2 was kept as if complete"
    );
    assert!((score(4) - case.logit(4, index)).abs() <= TOLERANCE);
    assert_eq!(hits(), before + 1, "the complete run was not kept");
    // A kept run serves any cutoff.
    assert!((score(3) - case.logit(3, index)).abs() <= TOLERANCE);
    assert_eq!(hits(), before + 2);
}

/// A request that stops early leaves no partial prompt in the prefix cache: the same query asked next at deeper
/// layers (and at the default) still scores as the reference.
#[tokio::test]
async fn requests_at_different_layers_share_the_query_and_score_as_the_reference() {
    let expected = expected();
    let reranker = build_reranker(&test_config(NAME))
        .await
        .expect("reranker builds");
    for case in &expected.cases {
        for layer in [Some(2), Some(4), Some(3), None, Some(2)] {
            let options = RerankOptions {
                raw_scores: true,
                cutoff_layer: layer,
                ..Default::default()
            };
            let outcome = reranker
                .rerank("test", &case.query, case.documents.clone(), options)
                .await
                .expect("rerank");
            let layer = layer.unwrap_or(expected.cutoff_layers.default);
            for result in &outcome.results {
                let want = case.logit(layer, result.index as usize);
                assert!(
                    (result.score - want).abs() <= TOLERANCE,
                    "{} layer {layer} doc {}: {} vs {want}",
                    case.name,
                    result.index,
                    result.score
                );
            }
        }
    }
}

#[tokio::test]
async fn grpc_takes_the_cutoff_layer_and_info_reports_the_layers() {
    let expected = expected();
    let server = common::start(test_config(NAME)).await;
    let mut client = common::client(&server).await;
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let layers = info.cutoff_layers.expect("Info reports the layers");
    assert_eq!((layers.first, layers.last, layers.default_layer), (2, 4, 4));
    assert_eq!(info.architecture, "LayerWiseMiniCPMForCausalLM");
    let case = &expected.cases[0];
    let response = client
        .rerank(RerankRequest {
            query: case.query.clone(),
            documents: case.documents.clone(),
            raw_scores: true,
            cutoff_layer: Some(3),
            ..Default::default()
        })
        .await
        .expect("rerank")
        .into_inner();
    for result in &response.results {
        let want = case.logit(3, result.index as usize);
        assert!(
            (result.score - want).abs() <= TOLERANCE,
            "{} vs {want}",
            result.score
        );
    }
    // The stream's start message carries it too.
    let messages = vec![
        RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Start(RerankStart {
                query: case.query.clone(),
                raw_scores: true,
                cutoff_layer: Some(2),
                ..Default::default()
            })),
        },
        RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                documents: case.documents.clone(),
            })),
        },
    ];
    let mut stream = client
        .rerank_stream(futures::stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut last = None;
    while let Some(message) = stream.next().await {
        if let Some(rerank_stream_response::Item::Final(done)) = message.expect("message").item {
            last = Some(done);
        }
    }
    for result in last.expect("a final ranking").results {
        let want = case.logit(2, result.index as usize);
        assert!(
            (result.score - want).abs() <= TOLERANCE,
            "{} vs {want}",
            result.score
        );
    }
    for layer in [1, 5] {
        let refused = client
            .rerank(RerankRequest {
                query: "q".into(),
                documents: vec!["d".into()],
                cutoff_layer: Some(layer),
                ..Default::default()
            })
            .await
            .expect_err("a layer without a head is refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().contains("2 to 4"),
            "{}",
            refused.message()
        );
    }
}

#[tokio::test]
async fn http_takes_the_cutoff_layer_and_other_models_refuse_it() {
    let expected = expected();
    let server = common::start(test_config(NAME)).await;
    let case = &expected.cases[0];
    for path in ["/v2/rerank", "/v1/rerank"] {
        let body = serde_json::json!({
            "query": case.query, "documents": case.documents, "cutoff_layer": 2,
        });
        let (status, json) = common::post_json(&server, path, &body).await;
        assert_eq!(status, 200, "{json}");
        for result in json["results"].as_array().expect("results") {
            let index = result["index"].as_u64().expect("index") as usize;
            let score = result["relevance_score"].as_f64().expect("score") as f32;
            let want = 1.0 / (1.0 + (-case.logit(2, index)).exp());
            assert!(
                (score - want).abs() <= TOLERANCE,
                "{path}: {score} vs {want}"
            );
        }
    }
    let body =
        serde_json::json!({"query": "q", "texts": ["d"], "cutoff_layer": 3, "raw_scores": true});
    let (status, json) = common::post_json(&server, "/rerank", &body).await;
    assert_eq!(status, 200, "{json}");
    let info: serde_json::Value = reqwest::get(common::http_url(&server, "/info"))
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    assert_eq!(info["cutoff_layers"]["default_layer"], 4, "{info}");
    let (status, json) = common::post_json(
        &server,
        "/v2/rerank",
        &serde_json::json!({"query": "q", "documents": ["d"], "cutoff_layer": 9}),
    )
    .await;
    assert_eq!(status, 400, "{json}");

    let encoder = common::start(test_config("bert-tiny-1label")).await;
    let (status, json) = common::post_json(
        &encoder,
        "/v2/rerank",
        &serde_json::json!({"query": "q", "documents": ["d"], "cutoff_layer": 2}),
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert!(json.to_string().contains("layerwise"), "{json}");
}
