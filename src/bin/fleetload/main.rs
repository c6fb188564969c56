//! Load for a fleet behind a balancer: unary gRPC, RerankStream and HTTP `/v2/rerank` calls at steady rates
//! (open loop) or back to back (closed loop), every call's kind, start, end and outcome written to a JSON
//! report for the fleet check to judge. Runs until --duration passes or SIGINT/SIGTERM, then lets the calls in
//! flight end (each has a deadline) before it writes the report. A gRPC call that failed before its request
//! left the client (queued on a connection the server was closing) is retried once, as gRPC clients do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::proto::{
    rerank_stream_request, rerank_stream_response, DocumentChunk, RerankRequest, RerankResponse,
    RerankStart, RerankStreamRequest, RerankStreamResponse,
};
use tonic::transport::Channel;

#[path = "../loadgen/texts.rs"]
#[allow(dead_code)]
mod texts;
use texts::{text, Lcg};

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

/// Requests made once and sent again and again (in turn), so that the client spends its CPU on calls, not on
/// making texts: this client shares the machine with the fleet it loads.
struct Pool {
    queries: Vec<String>,
    documents: Vec<Vec<String>>,
    /// The same requests as HTTP JSON bodies.
    bodies: Vec<hyper::body::Bytes>,
}

/// Distinct requests in the pool.
const POOL: usize = 256;

impl Pool {
    fn new(args: &Args) -> Self {
        let mut rng = Lcg(args.seed);
        let (lo, hi) = (args.min_words, args.max_words.max(args.min_words));
        let documents = |rng: &mut Lcg| -> Vec<String> {
            (0..args.documents)
                .map(|_| {
                    let words = lo + rng.below(hi - lo + 1);
                    text(rng, words)
                })
                .collect()
        };
        let (mut queries, mut all) = (Vec::new(), Vec::new());
        for _ in 0..POOL {
            queries.push(text(&mut rng, 8));
            all.push(documents(&mut rng));
        }
        let bodies = queries
            .iter()
            .zip(&all)
            .map(|(query, documents)| {
                let body = serde_json::json!({ "query": query, "documents": documents });
                hyper::body::Bytes::from(body.to_string())
            })
            .collect();
        Self {
            queries,
            documents: all,
            bodies,
        }
    }
}

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

/// Whether a call failed before its request left the client: hyper had it queued for a connection that closed
/// (the server's `max_connection_age` or drain sent GOAWAY). The server never saw it, so it is safe to send
/// again; gRPC's own clients do so transparently (gRFC A6), tonic does not.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        source = error.source();
    }
    false
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

impl Load {
    /// Sends call `n` as a unary Rerank, once more if the first attempt never left the client.
    async fn call_unary(&self, n: u64) -> Result<tonic::Response<RerankResponse>, tonic::Status> {
        let mut client = self.grpc(n);
        match client.rerank(self.unary_request(n)).await {
            Err(status) if never_sent(&status) => {
                self.unsent_retried.fetch_add(1, Ordering::Relaxed);
                client.rerank(self.unary_request(n)).await
            }
            other => other,
        }
    }

    /// Opens call `n` as a RerankStream sending what `outbound` makes (with the call's deadline when `timed`),
    /// once more if the first attempt never left the client.
    async fn open_stream<S>(
        &self,
        n: u64,
        timed: bool,
        outbound: impl Fn() -> S,
    ) -> Result<tonic::Response<tonic::Streaming<RerankStreamResponse>>, tonic::Status>
    where
        S: futures::Stream<Item = RerankStreamRequest> + Send + 'static,
    {
        let request = || {
            let mut request = tonic::Request::new(outbound());
            if timed {
                request.set_timeout(self.args.deadline.into());
            }
            request
        };
        let mut client = self.grpc(n);
        match client.rerank_stream(request()).await {
            Err(status) if never_sent(&status) => {
                self.unsent_retried.fetch_add(1, Ordering::Relaxed);
                client.rerank_stream(request()).await
            }
            other => other,
        }
    }

    fn unary_request(&self, n: u64) -> tonic::Request<RerankRequest> {
        let i = self.pick(n);
        let mut request = tonic::Request::new(RerankRequest {
            query: self.pool.queries[i].clone(),
            documents: self.pool.documents[i].clone(),
            ..Default::default()
        });
        request.set_timeout(self.args.deadline.into());
        request
    }

