//! Server behaviour under pressure and at the edges of a call's life: admission limits, deadlines, API keys,
//! stream back-pressure, stalled clients, a failing engine and graceful shutdown. Tests that depend on when
//! the engine finishes put a gate in front of the model and release it themselves: no sleeps, no time windows.

mod common;

use std::time::Duration;

use common::{
    broken_device, client, health_becomes, health_updates, start, start_wrapped, stats,
    test_config, Gate, ONE_LABEL,
};
use rerank_server::proto::{
    rerank_stream_request, rerank_stream_response, DocumentChunk, RerankRequest, RerankStart,
    RerankStreamRequest,
};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// A port nobody listens on now (the OS picks it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn request(documents: usize) -> RerankRequest {
    RerankRequest {
        query: "harbour market".into(),
        documents: (0..documents)
            .map(|i| format!("document {i} about the old harbour market"))
            .collect(),
        ..Default::default()
    }
}

fn start_message(query: &str) -> RerankStreamRequest {
    RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: query.into(),
            ..Default::default()
        })),
    }
}

fn chunk_message(chunk: usize, documents: usize) -> RerankStreamRequest {
    RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
            documents: (0..documents)
                .map(|i| format!("chunk {chunk} document {i} about the harbour market"))
                .collect(),
        })),
    }
}

/// A server whose batches hold one pair, with no queue-time limit (tests hold batches as long as they like).
fn slow_config() -> rerank_server::config::Config {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 1;
    config.max_documents = 8000;
    config.max_queue_time = Duration::from_secs(3600);
    config
}

/// The server's stats once `reached` holds. A guard fails the test instead of hanging it when the state is
/// never reached (the behaviour under test is broken); it is not a timing window.
async fn stats_when(
    client: &mut rerank_server::proto::reranker_service_client::RerankerServiceClient<
        tonic::transport::Channel,
    >,
    reached: impl Fn(&rerank_server::proto::SchedulerStats) -> bool,
) -> rerank_server::proto::SchedulerStats {
    let poll = async {
        loop {
            let current = stats(client).await;
            if reached(&current) {
                return current;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), poll)
        .await
        .expect("the server never reached the expected state")
}

#[tokio::test]
async fn work_past_the_admission_limit_is_refused_at_once() {
    let mut config = slow_config();
    config.max_pending_pairs = 100;
    // Both calls come from one client: the global limit, not the client's share, is under test here.
    config.max_client_share = 1.0;
    let gate = Gate::closed();
    let server = start_wrapped(config, gate.wrapper()).await;
    let mut big = client(&server).await;
    let first = tokio::spawn(async move { big.rerank(request(100)).await });
    // The big request's first pair is in the engine, held at the gate: all 100 pairs are pending.
    gate.wait_entered(1).await;
    let mut small = client(&server).await;
    let refused = small.rerank(request(10)).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_pending_pairs"),
        "{}",
        refused.message()
    );
    gate.open();
    let first = first
        .await
        .expect("task")
        .expect("the admitted request completes");
    assert_eq!(first.into_inner().results.len(), 100);
    assert!(
        small.rerank(request(10)).await.is_ok(),
        "capacity is returned as pairs are scored"
    );
}

#[tokio::test]
async fn concurrent_calls_past_max_concurrent_calls_are_refused_at_once() {
    let mut config = slow_config();
    config.max_concurrent_calls = 1;
    let gate = Gate::closed();
    let server = start_wrapped(config, gate.wrapper()).await;
    let mut first = client(&server).await;
    let running = tokio::spawn(async move { first.rerank(request(2)).await });
    gate.wait_entered(1).await;
    let mut second = client(&server).await;
    let refused = second
        .rerank(request(2))
        .await
        .expect_err("one call at a time");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_concurrent_calls"),
        "{refused:?}"
    );
    gate.open();
    running
        .await
        .expect("task")
        .expect("the running call completes");
    assert!(
        second.rerank(request(2)).await.is_ok(),
        "the slot is free again"
    );
}

