//! Load generator: closed-loop clients, open-loop arrivals at a fixed rate, or one large stream; prints
//! throughput, latency percentiles and outcomes by gRPC status code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::proto::{InfoRequest, RerankRequest, SchedulerStats};
use tonic::transport::Channel;

mod texts;
use texts::{one_token_words, text, word_range, Lcg, WORD_POOL};

#[derive(Debug, Clone, Parser)]
#[command(about = "Load generator for rerank-server")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Documents per request.
    #[arg(long, default_value_t = 100)]
    documents: usize,
    /// Approximate words per document: a fixed count ("128") or a uniform range ("32..480").
    #[arg(long, default_value = "32..480")]
    doc_words: String,
    /// Words in the query.
    #[arg(long, default_value_t = 12)]
    query_words: usize,
    /// How long to send requests.
    #[arg(long, default_value = "20s")]
    duration: humantime::Duration,
    /// Requests per client sent before measuring starts.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Open loop: start this many requests per second whatever the answers (instead of --concurrency clients).
    #[arg(long)]
    rate: Option<f64>,
    /// Per-request deadline (grpc-timeout), so no request can hang.
    #[arg(long, default_value = "120s")]
    timeout: humantime::Duration,
    /// Stream mode: send one RerankStream of this many documents (in chunks of --chunk) and report it.
    #[arg(long)]
    stream_documents: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    chunk: usize,
    /// The model's tokenizer.json: texts are then built from words that are exactly one token each, so
    /// --doc-words and --query-words count tokens (a pair adds the model's special tokens).
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
}

fn make_request(rng: &mut Lcg, args: &Args, (lo, hi): (usize, usize)) -> RerankRequest {
    RerankRequest {
        query: text(rng, args.query_words),
        documents: (0..args.documents)
            .map(|_| {
                let words = lo + rng.below(hi - lo + 1);
                text(rng, words)
            })
            .collect(),
        ..Default::default()
    }
}

#[derive(Default)]
struct ClientReport {
    latencies: Vec<Duration>,
    pairs: u64,
    errors: BTreeMap<String, u64>,
    /// Time to the answer of calls that failed, by status code (how fast refusals come back).
    failed_latencies: BTreeMap<String, Vec<Duration>>,
}

impl ClientReport {
    /// Adds one client's report to the total.
    fn absorb(&mut self, report: ClientReport) {
        self.latencies.extend(report.latencies);
        self.pairs += report.pairs;
        for (code, n) in report.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, latencies) in report.failed_latencies {
            self.failed_latencies
                .entry(code)
                .or_default()
                .extend(latencies);
        }
    }
}

fn with_timeout(request: RerankRequest, args: &Args) -> tonic::Request<RerankRequest> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(args.timeout.into());
    request
}

/// Counts one finished call, which took `latency`.
fn record(
    report: &mut ClientReport,
    outcome: Result<(), tonic::Status>,
    latency: Duration,
    pairs: u64,
) {
    let code = match outcome {
        Ok(()) => {
            report.latencies.push(latency);
            report.pairs += pairs;
            "Ok".to_string()
        }
        Err(status) => {
            let code = format!("{:?}", status.code());
            report
                .failed_latencies
                .entry(code.clone())
                .or_default()
                .push(latency);
            code
        }
    };
    *report.errors.entry(code).or_default() += 1;
}

/// Open loop: a request starts every 1/rate seconds until `until`, each on its own task.
async fn run_open_loop(
    client: RerankerServiceClient<Channel>,
    args: Args,
    rate: f64,
    until: Instant,
) -> ClientReport {
    let mut rng = Lcg(args.seed);
    let range = word_range(&args.doc_words).unwrap_or((32, 480));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < until {
        ticker.tick().await;
        let request = with_timeout(make_request(&mut rng, &args, range), &args);
        let mut client = client.clone();
        let pairs = args.documents as u64;
        tasks.spawn(async move {
            let started = Instant::now();
            let outcome = client.rerank(request).await.map(|_| ());
            // Measured here: the task is joined only after the run.
            (outcome, started.elapsed(), pairs)
        });
    }
    let mut report = ClientReport::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((outcome, latency, pairs)) => record(&mut report, outcome, latency, pairs),
            Err(_) => {
                *report
                    .errors
                    .entry("client task failed".into())
                    .or_default() += 1
            }
        }
    }
    report
}

