//! Shared helpers of the integration tests: fixture paths, expected outputs, and a server on an ephemeral port.
#![allow(dead_code)]

use std::path::PathBuf;

use rerank_server::config::Config;
use rerank_server::model::{CrossEncoder, PackedBatch};
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::server::{self, RunningServer};
use serde::Deserialize;
use tonic::transport::Channel;

pub const ONE_LABEL: &str = "bert-tiny-1label";
pub const TWO_LABEL: &str = "bert-tiny-2label";
pub const XLMR: &str = "xlmr-tiny-1label";
/// Every fixture model, one per architecture and label count.
pub const ALL_MODELS: [&str; 3] = [ONE_LABEL, TWO_LABEL, XLMR];
/// The cross-encoder fixtures that CrossEncoder scores: ALL_MODELS, ModernBERT with either pooling, and GTE
/// multilingual with the real reranker's options and with the others.
pub const CROSS_ENCODERS: [&str; 11] = [
    ONE_LABEL,
    TWO_LABEL,
    XLMR,
    "modernbert-tiny-mean",
    "modernbert-tiny-cls",
    "gte-multilingual-tiny",
    "gte-multilingual-tiny-unpacked",
    "electra-tiny",
    "deberta-v3-tiny",
    "deberta-v2-tiny",
    "jina-reranker-v2-tiny",
];

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
        // Tests that shut a server down do not wait for a balancer; the lame-duck test sets its own.
        drain_delay: std::time::Duration::ZERO,
        ..Config::default()
    }
}

/// Starts a server and waits until it is SERVING.
pub async fn start(config: Config) -> RunningServer {
    let mut server = server::start(config).await.expect("server starts");
    server.ready().await.expect("model loads");
    server
}

pub async fn client(server: &RunningServer) -> RerankerServiceClient<Channel> {
    RerankerServiceClient::connect(format!("http://{}", server.local_addr))
        .await
        .expect("client connects")
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// The server's HTTP base URL.
pub fn http_url(server: &RunningServer, path: &str) -> String {
    format!("http://{}{path}", server.local_addr)
}

/// POSTs JSON and returns (status, body as JSON).
pub async fn post_json(
    server: &RunningServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(http_url(server, path))
        .json(body)
        .send()
        .await
        .expect("HTTP request");
    let status = response.status().as_u16();
    let json = response.json().await.expect("a JSON body");
    (status, json)
}

/// A stub in front of the real model: each batch waits at the gate until the test lets it through, so tests
/// decide exactly when the engine finishes work instead of sleeping and hoping.
pub struct Gate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
    /// A token id whose rows the gate counts in each batch (to tell which batch served which request).
    marker: Option<u32>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    permits: usize,
    entered: usize,
    /// For each batch that reached the gate, in order: its rows holding the marker token.
    marked_rows: Vec<usize>,
    /// For each batch that reached the gate, in order: the thread that ran it (an engine's compute thread).
    threads: Vec<String>,
}

impl Gate {
    pub fn closed() -> std::sync::Arc<Self> {
        Self::closed_marking(None)
    }

