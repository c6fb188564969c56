//! The one home of the server's counters: written by admission, tokenizer, scheduler and engine, read by
//! `Info` and exported at `/metrics` in the Prometheus text format.

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::error::{Refusal, RerankError};

/// Latency buckets in seconds: 1 ms to 60 s.
const SECONDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Registers a metric built from a fixed definition. The definitions are constants of this file and their
/// names unique, so a failure here is a bug in this file, caught by every test that starts a server.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("a valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("a unique metric name");
    metric
}

/// Every metric of one server. Names, units and labels follow Prometheus conventions (`rerank_` prefix,
/// `_total` counters, `_seconds` durations); README lists them all.
pub struct Metrics {
    registry: Registry,
    /// Calls by endpoint and outcome ("ok" or the error kind).
    pub requests: IntCounterVec,
    /// Wall time of whole calls by endpoint.
    pub request_duration: HistogramVec,
    /// Documents ranked and the pairs (windows) and real tokens scored for them.
    pub documents: IntCounter,
    pub pairs: IntCounter,
    pub tokens: IntCounter,
    /// Pairs and tokens waiting in the scheduler's queue (not yet in a batch).
    pub queue_pairs: IntGauge,
    pub queue_tokens: IntGauge,
    /// Admitted and not yet scored (queued, batched or computing), and request text held.
    pub pending_pairs: IntGauge,
    pub pending_tokens: IntGauge,
    pub held_bytes: IntGauge,
    pub batch_pairs: Histogram,
    pub batch_tokens: Histogram,
    pub batch_padding_ratio: Histogram,
    /// Tokens computed by the device (padding included) and real tokens, since start.
    pub device_tokens: IntCounter,
    pub real_tokens: IntCounter,
    /// Per batch and request: the longest wait of its pairs in the queue.
    pub queue_duration: Histogram,
    /// Per push of documents: tokenization wall time.
    pub tokenize_duration: Histogram,
    /// Per batch: model time.
    pub inference_duration: Histogram,
    /// Busy time; its rate is the utilisation.
    pub engine_busy: Counter,
    pub tokenizer_busy: Counter,
    pub engine_tokens_per_second: prometheus::Gauge,
    pub refusals: IntCounterVec,
    pub cancelled_pairs: IntCounter,
    pub stalled_streams: IntCounter,
    /// Document token cache lookups that found, and did not find, the document.
    pub token_cache_hits: IntCounter,
    pub token_cache_misses: IntCounter,
    /// 1 while the server serves, else 0.
    pub serving: IntGauge,
    /// Rerank calls holding a slot among max_concurrent_calls.
    pub calls_in_progress: IntGauge,
    /// Connections open now, refused at accept (max_connections), and closed by reason.
    pub connections_open: IntGauge,
    pub connections_refused: IntCounter,
    pub connections_closed: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates metrics and registers them in one registry.
struct Register(Registry);

impl Register {
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        registered(&self.0, IntCounter::new(name, help))
    }

    /// A counter of seconds (busy time).
    fn seconds_counter(&self, name: &str, help: &str) -> Counter {
        registered(&self.0, Counter::new(name, help))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        registered(&self.0, IntGauge::new(name, help))
    }

    fn float_gauge(&self, name: &str, help: &str) -> prometheus::Gauge {
        registered(&self.0, prometheus::Gauge::new(name, help))
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        registered(&self.0, Histogram::with_opts(opts))
    }

    /// A latency histogram (1 ms to 60 s).
    fn seconds(&self, name: &str, help: &str) -> Histogram {
        self.histogram(name, help, SECONDS.to_vec())
    }

    /// Latency by one label.
    fn seconds_by(&self, name: &str, help: &str, label: &str) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(SECONDS.to_vec());
        registered(&self.0, HistogramVec::new(opts, &[label]))
    }

    /// A counter by labels; the `known` values of the first label are exported at 0 from the start, so
    /// rates over them exist before the first event.
    fn counter_by(&self, name: &str, help: &str, labels: &[&str], known: &[&str]) -> IntCounterVec {
        let counters = registered(&self.0, IntCounterVec::new(Opts::new(name, help), labels));
        for value in known {
            counters.with_label_values(&[*value]);
        }
        counters
    }
}