/// One large RerankStream: time to the first scores, to the final ranking, and pairs/s.
async fn run_stream(
    mut client: RerankerServiceClient<Channel>,
    args: &Args,
    documents: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use rerank_server::proto::{
        rerank_stream_request, rerank_stream_response, DocumentChunk, RerankStart,
        RerankStreamRequest,
    };
    let mut rng = Lcg(args.seed);
    let (lo, hi) = word_range(&args.doc_words)?;
    let query = text(&mut rng, args.query_words);
    let start = RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query,
            top_n: 10,
            ..Default::default()
        })),
    };
    let chunk_size = args.chunk.max(1);
    let chunks = documents.div_ceil(chunk_size);
    // Documents are generated as the server reads them, so the client holds one chunk at a time.
    let outbound = futures::stream::iter(std::iter::once(start).chain((0..chunks).map(move |c| {
        let count = chunk_size.min(documents - c * chunk_size);
        let documents = (0..count)
            .map(|_| {
                let words = lo + rng.below(hi - lo + 1);
                text(&mut rng, words)
            })
            .collect();
        RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                documents,
            })),
        }
    })));
    let started = Instant::now();
    let mut request = tonic::Request::new(outbound);
    request.set_timeout(args.timeout.into());
    let mut inbound = client.rerank_stream(request).await?.into_inner();
    let (mut first, mut scored, mut messages) = (None, 0usize, 0usize);
    while let Some(message) = inbound.message().await? {
        messages += 1;
        match message.item {
            Some(rerank_stream_response::Item::Scores(chunk)) => {
                first.get_or_insert_with(|| started.elapsed());
                scored += chunk.results.len();
            }
            Some(rerank_stream_response::Item::Final(response)) => {
                let elapsed = started.elapsed();
                println!(
                    "stream documents={documents} chunk={chunk_size} scored={scored} messages={messages} \
                     first_scores={:.1}ms total={:.1}s pairs/s={:.1} final_pairs={}",
                    first.unwrap_or_default().as_secs_f64() * 1e3,
                    elapsed.as_secs_f64(),
                    documents as f64 / elapsed.as_secs_f64(),
                    response.usage.map_or(0, |u| u.pairs)
                );
                if let Some(usage) = response.usage {
                    println!(
                        "stream tokens_per_pair={:.1}",
                        usage.tokens as f64 / f64::from(usage.pairs.max(1))
                    );
                }
            }
            None => {}
        }
    }
    Ok(())
}

async fn run_client(
    mut client: RerankerServiceClient<Channel>,
    args: Args,
    seed: u64,
    until: Instant,
) -> ClientReport {
    let mut rng = Lcg(seed);
    let mut report = ClientReport::default();
    let range = word_range(&args.doc_words).unwrap_or((32, 480));
    for _ in 0..args.warmup {
        let _ = client.rerank(make_request(&mut rng, &args, range)).await;
    }
    while Instant::now() < until {
        let request = with_timeout(make_request(&mut rng, &args, range), &args);
        let started = Instant::now();
        let outcome = client.rerank(request).await.map(|_| ());
        record(
            &mut report,
            outcome,
            started.elapsed(),
            args.documents as u64,
        );
    }
    report
}

/// The server's scheduler counters (None if Info is not answered).
async fn server_stats(client: &RerankerServiceClient<Channel>) -> Option<SchedulerStats> {
    let mut client = client.clone();
    let info = client.info(InfoRequest {}).await.ok()?.into_inner();
    info.stats
}