    /// A closed gate that counts, per batch, the rows holding `marker`.
    pub fn closed_marking(marker: Option<u32>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            state: Default::default(),
            changed: Default::default(),
            marker,
        })
    }

    /// The threads that ran the batches that reached the gate, in order.
    pub fn threads(&self) -> Vec<String> {
        self.lock().threads.clone()
    }

    /// Rows holding the marker token in each batch that reached the gate, in order.
    pub fn marked_rows(&self) -> Vec<usize> {
        self.lock().marked_rows.clone()
    }

    /// Lets `batches` more batches through.
    pub fn release(&self, batches: usize) {
        self.lock().permits += batches;
        self.changed.notify_all();
    }

    /// Lets every batch through from now on.
    pub fn open(&self) {
        self.lock().open = true;
        self.changed.notify_all();
    }

    /// Batches that have reached the gate so far.
    pub fn entered(&self) -> usize {
        self.lock().entered
    }

    /// Waits until `batches` batches have reached the gate.
    pub async fn wait_entered(self: &std::sync::Arc<Self>, batches: usize) {
        let gate = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut state = gate.lock();
            while state.entered < batches {
                state = gate.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        })
        .await
        .expect("gate waiter");
    }

    fn pass(&self, marked_rows: usize) {
        let mut state = self.lock();
        state.entered += 1;
        state.marked_rows.push(marked_rows);
        let thread = std::thread::current().name().unwrap_or("").to_string();
        state.threads.push(thread);
        self.changed.notify_all();
        while !state.open && state.permits == 0 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if !state.open {
            state.permits -= 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps the server's model so that every batch passes this gate first.
    pub fn wrapper(self: &std::sync::Arc<Self>) -> rerank_server::server::ModelWrapper {
        let gate = std::sync::Arc::clone(self);
        std::sync::Arc::new(move |inner| {
            Box::new(Gated {
                inner,
                gate: std::sync::Arc::clone(&gate),
            })
        })
    }
}

struct Gated {
    inner: Box<dyn CrossEncoder>,
    gate: std::sync::Arc<Gate>,
}

impl CrossEncoder for Gated {
    fn forward(&self, batch: &PackedBatch) -> candle_core::Result<candle_core::Tensor> {
        let marked = self.gate.marker.map_or(0, |marker| {
            batch
                .rows()
                .filter(|(ids, _)| ids.contains(&marker))
                .count()
        });
        self.gate.pass(marked);
        self.inner.forward(batch)
    }
}

/// A model whose every batch fails, as on a device that has gone bad.
pub fn broken_device() -> rerank_server::server::ModelWrapper {
    struct Broken;
    impl CrossEncoder for Broken {
        fn forward(&self, _: &PackedBatch) -> candle_core::Result<candle_core::Tensor> {
            candle_core::bail!("simulated device fault")
        }
    }
    std::sync::Arc::new(|_| Box::new(Broken))
}

/// Starts a server whose model is wrapped, and waits until it is SERVING.
pub async fn start_wrapped(
    config: Config,
    wrapper: rerank_server::server::ModelWrapper,
) -> RunningServer {
    let mut server = server::start_with(config, Some(wrapper))
        .await
        .expect("server starts");
    server.ready().await.expect("model loads");
    server
}

/// The server's scheduler and admission counters.
pub async fn stats(
    client: &mut RerankerServiceClient<Channel>,
) -> rerank_server::proto::SchedulerStats {
    client
        .info(rerank_server::proto::InfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .stats
        .expect("stats")
}

/// The server's health updates, from the health service's Watch stream (opened now, read later).
pub async fn health_updates(
    addr: std::net::SocketAddr,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Waits until the health updates report `wanted`.
pub async fn health_becomes(
    mut updates: tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
) {
    while let Some(update) = updates.message().await.expect("health update") {
        if update.status == wanted as i32 {
            return;
        }
    }
    panic!("health stream ended before {wanted:?}");
}

/// Writes one HTTP/1.1 request on a raw connection and reads one response (head and Content-Length body).
pub async fn http1_exchange(stream: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    stream.write_all(request).await.expect("request written");
    http1_response(stream).await
}

/// Reads one HTTP/1.1 response (head and Content-Length body) from a raw connection.
pub async fn http1_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "the connection closed before a response: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("content-length"));
    while received.len() < head_end + length {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the connection closed inside a response body");
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Whether the peer has closed the connection: a read returns end of file (or a reset).
pub async fn http1_closed(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf).await, Ok(0) | Err(_))
}

/// A JSON POST as raw HTTP/1.1 bytes.
pub fn http1_post(path: &str, body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The value of one sample of a Prometheus text scrape, e.g. `rerank_connections_closed_total{reason="age"}`;
/// None when it is absent or the scrape failed.
pub async fn metric(addr: std::net::SocketAddr, sample: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(sample))
        .and_then(|rest| rest.trim().parse().ok())
}