// The server answers DEADLINE_EXCEEDED a little before the deadline; a multi-threaded runtime keeps the
// in-process client from racing it with its own timer on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passed_deadline_is_deadline_exceeded_and_frees_its_pairs() {
    let gate = Gate::closed();
    let server = start_wrapped(slow_config(), gate.wrapper()).await;
    let mut c = client(&server).await;
    // Small enough to be admitted at any speed the warm-up can measure; the gate makes it miss its deadline.
    let mut call = Request::new(request(30));
    call.set_timeout(Duration::from_secs(1));
    let status = c.rerank(call).await.expect_err("deadline");
    // tonic's own client timer may win the race and report CANCELLED "Timeout expired".
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    gate.open();
    // Commands reach the scheduler in order: once this request is answered, the expired call's cancel has
    // been applied.
    c.rerank(request(3))
        .await
        .expect("the server keeps serving");
    let stats = stats(&mut c).await;
    assert!(
        stats.pairs <= 2 + 3,
        "only the pair held in the engine ran; the rest were dropped: {stats:?}"
    );
    assert_eq!(
        (
            stats.queued_pairs,
            stats.pending_pairs,
            stats.pending_tokens
        ),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.held_bytes, 0, "{stats:?}");
}

#[tokio::test]
async fn queue_time_sums_the_waits_of_each_batch() {
    let gate = Gate::closed();
    let server = start_wrapped(slow_config(), gate.wrapper()).await;
    let mut c = client(&server).await;
    let call = tokio::spawn(async move { c.rerank(request(3)).await });
    // Three batches of one pair: the second waits one hold, the third two; the sum is three holds, more than
    // any single wait.
    let held = Duration::from_millis(150);
    gate.wait_entered(1).await;
    tokio::time::sleep(held).await;
    gate.release(1);
    gate.wait_entered(2).await;
    tokio::time::sleep(held).await;
    gate.open();
    let usage = call
        .await
        .expect("task")
        .expect("rerank")
        .into_inner()
        .usage
        .expect("usage");
    assert!(
        Duration::from_nanos(usage.queue_ns) >= 3 * held,
        "the waits of the three batches add up to at least {:?}: {usage:?}",
        3 * held
    );
}

#[tokio::test]
async fn calls_that_cannot_finish_before_their_deadline_are_refused_at_once() {
    let gate = Gate::closed();
    let server = start_wrapped(slow_config(), gate.wrapper()).await;
    let mut c = client(&server).await;
    // 8,000 pairs at up to 64 tokens cannot be computed in a second at any speed this model shows; the gate
    // stays shut, so only an answer that does not wait for the engine can come back.
    let documents = || {
        (0..8000)
            .map(|i| format!("document {i} about the old harbour market and the river ").repeat(12))
            .collect::<Vec<_>>()
    };
    let mut unary = Request::new(RerankRequest {
        query: "harbour market".into(),
        documents: documents(),
        ..Default::default()
    });
    unary.set_timeout(Duration::from_secs(1));
    let refused = c.rerank(unary).await.expect_err("cannot finish");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("deadline"), "{refused:?}");
    let messages = vec![
        start_message("harbour"),
        RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                documents: documents(),
            })),
        },
    ];
    let mut stream = Request::new(tokio_stream::iter(messages));
    stream.set_timeout(Duration::from_secs(1));
    let mut inbound = c
        .rerank_stream(stream)
        .await
        .expect("stream opens")
        .into_inner();
    let status = inbound
        .message()
        .await
        .expect_err("the stream's chunk cannot finish");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");
    assert_eq!(gate.entered(), 0, "nothing reached the engine");
    assert!(stats(&mut c).await.refused >= 2);
    gate.open();
}