/// Buckets `from`, 2·`from`, … (`count` of them).
fn powers(from: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(from, 2.0, count).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Self {
        let r = Register(Registry::new());
        let refusal_reasons: Vec<&str> = Refusal::ALL.iter().map(|reason| reason.label()).collect();
        Self {
            requests: r.counter_by("rerank_requests_total", "Rerank calls by endpoint and outcome.", &["endpoint", "outcome"], &[]),
            request_duration: r.seconds_by("rerank_request_duration_seconds", "Wall time of rerank calls, from arrival to the ranking.", "endpoint"),
            documents: r.counter("rerank_documents_total", "Documents ranked."),
            pairs: r.counter("rerank_pairs_total", "(query, document) pairs scored; a chunked document counts each window."),
            tokens: r.counter("rerank_tokens_total", "Real tokens of the pairs scored, special tokens included."),
            queue_pairs: r.gauge("rerank_queue_pairs", "Pairs waiting in the scheduler's queue for a batch."),
            queue_tokens: r.gauge("rerank_queue_tokens", "Real tokens of the pairs waiting in the scheduler's queue."),
            pending_pairs: r.gauge("rerank_pending_pairs", "Pairs admitted and not yet scored, across all calls."),
            pending_tokens: r.gauge("rerank_pending_tokens", "Tokens of the pairs admitted and not yet scored."),
            held_bytes: r.gauge("rerank_held_bytes", "Bytes of request text held (not yet tokenized, or kept to return)."),
            batch_pairs: r.histogram("rerank_batch_pairs", "Pairs per batch.", powers(1.0, 11)),
            batch_tokens: r.histogram("rerank_batch_tokens", "Tokens the device computes per batch, padding included.", powers(64.0, 12)),
            batch_padding_ratio: r.histogram("rerank_batch_padding_ratio", "Device tokens per real token of each batch (1 = no padding).", vec![1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0]),
            device_tokens: r.counter("rerank_device_tokens_total", "Tokens the device computed, padding included."),
            real_tokens: r.counter("rerank_real_tokens_total", "Real tokens the device computed."),
            queue_duration: r.seconds("rerank_queue_duration_seconds", "Per batch and call: the longest wait of the call's pairs in the queue before the batch ran."),
            tokenize_duration: r.seconds("rerank_tokenize_duration_seconds", "Tokenization wall time per request or stream chunk."),
            inference_duration: r.seconds("rerank_inference_duration_seconds", "Model time per batch."),
            engine_busy: r.seconds_counter("rerank_engine_busy_seconds_total", "Time the engine spent running batches; its rate is the engine's utilisation."),
            tokenizer_busy: r.seconds_counter("rerank_tokenizer_busy_seconds_total", "Worker time spent tokenizing documents; its rate over tokenizer_workers is their utilisation."),
            engine_tokens_per_second: r.float_gauge("rerank_engine_tokens_per_second", "The engine's measured speed in real tokens per second (smoothed), which admission and batch sizes follow."),
            refusals: r.counter_by("rerank_admission_refusals_total", "Work refused at once by admission (RESOURCE_EXHAUSTED / 429), by the limit that refused it.", &["reason"], &refusal_reasons),
            cancelled_pairs: r.counter("rerank_cancelled_pairs_total", "Pairs dropped before the model because their call ended."),
            stalled_streams: r.counter("rerank_stalled_streams_total", "Streams ended because the client neither read nor sent for stream_idle_timeout."),
            token_cache_hits: r.counter("rerank_token_cache_hits_total", "Documents whose token ids came from the document cache (not tokenized again)."),
            token_cache_misses: r.counter("rerank_token_cache_misses_total", "Documents looked up in the document cache and tokenized."),
            serving: r.gauge("rerank_serving", "1 while the server serves (model loaded, not draining), else 0."),
            calls_in_progress: r.gauge("rerank_calls_in_progress", "Rerank calls holding a slot among max_concurrent_calls (requests arrived, work not done)."),
            connections_open: r.gauge("rerank_connections_open", "Client connections open now."),
            connections_refused: r.counter("rerank_connections_refused_total", "Connections closed as soon as they were accepted because max_connections were open."),
            connections_closed: r.counter_by("rerank_connections_closed_total", "Connections ended, by why: the peer closed or failed, header_timeout, idle, age (max_connection_age) or drain.", &["reason"], &["peer", "header_timeout", "idle", "age", "drain"]),
            registry: r.0,
        }
    }

    /// The outcome of one call on `endpoint` and how long it took.
    pub fn record_call<T>(&self, endpoint: &str, result: &Result<T, RerankError>, seconds: f64) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(error) => error.outcome(),
        };
        self.requests.with_label_values(&[endpoint, outcome]).inc();
        self.request_duration
            .with_label_values(&[endpoint])
            .observe(seconds);
    }

    pub fn record_refusal(&self, reason: Refusal) {
        self.refusals.with_label_values(&[reason.label()]).inc();
    }

    /// Refusals by admission, all reasons together.
    pub fn refusals_total(&self) -> u64 {
        Refusal::ALL
            .iter()
            .map(|reason| self.refusals.with_label_values(&[reason.label()]).get())
            .sum()
    }

    /// Device tokens per real token since start (1.0 = no padding).
    pub fn padding_ratio(&self) -> f64 {
        match self.real_tokens.get() {
            0 => 1.0,
            real => self.device_tokens.get() as f64 / real as f64,
        }
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