/// What the server did during the run: batches, their size and padding, and how busy the engine was.
fn print_server_stats(before: &SchedulerStats, after: &SchedulerStats, elapsed: f64) {
    let batches = after.batches.saturating_sub(before.batches);
    let pairs = after.pairs.saturating_sub(before.pairs);
    let padded = after.padded_tokens.saturating_sub(before.padded_tokens);
    let real = after.real_tokens.saturating_sub(before.real_tokens);
    let busy = after.engine_busy_seconds - before.engine_busy_seconds;
    let tokenizing = after.tokenizer_busy_seconds - before.tokenizer_busy_seconds;
    println!(
        "server: batches={batches} pairs/batch={:.1} padded_tokens/batch={:.0} padding_ratio={:.2} engine_busy={:.0}% tokenizer_cores={:.1} real_tokens/s={:.0}",
        pairs as f64 / batches.max(1) as f64,
        padded as f64 / batches.max(1) as f64,
        padded as f64 / real.max(1) as f64,
        100.0 * busy / elapsed.max(1e-9),
        tokenizing / elapsed.max(1e-9),
        real as f64 / elapsed.max(1e-9),
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The run's throughput, latency percentiles and outcomes (and the server's own counters when it has them).
fn print_report(
    args: &Args,
    total: &mut ClientReport,
    elapsed: f64,
    stats: Option<(SchedulerStats, SchedulerStats)>,
) {
    total.latencies.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mode = match args.rate {
        Some(rate) => format!("rate={rate}/s"),
        None => format!("concurrency={}", args.concurrency),
    };
    println!(
        "{mode} documents={} doc_words={} ok_requests={} elapsed={:.1}s",
        args.documents,
        args.doc_words,
        total.latencies.len(),
        elapsed
    );
    if let Some((before, after)) = &stats {
        print_server_stats(before, after, elapsed);
    }
    println!(
        "pairs/s={:.1} requests/s={:.2} p50={:.1}ms p95={:.1}ms p99={:.1}ms outcomes={:?}",
        total.pairs as f64 / elapsed,
        total.latencies.len() as f64 / elapsed,
        ms(percentile(&total.latencies, 0.50)),
        ms(percentile(&total.latencies, 0.95)),
        ms(percentile(&total.latencies, 0.99)),
        total.errors
    );
    for (code, latencies) in &mut total.failed_latencies {
        latencies.sort_unstable();
        println!(
            "{code}: answered after p50={:.1}ms p99={:.1}ms max={:.1}ms",
            ms(percentile(latencies, 0.50)),
            ms(percentile(latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default())
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    word_range(&args.doc_words)?;
    if let Some(path) = &args.tokenizer {
        let (words, per_word) = one_token_words(path)?;
        println!(
            "word pool: {} one-token words from {}, {per_word:.2} tokens per word in running text",
            words.len(),
            path.display()
        );
        let _ = WORD_POOL.set(words);
    }
    let channel = Channel::from_shared(args.addr.clone())?.connect().await?;
    let client = RerankerServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    if let Some(documents) = args.stream_documents {
        return run_stream(client, &args, documents).await;
    }
    let duration: Duration = args.duration.into();
    let before = server_stats(&client).await;
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = match args.rate {
        Some(rate) => vec![tokio::spawn(run_open_loop(
            client.clone(),
            args.clone(),
            rate,
            until,
        ))],
        None => (0..args.concurrency)
            .map(|i| {
                tokio::spawn(run_client(
                    client.clone(),
                    args.clone(),
                    args.seed + i as u64 * 7919,
                    until,
                ))
            })
            .collect(),
    };
    let mut total = ClientReport::default();
    for task in tasks {
        total.absorb(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = server_stats(&client).await;
    print_report(&args, &mut total, elapsed, before.zip(after));
    Ok(())
}
