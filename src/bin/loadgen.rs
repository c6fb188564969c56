//! Load generator: concurrent gRPC clients sending Rerank requests; prints throughput, latency and errors.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use rerank_server::proto::reranker_client::RerankerClient;
use rerank_server::proto::RerankRequest;
use tonic::transport::Channel;

#[derive(Debug, Clone, Parser)]
#[command(about = "Closed-loop load generator for rerank-server")]
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
}

const WORDS: &[&str] = &[
    "the", "market", "river", "city", "bread", "fish", "fruit", "people", "sell", "old", "new",
    "north", "south", "trade", "history", "bridge", "harbour", "winter", "summer", "price",
    "quality", "fresh", "local", "famous", "street", "morning", "evening", "visitors", "stalls",
    "season", "weather", "coffee", "tea", "music", "festival",
];

/// A small deterministic generator, so runs are repeatable without a dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn text(rng: &mut Lcg, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[rng.below(WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn word_range(spec: &str) -> Result<(usize, usize), String> {
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|e| format!("--doc-words {spec:?}: {e}"))
    };
    match spec.split_once("..") {
        Some((lo, hi)) => Ok((parse(lo)?, parse(hi)?.max(parse(lo)?))),
        None => parse(spec).map(|n| (n, n)),
    }
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
}

async fn run_client(
    mut client: RerankerClient<Channel>,
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
        let request = make_request(&mut rng, &args, range);
        let started = Instant::now();
        match client.rerank(request).await {
            Ok(_) => {
                report.latencies.push(started.elapsed());
                report.pairs += args.documents as u64;
            }
            Err(status) => {
                *report
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1
            }
        }
    }
    report
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    word_range(&args.doc_words)?;
    let channel = Channel::from_shared(args.addr.clone())?.connect().await?;
    let client = RerankerClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let duration: Duration = args.duration.into();
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|i| {
            tokio::spawn(run_client(
                client.clone(),
                args.clone(),
                args.seed + i as u64 * 7919,
                until,
            ))
        })
        .collect();
    let mut total = ClientReport::default();
    for task in tasks {
        let report = task.await?;
        total.latencies.extend(report.latencies);
        total.pairs += report.pairs;
        for (code, n) in report.errors {
            *total.errors.entry(code).or_default() += n;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    total.latencies.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "concurrency={} documents={} doc_words={} requests={} elapsed={:.1}s",
        args.concurrency,
        args.documents,
        args.doc_words,
        total.latencies.len(),
        elapsed
    );
    println!(
        "pairs/s={:.1} requests/s={:.2} p50={:.1}ms p95={:.1}ms p99={:.1}ms errors={:?}",
        total.pairs as f64 / elapsed,
        total.latencies.len() as f64 / elapsed,
        ms(percentile(&total.latencies, 0.50)),
        ms(percentile(&total.latencies, 0.95)),
        ms(percentile(&total.latencies, 0.99)),
        total.errors
    );
    Ok(())
}