    fn stream_messages(&self, n: u64) -> Vec<RerankStreamRequest> {
        let i = self.pick(n);
        let start = RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Start(RerankStart {
                query: self.pool.queries[i].clone(),
                top_n: 5,
                ..Default::default()
            })),
        };
        std::iter::once(start)
            .chain((0..self.args.stream_chunks).map(|c| RerankStreamRequest {
                item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                    documents: self.pool.documents[(i + c + 1) % POOL].clone(),
                })),
            }))
            .collect()
    }

    /// A unary call dropped by its client after a few milliseconds (a user who gave up).
    async fn cancelled_unary(self, n: u64) {
        let started = Instant::now();
        let call = self.call_unary(n);
        let outcome = match tokio::time::timeout(Duration::from_millis(5 + n % 40), call).await {
            Err(_) => "cancelled_by_client".to_string(),
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(status)) => code_name(status.code()),
        };
        self.record("cancelled_unary", started, outcome);
    }

    /// A stream whose client sends `start` and one chunk, reads nothing and goes away.
    async fn cancelled_stream(self, n: u64) {
        let started = Instant::now();
        // The request side stays open (no half-close), so the call is still running when it is dropped.
        let outbound = || {
            let messages: Vec<RerankStreamRequest> =
                self.stream_messages(n).into_iter().take(2).collect();
            futures::stream::iter(messages).chain(futures::stream::pending())
        };
        let call = async {
            let mut inbound = self.open_stream(n, false, outbound).await?.into_inner();
            inbound.message().await
        };
        let outcome = match tokio::time::timeout(Duration::from_millis(20 + n % 50), call).await {
            Err(_) | Ok(Ok(_)) => "cancelled_by_client".to_string(),
            Ok(Err(status)) => code_name(status.code()),
        };
        self.record("cancelled_stream", started, outcome);
    }

    /// A stream that sends everything and never reads: the server must end it (stream_idle_timeout) once its
    /// unread scores fill the window, or finish it; the client lets go after --unread-hold.
    async fn unread_stream(self, n: u64) {
        let started = Instant::now();
        let outbound = || futures::stream::iter(self.stream_messages(n));
        let outcome = match self.open_stream(n, false, outbound).await {
            Ok(response) => {
                let held = response.into_inner();
                tokio::time::sleep(self.args.unread_hold.into()).await;
                drop(held);
                "unread_dropped".to_string()
            }
            Err(status) => code_name(status.code()),
        };
        self.record("unread_stream", started, outcome);
    }

    /// An HTTP/1.1 client that sends its request and closes the connection without waiting for the answer.
    async fn http_disconnect(self, n: u64) {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        let body = self.pool.bodies[self.pick(n)].clone();
        let head = format!(
            "POST /v2/rerank HTTP/1.1\r\nhost: load\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let sent = async {
            let mut socket = tokio::net::TcpStream::connect(&self.args.target).await?;
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(&body).await?;
            socket.flush().await
        };
        let outcome = match sent.await {
            Ok(()) => "cancelled_by_client".to_string(),
            Err(_) => "http_conn_error".to_string(),
        };
        self.record("http_disconnect", started, outcome);
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut grpc = Vec::new();
    for _ in 0..args.grpc_connections.max(1) {
        // Lazy: a channel connects (and reconnects) as calls need it, as a long-lived client does.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.target))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        grpc.push(RerankerServiceClient::new(channel).max_decoding_message_size(64 << 20));
    }
    let http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let load = Load {
        pool: Arc::new(Pool::new(&args)),
        args: Arc::new(args.clone()),
        grpc,
        http,
        began: Instant::now(),
        records: Arc::default(),
        unsent_retried: Arc::default(),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut drivers = Vec::new();
    match args.closed {
        Some(workers) => {
            for worker in 0..workers {
                drivers.push(tokio::spawn(closed_worker(
                    load.clone(),
                    worker,
                    stopped.clone(),
                )));
            }
        }
        None => {
            for (kind, rate) in [
                ("unary", args.unary_rate),
                ("stream", args.stream_rate),
                ("http", args.http_rate),
                ("cancelled_unary", args.cancel_rate),
                ("cancelled_stream", args.stream_cancel_rate),
                ("unread_stream", args.unread_stream_rate),
                ("http_disconnect", args.http_disconnect_rate),
            ] {
                let (load, stopped) = (load.clone(), stopped.clone());
                drivers.push(tokio::spawn(async move {
                    for call in steady(load, kind, rate, stopped).await {
                        let _ = call.await;
                    }
                }));
            }
        }
    }
    stop_signal(args.duration.into()).await;
    let stopped_at = load.ms(Instant::now());
    let _ = stop.send(true);
    for driver in drivers {
        let _ = driver.await;
    }
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
