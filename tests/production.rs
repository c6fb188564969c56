//! Server behaviour under pressure and at the edges of a call's life: admission limits, deadlines, API keys,
//! stream back-pressure and graceful shutdown.

mod common;

use std::time::Duration;

use common::{client, start, test_config, ONE_LABEL};
use rerank_server::proto::{
    rerank_stream_request, rerank_stream_response, DocumentChunk, RerankRequest, RerankStart,
    RerankStreamRequest,
};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

fn request(documents: usize) -> RerankRequest {
    RerankRequest {
        query: "harbour market".into(),
        documents: (0..documents)
            .map(|i| format!("document {i} about the old harbour market"))
            .collect(),
        ..Default::default()
    }
}

/// A server whose batches hold one pair, so thousands of pairs stay pending for a while.
fn slow_config() -> rerank_server::config::Config {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 1;
    config.max_documents = 8000;
    config
}

#[tokio::test]
async fn work_past_the_admission_limit_is_refused_at_once() {
    let mut config = slow_config();
    config.max_pending_pairs = 8000;
    let server = start(config).await;
    let mut big = client(&server).await;
    let first = tokio::spawn(async move { big.rerank(request(8000)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut small = client(&server).await;
    let started = std::time::Instant::now();
    let refused = small.rerank(request(10)).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_pending_pairs"),
        "{}",
        refused.message()
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once, not after waiting"
    );
    let first = first
        .await
        .expect("task")
        .expect("the admitted request completes");
    assert_eq!(first.into_inner().results.len(), 8000);
    assert!(
        small.rerank(request(10)).await.is_ok(),
        "capacity is returned as pairs are scored"
    );
}

// The server answers DEADLINE_EXCEEDED a little before the deadline; a multi-threaded runtime keeps the
// in-process client from racing it with its own timer on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passed_deadline_is_deadline_exceeded_and_frees_its_pairs() {
    let server = start(slow_config()).await;
    let mut c = client(&server).await;
    let mut call = Request::new(request(3000));
    call.set_timeout(Duration::from_millis(40));
    let status = c.rerank(call).await.expect_err("deadline");
    // The server answers DEADLINE_EXCEEDED just before the deadline; tonic's own client timer may win the
    // race and report CANCELLED "Timeout expired" instead. The stream test below sees the server's status.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = c
            .info(rerank_server::proto::InfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .stats
            .expect("stats");
        if stats.queued_pairs == 0 {
            // Depending on where the deadline fell (tokenizing, queued, computing), none or some pairs ran;
            // the rest were dropped from the queue instead of computed.
            assert!(
                stats.pairs < 3000,
                "pairs past the deadline were dropped, not computed: {stats:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queue never drained: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        c.rerank(request(3)).await.is_ok(),
        "the server keeps serving"
    );
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
async fn shutdown_lets_in_flight_calls_finish_and_refuses_new_ones() {
    let server = start(slow_config()).await;
    let addr = server.local_addr;
    let mut in_flight = client(&server).await;
    let call = tokio::spawn(async move { in_flight.rerank(request(2000)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = client(&server).await;
    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = late
        .rerank(request(2))
        .await
        .expect_err("new calls are refused while draining");
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{refused:?}"
    );
    let finished = call
        .await
        .expect("task")
        .expect("the in-flight call completes");
    assert_eq!(finished.into_inner().results.len(), 2000);
    shutdown.await.expect("task").expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn a_stream_past_its_deadline_ends_with_deadline_exceeded() {
    let server = start(slow_config()).await;
    let mut c = client(&server).await;
    let start_message = RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: "harbour".into(),
            ..Default::default()
        })),
    };
    let documents = request(3000).documents;
    let chunk = RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
            documents,
        })),
    };
    // The client never half-closes: only the deadline can end this call.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender.send(start_message).await.expect("send");
    sender.send(chunk).await.expect("send");
    let mut call = Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    call.set_timeout(Duration::from_millis(300));
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
    let server = start(config).await;

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
    let mut secure = rerank_server::proto::reranker_client::RerankerClient::new(channel);
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
        let mut insecure = rerank_server::proto::reranker_client::RerankerClient::new(channel);
        assert!(
            insecure.rerank(request(3)).await.is_err(),
            "plaintext is refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_request_is_answered_promptly_while_a_large_stream_runs() {
    small_request_next_to_a_stream(30).await;
}

/// The issue-sized version: 100,000 documents (`cargo test --test production -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: a 100,000-document stream"]
async fn a_small_request_is_answered_promptly_while_a_100k_document_stream_runs() {
    small_request_next_to_a_stream(100).await;
}

/// A 20-document unary request sent while a stream of `chunks` x 1,000 documents is being scored.
async fn small_request_next_to_a_stream(chunks: usize) {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 8;
    let server = start(config).await;
    let mut streamer = client(&server).await;
    let mut messages = vec![RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: "harbour".into(),
            ..Default::default()
        })),
    }];
    for chunk in 0..chunks {
        let documents = (0..1000)
            .map(|i| format!("chunk {chunk} document {i} about the harbour market"))
            .collect();
        messages.push(RerankStreamRequest {
            item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
                documents,
            })),
        });
    }
    let mut inbound = streamer
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    inbound
        .message()
        .await
        .expect("message")
        .expect("the stream is being scored");
    let stream = tokio::spawn(async move {
        let started = std::time::Instant::now();
        while inbound.message().await.expect("message").is_some() {}
        started.elapsed()
    });
    let mut small = client(&server).await;
    let started = std::time::Instant::now();
    small.rerank(request(20)).await.expect("small request");
    let small_latency = started.elapsed();
    let stream_rest = stream.await.expect("task");
    let stats = small
        .info(rerank_server::proto::InfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .stats
        .expect("stats");
    let batch_time =
        std::time::Duration::from_secs_f64(stats.engine_busy_seconds / stats.batches.max(1) as f64);
    println!(
        "stream of {chunks}k documents: small request answered in {small_latency:?} ({:.1} mean batch times \
         of {batch_time:?}); the stream needed {stream_rest:?} more",
        small_latency.as_secs_f64() / batch_time.as_secs_f64().max(1e-9)
    );
    assert!(
        small_latency * 5 < stream_rest,
        "the small request ({small_latency:?}) did not wait for the stream ({stream_rest:?})"
    );
}
