//! Decoder rerankers against their published scoring code (run or reproduced with transformers by gen_fixtures.py)
//! on seeded fixtures: Qwen3-Reranker (causal LM and converted seq-cls), mxbai-rerank-v2 (Qwen2) and
//! bge-reranker-v2-gemma (Gemma) and bge-reranker-v2-minicpm-layerwise (at its default layer; its other layers in
//! tests/layerwise.rs). The prompted
//! token ids, the logit difference, the sigmoid score, the instruction field, and the options they refuse.

mod common;

use common::{fixture, test_config};
use rerank_server::proto::{InfoRequest, RerankRequest};
use rerank_server::rerank::RerankOptions;
use rerank_server::server::build_reranker;
use rerank_server::tokenization::{PairTokenizer, Truncation};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;
const FIXTURES: [&str; 5] = [
    "qwen3-reranker-tiny",
    "qwen3-reranker-tiny-seq-cls",
    "mxbai-rerank-v2-tiny",
    "bge-reranker-v2-gemma-tiny",
    "bge-reranker-v2-minicpm-layerwise-tiny",
];

/// FlagEmbedding's prompt puts only BOS and the query before the document: often too short to share.
fn flag_prompt(name: &str) -> bool {
    name.contains("gemma") || name.contains("minicpm")
}

#[derive(Deserialize)]
struct Expected {
    max_length: usize,
    family: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    query: String,
    #[serde(default)]
    instruction: Option<String>,
    documents: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
    scores: Vec<f32>,
}