#[tokio::test]
async fn reranker_calls_need_the_api_key_when_one_is_set() {
    let mut config = test_config(ONE_LABEL);
    config.api_key = Some("s3cret".into());
    let server = start(config).await;
    let mut c = client(&server).await;
    let status = c.rerank(request(2)).await.expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    for wrong in ["Bearer s3cre", "Bearer s3cret!", "s3cret", "Bearer "] {
        let mut call = Request::new(request(2));
        call.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(wrong).expect("ascii"),
        );
        assert_eq!(
            c.rerank(call).await.expect_err(wrong).code(),
            Code::Unauthenticated,
            "{wrong}"
        );
    }
    let mut call = Request::new(request(2));
    call.metadata_mut()
        .insert("authorization", MetadataValue::from_static("Bearer s3cret"));
    assert!(c.rerank(call).await.is_ok());

    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.local_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "health needs no key");
}

#[tokio::test]
async fn a_stream_larger_than_its_window_completes() {
    let mut config = test_config(ONE_LABEL);
    config.max_stream_pending_pairs = 16;
    let server = start(config).await;
    let mut c = client(&server).await;
    let mut messages = vec![RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: "harbour".into(),
            top_n: 5,
            ..Default::default()
        })),
    }];
    for chunk in 0..40 {
        let documents = (0..50)
            .map(|i| format!("chunk {chunk} document {i} about the harbour"))
            .collect();
        messages.push(RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                documents,
            })),
        });
    }
    let mut inbound = c
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut scored = 0;
    let mut final_results = None;
    while let Some(message) = inbound.message().await.expect("message") {
        match message.item.expect("item") {
            rerank_stream_response::Item::Scores(chunk) => scored += chunk.results.len(),
            rerank_stream_response::Item::Final(response) => final_results = Some(response),
        }
    }
    assert_eq!(scored, 2000);
    let final_results = final_results.expect("final");
    assert_eq!(
        (
            final_results.results.len(),
            final_results.usage.expect("usage").pairs
        ),
        (5, 2000)
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish_then_closes_the_listener() {
    let gate = Gate::closed();
    let server = start_wrapped(slow_config(), gate.wrapper()).await;
    let addr = server.local_addr;
    let mut in_flight = client(&server).await;
    let call = tokio::spawn(async move { in_flight.rerank(request(20)).await });
    gate.wait_entered(1).await;
    let updates = health_updates(addr).await;
    let shutdown = tokio::spawn(server.shutdown());
    health_becomes(updates, ServingStatus::NotServing).await;
    gate.open();
    let finished = call
        .await
        .expect("task")
        .expect("the in-flight call completes");
    assert_eq!(finished.into_inner().results.len(), 20);
    shutdown.await.expect("task").expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn a_stream_past_its_deadline_ends_with_deadline_exceeded() {
    let gate = Gate::closed();
    let server = start_wrapped(slow_config(), gate.wrapper()).await;
    let mut c = client(&server).await;
    // The client never half-closes and the engine never finishes: only the deadline can end this call.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender.send(start_message("harbour")).await.expect("send");
    sender.send(chunk_message(0, 30)).await.expect("send");
    let mut call = Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    call.set_timeout(Duration::from_secs(1));
    let mut inbound = c
        .rerank_stream(call)
        .await
        .expect("stream opens")
        .into_inner();
    let status = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream cannot end normally without a half-close"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(sender);
    gate.open();
}

#[tokio::test]
async fn a_stream_waits_for_its_own_scores_when_tokens_run_out() {
    let mut config = test_config(ONE_LABEL);
    // One chunk of 1,000 pairs is more tokens than the limit: it is admitted alone, and the next chunk has to
    // wait for the stream's own scores instead of failing the stream.
    config.max_pending_tokens = 2000;
    let server = start(config).await;
    let mut c = client(&server).await;
    let messages: Vec<_> = std::iter::once(start_message("harbour"))
        .chain((0..5).map(|chunk| chunk_message(chunk, 1000)))
        .collect();
    let mut inbound = c
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut scored = 0;
    let mut final_pairs = None;
    while let Some(message) = inbound
        .message()
        .await
        .expect("no RESOURCE_EXHAUSTED mid-stream")
    {
        match message.item.expect("item") {
            rerank_stream_response::Item::Scores(chunk) => scored += chunk.results.len(),
            rerank_stream_response::Item::Final(response) => {
                final_pairs = response.usage.map(|u| u.pairs)
            }
        }
    }
    assert_eq!((scored, final_pairs), (5000, Some(5000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_is_ended_and_releases_its_work() {
    let mut config = test_config(ONE_LABEL);
    config.stream_idle_timeout = Duration::from_millis(300);
    config.max_stream_pending_pairs = 64;
    // The stalled stream holds the only call slot (Info is not counted) until the server ends it.
    config.max_concurrent_calls = 1;
    let server = start(config).await;
    // A client with small flow-control windows: the scores it does not read soon fill them, and then the
    // server's outbox.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.local_addr))
        .expect("endpoint")
        .initial_stream_window_size(Some(4096))
        .initial_connection_window_size(Some(4096))
        .connect()
        .await
        .expect("connect");
    let mut stalled =
        rerank_server::proto::reranker_service_client::RerankerServiceClient::new(channel);
    let messages: Vec<_> = std::iter::once(start_message("harbour"))
        .chain((0..60).map(|chunk| chunk_message(chunk, 1000)))
        .collect();
    let inbound = stalled
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut observer = client(&server).await;
    // The stream holds admitted pairs while it is stalled; once stream_idle_timeout passes without a read,
    // the server ends it and every pair and byte it held is released.
    let stats = stats_when(&mut observer, |s| s.stalled_streams == 1).await;
    assert_eq!(
        (stats.pending_pairs, stats.pending_tokens, stats.held_bytes),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!(
        stats.pairs < 60_000,
        "the stalled stream was not scored to its end: {stats:?}"
    );
    // Its call slot is free although its last messages still wait for the client.
    observer
        .rerank(request(2))
        .await
        .expect("the stalled stream's call slot was released");
    // The client finally reads: what was sent, then the server's status for the stalled call.
    let mut inbound = inbound;
    let status = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a stalled stream must not end as if it succeeded"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("stream_idle_timeout"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_device_that_keeps_failing_stops_the_engine_and_calls_get_unavailable() {
    let mut config = test_config(ONE_LABEL);
    config.max_consecutive_failures = 2;
    let server = start_wrapped(config, broken_device()).await;
    let mut c = client(&server).await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(
            c.rerank(request(2))
                .await
                .expect_err("the device fails")
                .code(),
        );
    }
    assert_eq!(codes[..2], [Code::Internal, Code::Internal], "{codes:?}");
    assert_eq!(codes[2], Code::Unavailable, "the engine is gone: {codes:?}");
    health_becomes(
        health_updates(server.local_addr).await,
        ServingStatus::NotServing,
    )
    .await;
    let status = c.rerank(request(2)).await.expect_err("no engine");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn the_listener_speaks_tls_when_a_certificate_is_configured() {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, certified.cert.pem()).expect("write cert");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
    let mut config = test_config(ONE_LABEL);
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    // Probes that cannot speak TLS use the plaintext health port.
    config.health_port = free_port();
    let server = start(config).await;
    let health_addr = server.health_addr.expect("a health listener");
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{health_addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("plaintext connect"),
    );
    for service in ["", "rerank.v1.RerankerService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health over plaintext")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let http = reqwest::Client::new();
    let plain_health = http
        .get(format!("http://{health_addr}/health"))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(plain_health.status(), 200);
    let not_here = http
        .post(format!("http://{health_addr}/v2/rerank"))
        .json(&serde_json::json!({"query": "q", "documents": ["a"]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(not_here.status(), 404, "the health port serves health only");

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            certified.cert.pem(),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        server.local_addr.port()
    ))
    .expect("endpoint")
    .tls_config(tls)
    .expect("tls")
    .connect()
    .await
    .expect("TLS connect");
    let mut secure =
        rerank_server::proto::reranker_service_client::RerankerServiceClient::new(channel);
    assert_eq!(
        secure
            .rerank(request(3))
            .await
            .expect("rerank over TLS")
            .into_inner()
            .results
            .len(),
        3
    );

    let plaintext =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.local_addr))
            .expect("endpoint")
            .connect()
            .await;
    if let Ok(channel) = plaintext {
        let mut insecure =
            rerank_server::proto::reranker_service_client::RerankerServiceClient::new(channel);
        assert!(
            insecure.rerank(request(3)).await.is_err(),
            "plaintext is refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_request_is_answered_within_a_few_batches_while_a_large_stream_runs() {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 8;
    config.max_queue_time = Duration::from_secs(3600);
    let window = config.max_stream_pending_pairs as u64;
    // "old" is in the small request's documents and in none of the stream's: the gate counts, per batch,
    // the small request's rows, so the test knows which batch answered it without racing the response.
    let tokenizer =
        rerank_server::tokenization::PairTokenizer::load(&common::fixture(ONE_LABEL), None, 512, 1)
            .expect("tokenizer");
    let old = tokenizer.reference_document_ids("old").expect("ids")[0];
    let gate = Gate::closed_marking(Some(old));
    let server = start_wrapped(config, gate.wrapper()).await;
    let mut streamer = client(&server).await;
    let messages: Vec<_> = std::iter::once(start_message("harbour"))
        .chain((0..30).map(|chunk| chunk_message(chunk, 1000)))
        .collect();
    let stream = tokio::spawn(async move {
        let mut inbound = streamer
            .rerank_stream(tokio_stream::iter(messages))
            .await
            .expect("stream")
            .into_inner();
        while inbound.message().await.expect("message").is_some() {}
    });
    // The engine holds the stream's first batch; the stream fills its window and stops being read.
    gate.wait_entered(1).await;
    let mut observer = client(&server).await;
    // Every admitted pair is either in the held batch (nothing is scored yet: all pairs cut so far) or queued.
    let settled =
        |s: &rerank_server::proto::SchedulerStats| s.queued_pairs + s.pairs == s.pending_pairs;
    let before = stats_when(&mut observer, |s| s.pending_pairs >= window && settled(s))
        .await
        .pending_pairs;
    let mut small = client(&server).await;
    let small_call = tokio::spawn(async move { small.rerank(request(20)).await });
    // The small request's pairs are queued before the first release.
    stats_when(&mut observer, |s| {
        s.pending_pairs >= before + 20 && settled(s)
    })
    .await;
    // Let batches through one at a time and count them until the small request is answered.
    let mut released = 0;
    while !small_call.is_finished() {
        gate.release(1);
        released += 1;
        tokio::select! {
            _ = gate.wait_entered(released + 1) => {}
            _ = async { while !small_call.is_finished() { tokio::task::yield_now().await } } => {}
        }
    }
    small_call.await.expect("task").expect("small request");
    // The batch (counted from the stream's first, already running) that computed the small request's last pair.
    let mut small_rows = 0;
    let served_by = gate
        .marked_rows()
        .iter()
        .position(|rows| {
            small_rows += rows;
            small_rows >= 20
        })
        .map_or(usize::MAX, |i| i + 1);
    // Its 20 pairs need 3 to 5 batches of 8 (they fall into two length buckets) and the stream takes every other
    // turn, after the stream batch that was already running: 7 to 10 batches, against hundreds in a queue
    // served in arrival order.
    assert!(
        served_by <= 10,
        "the small request waited for {served_by} batches ({released} released); a queue in arrival order needs {}",
        window / 8
    );
    gate.open();
    stream.await.expect("stream task");
}
