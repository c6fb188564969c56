//! Load for a fleet behind a balancer: unary gRPC, RerankStream and HTTP `/v2/rerank` calls at steady rates
//! (open loop) or back to back (closed loop), every call's kind, start, end and outcome written to a JSON
//! report for the fleet check to judge. Runs until --duration passes or SIGINT/SIGTERM, then lets the calls in
//! flight end (each has a deadline) before it writes the report. A gRPC call that failed before its request
//! left the client (queued on a connection the server was closing) is retried once, as gRPC clients do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rerank_server::proto::rerank_stream_response;
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use tonic::transport::Channel;

#[path = "../loadgen/texts.rs"]
#[allow(dead_code)]
mod texts;

mod calls;
mod pool;

use pool::{Pool, POOL};

use calls::code_name;

#[derive(Debug, Clone, Parser)]
#[command(about = "Steady load of unary gRPC, RerankStream and HTTP calls, every outcome recorded")]
struct Args {
    /// host:port of the balancer (or one replica).
    #[arg(long)]
    target: String,
    /// Unary Rerank calls started per second.
    #[arg(long, default_value_t = 0.0)]
    unary_rate: f64,
    /// RerankStream calls started per second.
    #[arg(long, default_value_t = 0.0)]
    stream_rate: f64,
    /// HTTP/1.1 POST /v2/rerank calls started per second.
    #[arg(long, default_value_t = 0.0)]
    http_rate: f64,
    /// Unary calls per second that the client cancels (drops) halfway through their expected time.
    #[arg(long, default_value_t = 0.0)]
    cancel_rate: f64,
    /// Streams per second that the client cancels after sending their first chunk.
    #[arg(long, default_value_t = 0.0)]
    stream_cancel_rate: f64,
    /// Streams per second that send all their chunks and never read an answer; the client lets go of each
    /// after --unread-hold.
    #[arg(long, default_value_t = 0.0)]
    unread_stream_rate: f64,
    #[arg(long, default_value = "70s")]
    unread_hold: humantime::Duration,
    /// HTTP/1.1 calls per second whose client closes the connection right after sending the request.
    #[arg(long, default_value_t = 0.0)]
    http_disconnect_rate: f64,
    /// Closed loop instead: this many workers, each with one call in flight (unary and HTTP in turn).
    #[arg(long)]
    closed: Option<usize>,
    /// Stops starting calls after this long (SIGINT/SIGTERM stop it sooner).
    #[arg(long, default_value = "60s")]
    duration: humantime::Duration,
    /// Every call's deadline (grpc-timeout; the HTTP client gives up then too).
    #[arg(long, default_value = "5s")]
    deadline: humantime::Duration,
    /// Documents per unary and HTTP call, and per stream chunk.
    #[arg(long, default_value_t = 8)]
    documents: usize,
    /// Document chunks per stream.
    #[arg(long, default_value_t = 3)]
    stream_chunks: usize,
    /// Words per document (a uniform range).
    #[arg(long, default_value_t = 20)]
    min_words: usize,
    #[arg(long, default_value_t = 60)]
    max_words: usize,
    /// gRPC connections (HTTP/2), calls spread over them in turn.
    #[arg(long, default_value_t = 2)]
    grpc_connections: usize,
    /// Where the JSON report goes.
    #[arg(long)]
    report: std::path::PathBuf,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// One call: what it was, when it started and ended (ms since the run began) and how it ended.
type Record = (&'static str, u64, u64, String);

#[derive(Clone)]
struct Load {
    args: Arc<Args>,
    pool: Arc<Pool>,
    grpc: Vec<RerankerServiceClient<Channel>>,
    http: Client<HttpConnector, Full<hyper::body::Bytes>>,
    began: Instant,
    records: Arc<Mutex<Vec<Record>>>,
    /// Calls retried because their first attempt never left the client.
    unsent_retried: Arc<AtomicU64>,
}

impl Load {
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.began).as_millis()).unwrap_or(u64::MAX)
    }

    fn record(&self, kind: &'static str, started: Instant, outcome: String) {
        let record = (kind, self.ms(started), self.ms(Instant::now()), outcome);
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    fn pick(&self, n: u64) -> usize {
        (n as usize).wrapping_mul(7919) % POOL
    }

    fn grpc(&self, n: u64) -> RerankerServiceClient<Channel> {
        self.grpc[n as usize % self.grpc.len()].clone()
    }

    async fn unary(self, n: u64) {
        let started = Instant::now();
        // The client keeps its own deadline too, as gRPC clients do: a replica that cannot answer (a cut link)
        // must not hold the call past it.
        let call = tokio::time::timeout(self.args.deadline.into(), self.call_unary(n));
        let outcome = match call.await {
            Ok(Ok(reply)) if reply.get_ref().results.len() == self.args.documents => {
                "ok".to_string()
            }
            Ok(Ok(_)) => "incomplete".to_string(),
            Ok(Err(status)) => code_name(status.code()),
            Err(_) => code_name(tonic::Code::DeadlineExceeded),
        };
        self.record("unary", started, outcome);
    }

    async fn stream(self, n: u64) {
        let expected = self.args.documents * self.args.stream_chunks;
        let started = Instant::now();
        let outcome = async {
            let outbound = || futures::stream::iter(self.stream_messages(n));
            let mut inbound = self.open_stream(n, true, outbound).await?.into_inner();
            let (mut scored, mut finished) = (0, false);
            while let Some(message) = inbound.message().await? {
                match message.item {
                    Some(rerank_stream_response::Item::Scores(chunk)) => {
                        scored += chunk.results.len()
                    }
                    Some(rerank_stream_response::Item::Final(_)) => finished = true,
                    None => {}
                }
            }
            Ok::<_, tonic::Status>(if finished && scored == expected {
                "ok".to_string()
            } else {
                "incomplete".to_string()
            })
        };
        let outcome = match tokio::time::timeout(self.args.deadline.into(), outcome).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(status)) => code_name(status.code()),
            Err(_) => code_name(tonic::Code::DeadlineExceeded),
        };
        self.record("stream", started, outcome);
    }

    async fn http(self, n: u64) {
        let body = self.pool.bodies[self.pick(n)].clone();
        let request = hyper::Request::post(format!("http://{}/v2/rerank", self.args.target))
            .header("content-type", "application/json")
            .header(
                "x-request-timeout",
                format!("{}ms", self.args.deadline.as_millis()),
            )
            .body(Full::new(body));
        let started = Instant::now();
        let Ok(request) = request else {
            self.record("http", started, "bad_request".into());
            return;
        };
        let call = async {
            let response = self.http.request(request).await.map_err(|_| "conn_error")?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| "body_error")?
                .to_bytes();
            let complete = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["results"].as_array().map(Vec::len))
                == Some(self.args.documents);
            Ok::<_, &str>(match status.as_u16() {
                200 if complete => "ok".to_string(),
                200 => "incomplete".to_string(),
                code => format!("http_{code}"),
            })
        };
        let outcome = match tokio::time::timeout(self.args.deadline.into(), call).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => format!("http_{error}"),
            Err(_) => "http_deadline".to_string(),
        };
        self.record("http", started, outcome);
    }
}