fn expected(name: &str) -> Expected {
    let path = fixture("expected").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(name: &str) -> (rerank_server::model::LoadedModel, PairTokenizer) {
    let model = rerank_server::model::load(
        &fixture(name),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .expect("model loads");
    let prompt = model
        .prompt
        .clone()
        .expect("a decoder reranker has a prompt");
    let tokenizer = PairTokenizer::load(&fixture(name), None, model.max_positions, 1)
        .and_then(|t| t.with_prompt(prompt, model.max_positions))
        .expect("tokenizer loads");
    (model, tokenizer)
}

#[test]
fn prompted_token_ids_are_the_reference_scoring_code_s() {
    for name in FIXTURES {
        let expected = expected(name);
        let (_, tokenizer) = load(name);
        assert_eq!(tokenizer.max_length(), expected.max_length);
        assert_eq!(
            tokenizer.prompt().map(|p| p.family.as_str()),
            Some(expected.family.as_str())
        );
        for case in &expected.cases {
            let query = tokenizer
                .encode_query(&case.query, case.instruction.as_deref())
                .expect("query");
            for (i, document) in case.documents.iter().enumerate() {
                let pair = tokenizer
                    .encode_pair(&query, document, Truncation::LongestFirst, i)
                    .expect("pair");
                assert_eq!(
                    pair.input_ids, case.input_ids[i],
                    "{name} {} document {i}",
                    case.name
                );
                // Type id 1 marks the leading run every pair of the request shares (prompt, instruction, query).
                let marked = pair.type_ids.iter().take_while(|&&t| t == 1).count();
                assert!(pair.type_ids[marked..].iter().all(|&t| t == 0));
                let shared = case
                    .input_ids
                    .iter()
                    .map(|ids| {
                        ids.iter()
                            .zip(&pair.input_ids)
                            .take_while(|(a, b)| a == b)
                            .count()
                    })
                    .min()
                    .unwrap_or(0);
                // In a body tokenized whole, the document's first word may merge with the token before it.
                assert!(
                    (1..=shared + 1).contains(&marked),
                    "{name} {} document {i}: {marked} marked, {shared} shared by the case's pairs",
                    case.name
                );
            }
        }
    }
}

#[test]
fn score_logits_match_the_reference_for_every_checkpoint_form() {
    for name in FIXTURES {
        let expected = expected(name);
        let (model, _) = load(name);
        let mut worst = 0.0f32;
        for case in &expected.cases {
            let batch = rerank_server::model::PackedBatch::from_sequences(
                case.input_ids.iter().map(|ids| (&ids[..], &[][..])),
            );
            let logits = model.logits(&batch).expect("forward");
            for (row, want) in logits.iter().zip(&case.logits) {
                let diff = (row[0] - want[0]).abs();
                worst = worst.max(diff);
                assert!(
                    diff <= TOLERANCE,
                    "{name} {}: {row:?} vs reference {want:?}",
                    case.name
                );
            }
        }
        println!("{name}: max |logit - reference| = {worst:.2e}");
    }
}

#[tokio::test]
async fn scores_through_the_rerank_path_match_the_reference() {
    for name in FIXTURES {
        let expected = expected(name);
        let reranker = build_reranker(&test_config(name))
            .await
            .expect("reranker builds");
        for case in &expected.cases {
            for raw_scores in [false, true] {
                let options = RerankOptions {
                    raw_scores,
                    instruction: case.instruction.clone(),
                    ..Default::default()
                };
                let outcome = reranker
                    .rerank("test", &case.query, case.documents.clone(), options)
                    .await
                    .expect("rerank");
                for result in &outcome.results {
                    let i = result.index as usize;
                    let want = if raw_scores {
                        case.logits[i][0]
                    } else {
                        case.scores[i]
                    };
                    assert!(
                        (result.score - want).abs() <= TOLERANCE,
                        "{name} {} doc {i} raw={raw_scores}: {} vs reference {want}",
                        case.name,
                        result.score
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn the_instruction_changes_the_score_and_other_models_refuse_it() {
    let reranker = build_reranker(&test_config(FIXTURES[0]))
        .await
        .expect("reranker builds");
    let score = |instruction: Option<&str>| {
        let options = RerankOptions {
            instruction: instruction.map(str::to_string),
            raw_scores: true,
            ..Default::default()
        };
        let reranker = reranker.clone();
        async move {
            reranker
                .rerank(
                    "test",
                    "capital of france",
                    vec!["paris is the capital of france.".into()],
                    options,
                )
                .await
                .expect("rerank")
                .results[0]
                .score
        }
    };
    assert_ne!(
        score(None).await,
        score(Some("Judge whether the passage is about cooking")).await
    );

    let encoder = build_reranker(&test_config("bert-tiny-1label"))
        .await
        .expect("reranker builds");
    let options = RerankOptions {
        instruction: Some("anything".into()),
        ..Default::default()
    };
    let refused = encoder
        .rerank("test", "q", vec!["d".into()], options.clone())
        .await;
    assert!(refused.is_err_and(|e| e.to_string().contains("instruction")));
    let gemma = build_reranker(&test_config(FIXTURES[3]))
        .await
        .expect("reranker builds");
    let refused = gemma.rerank("test", "q", vec!["d".into()], options).await;
    assert!(refused.is_err_and(|e| e.to_string().contains("no instruction")));
}

#[tokio::test]
async fn chunk_max_and_a_document_token_cut_are_refused_with_a_reason() {
    let reranker = build_reranker(&test_config(FIXTURES[0]))
        .await
        .expect("reranker builds");
    for options in [
        RerankOptions {
            truncation: Truncation::ChunkMax { max_chunks: 4 },
            ..Default::default()
        },
        RerankOptions {
            max_document_tokens: Some(8),
            ..Default::default()
        },
    ] {
        let refused = reranker
            .rerank("test", "q", vec!["d".into()], options)
            .await;
        assert!(refused.is_err_and(|e| e.to_string().contains("qwen3-reranker")));
    }
}

#[tokio::test]
async fn grpc_takes_the_instruction_and_info_shows_the_prompt() {
    let server = common::start(test_config(FIXTURES[0])).await;
    let mut client = common::client(&server).await;
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let prompt = info.prompt.expect("a decoder reranker reports its prompt");
    assert_eq!(prompt.family, "qwen3-reranker");
    assert!(prompt.body.contains("{document}") && prompt.suffix.contains("<think>"));
    assert_eq!(info.activation, "sigmoid");
    let case = expected(FIXTURES[0])
        .cases
        .into_iter()
        .find(|c| c.instruction.is_some())
        .expect("a case with its own instruction");
    let response = client
        .rerank(RerankRequest {
            query: case.query.clone(),
            documents: case.documents.clone(),
            instruction: case.instruction.clone(),
            ..Default::default()
        })
        .await
        .expect("rerank")
        .into_inner();
    for result in response.results {
        let want = case.scores[result.index as usize];
        assert!(
            (result.score - want).abs() <= TOLERANCE,
            "{} vs {want}",
            result.score
        );
    }
}

#[tokio::test]
async fn http_apis_take_the_instruction() {
    let server = common::start(test_config(FIXTURES[0])).await;
    let case = expected(FIXTURES[0])
        .cases
        .into_iter()
        .find(|c| c.instruction.is_some())
        .expect("a case with its own instruction");
    let body = serde_json::json!({
        "query": case.query, "documents": case.documents, "instruction": case.instruction,
    });
    let (status, json) = common::post_json(&server, "/v2/rerank", &body).await;
    assert_eq!(status, 200, "{json}");
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), case.documents.len());
    for result in results {
        let index = result["index"].as_u64().expect("index") as usize;
        let score = result["relevance_score"].as_f64().expect("score") as f32;
        assert!(
            (score - case.scores[index]).abs() <= TOLERANCE,
            "{score} vs {}",
            case.scores[index]
        );
    }
    let (status, json) = common::post_json(
        &server,
        "/v2/rerank",
        &serde_json::json!({"query": "q", "documents": ["d"], "max_tokens_per_doc": 4}),
    )
    .await;
    assert_eq!(status, 400, "{json}");
    // A decoder cannot score in windows, so the window count is refused whatever the truncation.
    let (status, json) = common::post_json(
        &server,
        "/v2/rerank",
        &serde_json::json!({"query": "q", "documents": ["d"], "truncation": "reject", "max_chunks_per_doc": 2}),
    )
    .await;
    assert_eq!(status, 400, "{json}");
}

#[test]
fn a_shared_prompt_prefix_computed_once_gives_each_pair_its_own_score() {
    for name in FIXTURES {
        let (model, _) = load(name);
        for case in expected(name).cases {
            let rows: Vec<&[u32]> = case.input_ids.iter().map(Vec::as_slice).collect();
            let shared = rows
                .iter()
                .map(|ids| rows[0].iter().zip(*ids).take_while(|(a, b)| a == b).count())
                .min()
                .unwrap_or(0);
            if !flag_prompt(name) {
                assert!(
                    shared >= 16,
                    "{name} {}: the prompt prefix is shared",
                    case.name
                );
            }
            let together = model
                .logits(&rerank_server::model::PackedBatch::from_sequences(
                    rows.iter().map(|ids| (*ids, &[][..])),
                ))
                .expect("forward");
            for (ids, logit) in rows.iter().zip(&together) {
                let alone = model
                    .logits(&rerank_server::model::PackedBatch::from_sequences([(
                        *ids,
                        &[][..],
                    )]))
                    .expect("forward");
                assert!(
                    (alone[0][0] - logit[0]).abs() < 1e-5,
                    "{name} {}: {} vs {}",
                    case.name,
                    alone[0][0],
                    logit[0]
                );
            }
        }
    }
}

/// Pairs of one request scored in batches of their own (as a CPU runs a 0.6B model) take the keys and values of
/// the prompt an earlier batch computed (the prefix cache), and still score as the reference.
#[test]
fn pairs_in_batches_of_their_own_reuse_the_prompt_an_earlier_batch_computed() {
    // With the tokenizer's type ids (its first segment marked, as the server sends them) and without (the whole
    // first pair kept), each on a model of its own.
    for (name, marked) in FIXTURES.iter().flat_map(|n| [(*n, true), (*n, false)]) {
        let (model, tokenizer) = load(name);
        let stats = || {
            model
                .model
                .prefix_cache_stats()
                .expect("a decoder keeps prompt prefixes")
        };
        let mut expected_hits = 0;
        for case in expected(name).cases {
            let before = stats();
            let mut sharing = 0;
            let query = tokenizer
                .encode_query(&case.query, case.instruction.as_deref())
                .expect("query");
            for (i, (ids, want)) in case.input_ids.iter().zip(&case.logits).enumerate() {
                let pair = tokenizer
                    .encode_pair(&query, &case.documents[i], Truncation::LongestFirst, i)
                    .expect("pair");
                let types = if marked { &pair.type_ids[..] } else { &[][..] };
                let batch = rerank_server::model::PackedBatch::from_sequences([(&ids[..], types)]);
                let got = model.logits(&batch).expect("forward")[0][0];
                assert!(
                    (got - want[0]).abs() <= TOLERANCE,
                    "{name} {} pair {i}: {got} vs {}",
                    case.name,
                    want[0]
                );
                let common = ids
                    .iter()
                    .zip(&case.input_ids[0])
                    .take_while(|(a, b)| a == b)
                    .count();
                if i > 0 && common.min(ids.len() - 1) >= 16 {
                    sharing += 1;
                }
            }
            let hits = stats().hits - before.hits;
            assert!(
                hits >= sharing,
                "{name} {} (marked {marked}): {hits} hits for {sharing} pairs sharing the first one's prompt",
                case.name
            );
            expected_hits += sharing;
        }
        if !flag_prompt(name) {
            assert!(expected_hits > 0, "{name}: pairs share their prompt");
        }
    }
}

/// The half-precision layout a GPU runs (fp16 GEMM operands and cached keys, fp32 norms, residual stream,
/// attention and head), here on the CPU: a wrong dtype at any step of the decoders shows without a GPU.
#[test]
fn half_precision_decoders_stay_close_to_the_reference() {
    for name in FIXTURES {
        let model = rerank_server::model::load(
            &fixture(name),
            &candle_core::Device::Cpu,
            candle_core::DType::F16,
        )
        .expect("model loads in f16");
        let mut worst = 0.0f32;
        for case in expected(name).cases {
            let batch = rerank_server::model::PackedBatch::from_sequences(
                case.input_ids.iter().map(|ids| (&ids[..], &[][..])),
            );
            for (row, want) in model
                .logits(&batch)
                .expect("forward")
                .iter()
                .zip(&case.logits)
            {
                worst = worst.max((row[0] - want[0]).abs());
            }
        }
        println!("{name}: f16 max |logit diff| {worst:.2e}");
        assert!(worst < 2e-2, "{name}: f16 logits differ by {worst}");
    }
}

/// With no max_length configured, bge-reranker-v2-gemma truncates as FlagEmbedding does by default (max_length
/// 512: the query to 384 tokens, the passage to 512): pairs whose query and passage are both cut score as its code
/// scores them. The checkpoint is given bge-reranker-v2-gemma's positions and a tokenizer config without a length
/// limit, so that only the family's default can cut the pairs.
#[tokio::test]
async fn gemma_without_a_configured_max_length_truncates_as_flagembedding_by_default() {
    let name = FIXTURES[3];
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    let edit = |file: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let path = dir.path().join(file);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        edit(&mut json);
        std::fs::write(&path, json.to_string()).expect("write");
    };
    edit("config.json", &|c| {
        c["max_position_embeddings"] = 8192.into()
    });
    edit("tokenizer_config.json", &|c| {
        c.as_object_mut()
            .expect("object")
            .remove("model_max_length");
    });
    let path = fixture("expected").join(format!("{name}.flag-defaults.json"));
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("expected")).expect("json");
    let mut config = test_config(name);
    config.model_id = dir.path().to_string_lossy().into_owned();
    let reranker = build_reranker(&config).await.expect("reranker builds");
    let longest = expected
        .cases
        .iter()
        .flat_map(|c| &c.input_ids)
        .map(Vec::len)
        .max();
    // FlagEmbedding's longest possible pair is 512 + 2·S tokens, which is the default.
    let ours = reranker.description().max_length;
    assert!(
        longest <= Some(ours),
        "a reference pair is longer than our default max_length: {longest:?} vs {ours}"
    );
    for case in &expected.cases {
        let options = RerankOptions {
            raw_scores: true,
            ..Default::default()
        };
        let outcome = reranker
            .rerank("test", &case.query, case.documents.clone(), options)
            .await
            .expect("rerank");
        for result in &outcome.results {
            let i = result.index as usize;
            assert!(
                (result.score - case.logits[i][0]).abs() <= TOLERANCE,
                "{} doc {i}: {} vs FlagEmbedding's {} ({} reference tokens)",
                case.name,
                result.score,
                case.logits[i][0],
                case.input_ids[i].len()
            );
        }
    }
}
