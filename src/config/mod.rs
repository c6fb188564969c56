//! The server's one typed configuration, layered by figment: defaults < config file < RERANK_* env < CLI flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::error::StartupError;

mod validate;
mod values;

pub use values::{IpRange, Secret};

/// Every setting of the server. Field docs are repeated, with defaults, in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Local model directory, or a Hugging Face Hub model id.
    pub model_id: String,
    /// Hub revision (branch, tag or commit) when `model_id` is a hub id.
    pub revision: String,
    /// Longest pair in tokens; defaults to min(tokenizer model_max_length, model positions).
    pub max_length: Option<usize>,
    /// Compute device: "auto" (cuda:0 when built with CUDA and a GPU is present, else cpu), "cpu", "cuda:N", or
    /// a comma-separated list of them / "cuda:all": one engine per device, fed by the one scheduler.
    pub device: String,
    /// Weight and activation dtype: "auto" (f16 on CUDA, f32 on CPU), "f16", "bf16", "f32".
    pub dtype: String,
    pub host: String,
    pub port: u16,
    /// Padded tokens (batch size x longest pair) one batch may hold; a single longer pair runs alone.
    pub max_batch_tokens: usize,
    /// Pairs one batch may hold.
    pub max_batch_size: usize,
    /// While the engine is busy, how long a pair may wait for its batch to fill before the batch is cut anyway
    /// (an idle engine takes pending pairs at once).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// CPU threads for the model on a CPU device (the engine's compute pool), and the budget the tokenizer
    /// workers are sized from (0 = number of CPUs).
    pub threads: usize,
    /// Threads that tokenize documents (0 = from `threads`: one per eight threads on a CPU device, where the
    /// model needs the cores; all of them on a GPU, where the host only tokenizes).
    pub tokenizer_workers: usize,
    /// Bytes of documents' texts and token ids kept so that a document seen again is not tokenized again
    /// (0 = no cache).
    pub token_cache_bytes: usize,
    /// Documents in one Rerank request, or in one stream chunk.
    pub max_documents: usize,
    /// Documents in one whole RerankStream.
    pub max_stream_documents: usize,
    /// Bytes of one document.
    pub max_document_bytes: usize,
    /// Bytes of the query.
    pub max_query_bytes: usize,
    /// Bytes of one gRPC message or HTTP request body.
    pub max_message_bytes: usize,
    /// Long documents scored in windows (chunk-max): tokens neighbouring windows share.
    pub chunk_overlap_tokens: usize,
    /// Windows of one document scored at most (a call may ask for fewer).
    pub max_chunks_per_doc: usize,
    /// Pairs admitted and not yet scored, across all requests; past it new work is RESOURCE_EXHAUSTED.
    pub max_pending_pairs: usize,
    /// Tokens of those pairs; past it new work is RESOURCE_EXHAUSTED.
    pub max_pending_tokens: usize,
    /// Pairs of one stream waiting for scores before the server stops reading that stream (back-pressure).
    pub max_stream_pending_pairs: usize,
    /// HTTP/2 streams (concurrent calls) one client connection may have open.
    pub max_concurrent_streams: u32,
    /// Longest a call may expect to wait for the engine: a call whose expected wait is longer, or whose work
    /// cannot finish before its deadline, is refused at once with RESOURCE_EXHAUSTED.
    #[serde(with = "humantime_serde")]
    pub max_queue_time: Duration,
    /// How long one batch should run on the device; batches are cut to the tokens the engine's measured
    /// speed computes in this time (capped by max_batch_tokens). "0s" picks by device: 250ms on a CPU,
    /// 50ms on a GPU.
    #[serde(with = "humantime_serde")]
    pub target_batch_time: Duration,
    /// Rerank calls (gRPC unary and streams, HTTP) in progress across all connections; past it new calls are refused
    /// at once with RESOURCE_EXHAUSTED.
    pub max_concurrent_calls: usize,
    /// Bytes of requests received but not yet tokenized, and of document texts held for return_documents,
    /// across all calls; past it new work is refused at once with RESOURCE_EXHAUSTED.
    pub max_inflight_bytes: usize,
    /// HTTP/2 keepalive: a PING is sent after this long without traffic on a connection, and the connection
    /// is closed when it is not answered within `keepalive_timeout` (half-open peers are noticed).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A RerankStream whose client neither reads scores nor sends documents for this long is ended with
    /// ABORTED and its pending work released.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Consecutive batches that fail on the device, even pair by pair, before the engine is declared broken:
    /// it stops, health turns NOT_SERVING and calls get UNAVAILABLE (so clients go to another replica).
    pub max_consecutive_failures: usize,
    /// When set, every rerank call and Info needs `authorization: Bearer <api_key>`; health stays open. Never
    /// logged or reported.
    pub api_key: Option<Secret>,
    /// PEM certificate chain and private key: when both are set, the listener speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish, after `drain_delay`, before the server
    /// ends those still open with UNAVAILABLE and exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// On SIGTERM/SIGINT, how long the server keeps taking calls with health already NOT_SERVING, so that work
    /// a load balancer routes here before it notices still succeeds; then connections are closed gracefully.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Connections are closed gracefully (HTTP/2 GOAWAY) after about this age (±10%), with `drain_timeout` for
    /// their calls to finish, so that clients balancing over DNS reach new replicas. "0s" = never.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Connections open at once; past it a new connection is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A request must arrive whole within this time of its headers: an HTTP body, a gRPC request message, a
    /// RerankStream's `start` message. Until then it holds no call slot.
    #[serde(with = "humantime_serde")]
    pub request_read_timeout: Duration,
    /// HTTP/1.1 request headers (and the first bytes of a new connection) must arrive within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no call in progress (HTTP/1.1 keep-alive between requests, HTTP/2 without streams) is
    /// closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Header fields of one request (HTTP/1.1).
    pub max_headers: usize,
    /// Bytes of one request's headers (HTTP/1.1 request line and headers; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// The share (0 to 1] of call slots and of admission's pairs, tokens and bytes one client may hold. A client
    /// is the peer's IP address, or the address a trusted proxy names in `x-forwarded-for`.
    pub max_client_share: f64,
    /// Addresses or CIDR ranges of proxies (load balancers) whose `x-forwarded-for` header names the client.
    pub trusted_proxies: Vec<IpRange>,
    /// When not 0: a second, plaintext listener on this port serving only health (gRPC health and GET
    /// /health), for probes when the main port speaks TLS.
    pub health_port: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model_id: "cross-encoder/ms-marco-MiniLM-L6-v2".into(),
            revision: "main".into(),
            max_length: None,
            device: "auto".into(),
            dtype: "auto".into(),
            host: "0.0.0.0".into(),
            port: 50051,
            max_batch_tokens: 16_384,
            max_batch_size: 256,
            max_wait: Duration::from_millis(2),
            threads: 0,
            tokenizer_workers: 0,
            token_cache_bytes: 64 * 1024 * 1024,
            max_documents: 1_000,
            max_stream_documents: 1_000_000,
            max_document_bytes: 256 * 1024,
            max_query_bytes: 16 * 1024,
            max_message_bytes: 32 * 1024 * 1024,
            chunk_overlap_tokens: 80,
            max_chunks_per_doc: 64,
            max_pending_pairs: 200_000,
            max_pending_tokens: 20_000_000,
            max_stream_pending_pairs: 2048,
            max_concurrent_streams: 100,
            max_queue_time: Duration::from_secs(10),
            target_batch_time: Duration::ZERO,
            max_concurrent_calls: 512,
            max_inflight_bytes: 1 << 30,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            stream_idle_timeout: Duration::from_secs(60),
            max_consecutive_failures: 3,
            api_key: None,
            tls_cert: None,
            tls_key: None,
            drain_timeout: Duration::from_secs(30),
            drain_delay: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(300),
            max_connections: 10_000,
            request_read_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_headers: 100,
            max_header_bytes: 16 * 1024,
            max_client_share: 0.5,
            trusted_proxies: Vec::new(),
            health_port: 0,
        }
    }
}

