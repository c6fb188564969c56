//! Model directory variants: checkpoint layouts, saved activations, and start-up errors that name the file.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{expected, fixture, test_config, ONE_LABEL};
use rerank_server::model;
use rerank_server::rerank::RerankOptions;
use rerank_server::server::build_reranker;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).expect("json")).expect("write");
}

async fn scores(dir: &Path, raw: bool) -> Vec<f32> {
    let mut config = test_config(ONE_LABEL);
    config.model_id = dir.to_string_lossy().into_owned();
    let reranker = build_reranker(&config).await.expect("reranker builds");
    let case = &expected(ONE_LABEL).cases[0];
    let options = RerankOptions {
        raw_scores: raw,
        ..Default::default()
    };
    let mut results = reranker
        .rerank("test", &case.query, case.documents.clone(), options)
        .await
        .expect("rerank")
        .results;
    results.sort_by_key(|r| r.index);
    results.into_iter().map(|r| r.score).collect()
}

#[tokio::test]
async fn weights_without_the_bert_prefix_and_with_position_ids_load_the_same() {
    let dir = copy_fixture(ONE_LABEL);
    let weights = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
    let mut renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("bert.").map(str::to_owned).unwrap_or(k), v))
        .collect();
    let position_ids = Tensor::arange(0u32, 80, &Device::Cpu)
        .expect("arange")
        .unsqueeze(0)
        .expect("unsqueeze");
    renamed.insert("embeddings.position_ids".into(), position_ids);
    candle_core::safetensors::save(&renamed, &weights).expect("save");
    let want = &expected(ONE_LABEL).cases[0].scores;
    let got = scores(dir.path(), false).await;
    assert!(
        got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-4),
        "{got:?} vs {want:?}"
    );
}

#[tokio::test]
async fn a_saved_activation_function_wins() {
    let dir = copy_fixture(ONE_LABEL);
    edit_config(dir.path(), |c| {
        c["sentence_transformers"]["activation_fn"] = "torch.nn.modules.linear.Identity".into();
    });
    let identity = scores(dir.path(), false).await;
    let raw = scores(dir.path(), true).await;
    assert_eq!(identity, raw, "Identity activation scores are the logits");

    let dir = copy_fixture(ONE_LABEL);
    std::fs::write(
        dir.path().join("config_sentence_transformers.json"),
        r#"{"activation_fn": "torch.nn.modules.activation.Tanh"}"#,
    )
    .expect("write");
    let tanh = scores(dir.path(), false).await;
    assert!(tanh
        .iter()
        .zip(&raw)
        .all(|(t, r)| (t - r.tanh()).abs() < 1e-6));
}

fn load_error(dir: &Path) -> String {
    match model::load(dir, &Device::Cpu, candle_core::DType::F32) {
        Ok(_) => panic!("load should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn start_up_errors_name_the_file_and_what_was_expected() {
    let dir = copy_fixture(ONE_LABEL);
    edit_config(dir.path(), |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("BertForSequenceClassification"),
        "{err}"
    );

    let dir = copy_fixture(ONE_LABEL);
    edit_config(dir.path(), |c| {
        c["id2label"] = serde_json::json!({"0": "a", "1": "b", "2": "c"});
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("3 labels") && err.contains("config.json"),
        "{err}"
    );

    let dir = copy_fixture(ONE_LABEL);
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("remove");
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    let dir = copy_fixture(ONE_LABEL);
    std::fs::remove_file(dir.path().join("config.json")).expect("remove");
    let err = load_error(dir.path());
    assert!(err.contains("config.json"), "{err}");
}

#[tokio::test]
async fn a_missing_tokenizer_is_named() {
    let dir = copy_fixture(ONE_LABEL);
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("remove");
    let mut config = test_config(ONE_LABEL);
    config.model_id = dir.path().to_string_lossy().into_owned();
    let err = build_reranker(&config)
        .await
        .err()
        .expect("fails")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
