//! The drain a load balancer expects: health NOT_SERVING at once while calls are still served, then GOAWAY
//! (HTTP/1.1: close after the current response), calls in flight finishing, and UNAVAILABLE for what is still
//! open at the end of drain_timeout; connections closed for age; the binary's signals. Gates, not sleeps, decide
//! when the engine finishes work.

mod common;

use std::time::Duration;

use common::{
    client, health_becomes, health_updates, http1_closed, http1_exchange, http1_post, metric,
    start, start_wrapped, test_config, Gate, ONE_LABEL,
};
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::proto::{
    rerank_stream_request, DocumentChunk, RerankRequest, RerankStart, RerankStreamRequest,
};
use serde_json::json;
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn request(documents: usize) -> RerankRequest {
    RerankRequest {
        query: "harbour market".into(),
        documents: (0..documents)
            .map(|i| format!("document {i} about the old harbour market"))
            .collect(),
        ..Default::default()
    }
}

fn one_pair_batches() -> rerank_server::config::Config {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 1;
    config.max_queue_time = Duration::from_secs(3600);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_serves_new_calls_while_health_says_not_serving() {
    let server = start(test_config(ONE_LABEL)).await;
    let addr = server.local_addr;
    let updates = health_updates(addr).await;
    let (end_lame_duck, lame_duck_over) = oneshot::channel::<()>();
    let shutdown = tokio::spawn(server.shutdown_after(async {
        let _ = lame_duck_over.await;
    }));
    health_becomes(updates, ServingStatus::NotServing).await;
    let health = reqwest::get(format!("http://{addr}/health"))
        .await
        .expect("health");
    assert_eq!(health.status(), 503);
    // Work a balancer routes here before it notices still succeeds, on new connections too.
    let mut fresh = RerankerServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("still accepting connections");
    let reply = fresh
        .rerank(request(3))
        .await
        .expect("served while draining");
    assert_eq!(reply.into_inner().results.len(), 3);
    let reply = reqwest::Client::new()
        .post(format!("http://{addr}/v2/rerank"))
        .json(&json!({"query": "q", "documents": ["a", "b"]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(reply.status(), 200);
    drop(fresh);
    end_lame_duck.send(()).expect("shutdown waits");
    shutdown.await.expect("task").expect("drained");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed once the lame-duck time is over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_still_open_when_drain_timeout_ends_get_unavailable() {
    let mut config = one_pair_batches();
    config.drain_timeout = Duration::from_millis(300);
    let gate = Gate::closed();
    let server = start_wrapped(config, gate.wrapper()).await;
    let mut streaming = client(&server).await;
    let (outbound, inbound) = tokio::sync::mpsc::channel(4);
    let start = RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: "harbour".into(),
            ..Default::default()
        })),
    };
    let chunk = RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
            documents: (0..4).map(|i| format!("stream document {i}")).collect(),
        })),
    };
    outbound.send(start).await.expect("queued");
    outbound.send(chunk).await.expect("queued");
    let mut stream = streaming
        .rerank_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .expect("stream opened")
        .into_inner();
    gate.wait_entered(1).await;
    let mut unary = client(&server).await;
    let call = tokio::spawn(async move { unary.rerank(request(2)).await });
    let shutdown = tokio::spawn(server.shutdown());
    // The gate holds the engine past drain_timeout: nothing can finish, so both calls end with UNAVAILABLE
    // and a message saying why, not a broken connection.
    let ended = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("the stream ends by drain_timeout, not whenever the engine frees")
        .expect_err("the stream ends with an error");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    let refused = call
        .await
        .expect("task")
        .expect_err("the unary call ends too");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{refused:?}");
    drop(outbound);
    gate.open();
    shutdown.await.expect("task").expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_connection_closes_after_its_current_response_when_connections_close() {
    let gate = Gate::closed();
    let server = start_wrapped(one_pair_batches(), gate.wrapper()).await;
    let addr = server.local_addr;
    let mut connection = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = json!({"query": "harbour", "texts": ["a", "b"]});
    gate.release(2);
    let first = http1_exchange(&mut connection, &http1_post("/rerank", &body)).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The second request on the same keep-alive connection is in flight when the drain closes connections.
    let request = http1_post("/rerank", &body);
    let exchange = tokio::spawn(async move {
        let response = http1_exchange(&mut connection, &request).await;
        (response, http1_closed(&mut connection).await)
    });
    gate.wait_entered(3).await;
    let shutdown = tokio::spawn(server.shutdown());
    // Once the listener refuses connections the drain has told every connection to close.
    tokio::time::timeout(Duration::from_secs(60), async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener closes");
    gate.open();
    let (response, closed) = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("the response comes and the connection closes")
        .expect("task");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "the response says the connection ends: {response}"
    );
    assert!(
        closed,
        "the server closed the connection after the response"
    );
    shutdown.await.expect("task").expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_for_age_while_their_clients_keep_succeeding() {
    let mut config = test_config(ONE_LABEL);
    config.max_connection_age = Duration::from_millis(200);
    let server = start(config).await;
    let addr = server.local_addr;
    let mut client = client(&server).await;
    let closed_for_age = r#"rerank_connections_closed_total{reason="age"}"#;
    // Calls go on back to back until a connection has been closed for its age; each must succeed (the
    // client moves to a new connection after GOAWAY). The guard only stops a broken build from hanging.
    let calls = async {
        let mut calls = 0;
        while metric(addr, closed_for_age).await.unwrap_or(0.0) < 1.0 {
            client
                .rerank(request(2))
                .await
                .expect("every call succeeds");
            calls += 1;
        }
        calls
    };
    let calls = tokio::time::timeout(Duration::from_secs(60), calls)
        .await
        .expect("a connection is closed for its age");
    assert!(calls > 0);
    client
        .rerank(request(2))
        .await
        .expect("the client reconnected");
}

/// The server binary with a fixture model on a free port, and its address.
fn spawn_binary(drain_delay: &str) -> (std::process::Child, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rerank-server"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--model-id")
        .arg(common::fixture(ONE_LABEL))
        .env("RERANK_DRAIN_DELAY", drain_delay)
        .env("RERANK_TOKENIZER_WORKERS", "1")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the server binary starts");
    (child, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Waits (polling, bounded) until GET /health answers `status`.
async fn health_is(addr: std::net::SocketAddr, status: u16) {
    let poll = async {
        loop {
            if let Ok(response) = reqwest::get(format!("http://{addr}/health")).await {
                if response.status() == status {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .unwrap_or_else(|_| panic!("/health never answered {status}"));
}

fn signal(child: &std::process::Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill only sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Waits for the child to exit; the guard only stops a broken build from hanging the suite.
async fn exit_status(mut child: std::process::Child) -> std::process::ExitStatus {
    let waited = tokio::task::spawn_blocking(move || child.wait());
    tokio::time::timeout(Duration::from_secs(60), waited)
        .await
        .expect("the server exits")
        .expect("task")
        .expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0_and_a_second_signal_ends_the_drain_at_once() {
    let (child, addr) = spawn_binary("0s");
    health_is(addr, 200).await;
    signal(&child, libc::SIGTERM);
    assert!(exit_status(child).await.success(), "a drain exits 0");

    // An hour of lame-duck time: only the second signal can end it within the test.
    let (child, addr) = spawn_binary("1h");
    health_is(addr, 200).await;
    signal(&child, libc::SIGTERM);
    health_is(addr, 503).await;
    let served = reqwest::Client::new()
        .post(format!("http://{addr}/v2/rerank"))
        .json(&json!({"query": "q", "documents": ["a"]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(served.status(), 200, "the lame duck still serves");
    signal(&child, libc::SIGINT);
    let status = exit_status(child).await;
    assert!(!status.success(), "an interrupted drain says so: {status}");
}