/// Command-line overrides; each flag left out keeps the value from the lower layers.
#[derive(Debug, Default, Clone, clap::Parser, Serialize)]
#[command(
    name = "rerank-server",
    version,
    about = "gRPC inference server for cross-encoder rerankers"
)]
pub struct Cli {
    /// TOML configuration file (layered over the built-in defaults).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Instead of serving: ask the gRPC health service at this address (e.g. http://127.0.0.1:50051) and exit
    /// 0 if it is SERVING, 1 otherwise. For container health checks.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip)]
    pub health_check: Option<String>,
    /// Local model directory or Hugging Face Hub model id.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Hub revision of the model.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Longest pair in tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Compute device: auto, cpu, cuda:N.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Model dtype: auto, f16, bf16, f32.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Address to listen on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port to listen on (0 picks a free one).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    /// e.g. "2ms".
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_workers: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_documents: Option<usize>,
}

impl Config {
    /// Layers defaults, the optional config file, `RERANK_*` environment variables and CLI flags.
    pub fn load(cli: &Cli) -> Result<Self, StartupError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &cli.config {
            if !path.is_file() {
                return Err(StartupError::Config(format!(
                    "config file {} not found",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(Env::prefixed("RERANK_"))
            .merge(Serialized::defaults(cli))
            .extract()
            .map_err(|e| StartupError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, StartupError> {
        let host = self.host.trim_matches(|c| c == '[' || c == ']');
        let ip: std::net::IpAddr = match host {
            "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
            other => other.parse().map_err(|_| {
                StartupError::Config(format!("host {other:?} is not an IP address"))
            })?,
        };
        Ok(SocketAddr::new(ip, self.port))
    }

    /// The configuration as JSON for the start-up log; secrets appear as "[redacted]".
    pub fn to_log_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The CPU thread budget: `threads`, or every CPU.
    pub fn cpu_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Tokenizer workers: as configured, else from the thread budget (see `tokenizer_workers`).
    pub fn tokenizer_threads(&self, model_on_cpu: bool) -> usize {
        match (self.tokenizer_workers, model_on_cpu) {
            (0, true) => (self.cpu_threads() / 8).max(1),
            (0, false) => self.cpu_threads(),
            (n, _) => n,
        }
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rerank.toml",
                "port = 6000\nmax_batch_size = 7\nmax_wait = \"9ms\"\nhost = \"127.0.0.1\"",
            )?;
            jail.set_env("RERANK_PORT", "7000");
            jail.set_env("RERANK_MAX_DOCUMENTS", "42");
            let cli = Cli::parse_from([
                "rerank-server",
                "--config",
                "rerank.toml",
                "--max-documents",
                "43",
            ]);
            let config = Config::load(&cli).map_err(|e| e.to_string())?;
            assert_eq!(config.max_batch_size, 7, "file over defaults");
            assert_eq!(config.max_wait, Duration::from_millis(9));
            assert_eq!(config.port, 7000, "env over file");
            assert_eq!(config.max_documents, 43, "cli over env");
            assert_eq!(config.max_batch_tokens, Config::default().max_batch_tokens);
            Ok(())
        });
    }

    #[test]
    fn rejects_unknown_keys_and_zero_limits() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_batch_sise = 3")?;
            let cli = Cli::parse_from(["rerank-server", "--config", "bad.toml"]);
            assert!(Config::load(&cli).is_err());
            let cli = Cli::parse_from(["rerank-server", "--max-documents", "0"]);
            let err = Config::load(&cli).expect_err("zero limit");
            assert!(err.to_string().contains("max_documents"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_api_key_never_reaches_the_log_or_debug_output() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RERANK_API_KEY", "hunter2-secret");
            let config = Config::load(&Cli::default()).map_err(|e| e.to_string())?;
            assert_eq!(
                config.api_key.as_ref().map(Secret::expose),
                Some("hunter2-secret"),
                "the server still sees the key"
            );
            let logged = config.to_log_string();
            let debugged = format!("{config:?}");
            for text in [&logged, &debugged] {
                assert!(!text.contains("hunter2"), "{text}");
                assert!(text.contains(Secret::REDACTED), "{text}");
            }
            Ok(())
        });
    }

    #[test]
    fn committed_default_file_matches_builtin_defaults() {
        let text = include_str!("../../config/default.toml");
        let from_file: Config = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .expect("default.toml parses");
        assert_eq!(from_file, Config::default());
    }
}