/// Starts calls of one kind at `rate` per second until `stop` is set.
async fn steady(
    load: Load,
    kind: &'static str,
    rate: f64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut calls = Vec::new();
    if rate <= 0.0 {
        return calls;
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut ticks = tokio::time::interval(period);
    // Open loop: a late tick starts its calls at once, so the rate holds whatever the answers.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0u64;
    while !*stop.borrow() {
        ticks.tick().await;
        n += 1;
        let load = load.clone();
        calls.push(tokio::spawn(async move {
            match kind {
                "unary" => load.unary(n).await,
                "stream" => load.stream(n).await,
                "cancelled_unary" => load.cancelled_unary(n).await,
                "cancelled_stream" => load.cancelled_stream(n).await,
                "unread_stream" => load.unread_stream(n).await,
                "http_disconnect" => load.http_disconnect(n).await,
                _ => load.http(n).await,
            }
        }));
    }
    calls
}

async fn closed_worker(load: Load, worker: usize, stop: tokio::sync::watch::Receiver<bool>) {
    let mut n = worker as u64 * 1_000_000;
    while !*stop.borrow() {
        n += 1;
        if n.is_multiple_of(2) {
            load.clone().unary(n).await;
        } else {
            load.clone().http(n).await;
        }
    }
}

async fn stop_signal(duration: Duration) {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
}

/// The load's clients: `grpc_connections` lazy channels (each connects and reconnects as calls need it, as a
/// long-lived client does) and one pooled HTTP client.
fn connect(args: &Args) -> Result<Load, Box<dyn std::error::Error>> {
    let mut grpc = Vec::new();
    for _ in 0..args.grpc_connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.target))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        grpc.push(RerankerServiceClient::new(channel).max_decoding_message_size(64 << 20));
    }
    let http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    Ok(Load {
        pool: Arc::new(Pool::new(args)),
        args: Arc::new(args.clone()),
        grpc,
        http,
        began: Instant::now(),
        records: Arc::default(),
        unsent_retried: Arc::default(),
    })
}

/// One task per closed-loop worker, or per call kind at its steady rate.
fn drivers(
    load: &Load,
    args: &Args,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if let Some(workers) = args.closed {
        return (0..workers)
            .map(|worker| tokio::spawn(closed_worker(load.clone(), worker, stopped.clone())))
            .collect();
    }
    [
        ("unary", args.unary_rate),
        ("stream", args.stream_rate),
        ("http", args.http_rate),
        ("cancelled_unary", args.cancel_rate),
        ("cancelled_stream", args.stream_cancel_rate),
        ("unread_stream", args.unread_stream_rate),
        ("http_disconnect", args.http_disconnect_rate),
    ]
    .into_iter()
    .map(|(kind, rate)| {
        let (load, stopped) = (load.clone(), stopped.clone());
        tokio::spawn(async move {
            for call in steady(load, kind, rate, stopped).await {
                let _ = call.await;
            }
        })
    })
    .collect()
}

/// Writes every call's record, with when the load stopped, to `--report`.
fn write_report(
    load: &Load,
    args: &Args,
    stopped_at: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let records = load
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let report = serde_json::json!({
        "target": args.target,
        "deadline_ms": args.deadline.as_millis() as u64,
        "stopped_at_ms": stopped_at,
        "began_unix_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|now| now.as_millis() as u64)
            .unwrap_or(0)
            .saturating_sub(load.ms(Instant::now())),
        "calls": records,
        "unsent_retried": load.unsent_retried.load(Ordering::Relaxed),
    });
    std::fs::write(&args.report, serde_json::to_vec(&report)?)?;
    eprintln!(
        "fleetload: {} calls recorded in {} ({} retried because their first attempt never left the client)",
        records.len(),
        args.report.display(),
        load.unsent_retried.load(Ordering::Relaxed)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let load = connect(&args)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drivers = drivers(&load, &args, &stopped);
    stop_signal(args.duration.into()).await;
    let stopped_at = load.ms(Instant::now());
    let _ = stop.send(true);
    for driver in drivers {
        let _ = driver.await;
    }
    write_report(&load, &args, stopped_at)
}
