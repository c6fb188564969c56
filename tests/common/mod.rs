//! Shared helpers of the integration tests: fixture paths, expected outputs, and a server on an ephemeral port.
#![allow(dead_code)]

use std::path::PathBuf;

use rerank_server::config::Config;
use rerank_server::proto::reranker_client::RerankerClient;
use rerank_server::server::{self, RunningServer};
use serde::Deserialize;
use tonic::transport::Channel;

pub const ONE_LABEL: &str = "bert-tiny-1label";
pub const TWO_LABEL: &str = "bert-tiny-2label";
pub const XLMR: &str = "xlmr-tiny-1label";
/// Every fixture model, one per architecture and label count.
pub const ALL_MODELS: [&str; 3] = [ONE_LABEL, TWO_LABEL, XLMR];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Debug, Deserialize)]
pub struct Expected {
    pub max_length: usize,
    pub num_labels: usize,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub query: String,
    pub documents: Vec<String>,
    pub input_ids: Vec<Vec<u32>>,
    pub token_type_ids: Vec<Vec<u32>>,
    pub logits: Vec<Vec<f32>>,
    pub scores: Vec<f32>,
}

pub fn expected(model: &str) -> Expected {
    let path = fixture("expected").join(format!("{model}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A configuration for a test server on 127.0.0.1 with a free port and the given fixture model.
pub fn test_config(model: &str) -> Config {
    Config {
        model_id: fixture(model).to_string_lossy().into_owned(),
        host: "127.0.0.1".into(),
        port: 0,
        tokenizer_workers: 2,
        ..Config::default()
    }
}

/// Starts a server and waits until it is SERVING.
pub async fn start(config: Config) -> RunningServer {
    let mut server = server::start(config).await.expect("server starts");
    server.ready().await.expect("model loads");
    server
}

pub async fn client(server: &RunningServer) -> RerankerClient<Channel> {
    RerankerClient::connect(format!("http://{}", server.local_addr))
        .await
        .expect("client connects")
        .max_decoding_message_size(64 * 1024 * 1024)
}
