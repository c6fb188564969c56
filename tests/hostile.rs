//! Clients the server does not control: slow bodies and headers, idle and surplus connections, oversized
//! headers, one client taking every slot it can, and malformed bodies. Each behaviour is observed end to end
//! on raw connections; nothing waits on a timer to "let things happen" (the guards only stop a broken build
//! from hanging the suite).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    client, http1_closed, http1_exchange, http1_response, metric, start, test_config, ONE_LABEL,
};
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::proto::{
    rerank_stream_request, RerankRequest, RerankStart, RerankStreamRequest,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::Code;

const GUARD: Duration = Duration::from_secs(60);

async fn guarded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen"))
}

fn request(documents: usize) -> RerankRequest {
    RerankRequest {
        query: "harbour market".into(),
        documents: (0..documents)
            .map(|i| format!("document {i} about the harbour"))
            .collect(),
        ..Default::default()
    }
}

async fn post(addr: SocketAddr) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/v2/rerank"))
        .json(&json!({"query": "harbour", "documents": ["a", "b"]}))
        .send()
        .await
        .expect("sent")
}

/// A message sent as if through a proxy naming the client `ip` in x-forwarded-for.
fn from<T>(ip: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-forwarded-for", MetadataValue::try_from(ip).expect("ip"));
    request
}

/// Polls /metrics until `sample` reaches `value` (bounded).
async fn metric_reaches(addr: SocketAddr, sample: &str, value: f64) {
    guarded(sample, async {
        while metric(addr, sample).await.unwrap_or(0.0) < value {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_stall_hold_no_call_slot_and_end_with_408() {
    let mut config = test_config(ONE_LABEL);
    config.max_concurrent_calls = 4;
    config.request_read_timeout = Duration::from_millis(500);
    let server = start(config).await;
    let addr = server.local_addr;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /v2/rerank HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"query\": ")
            .await
            .expect("written");
        stalled.push(stream);
    }
    // Twice as many stalled bodies as call slots: a real call is still served at once.
    assert_eq!(post(addr).await.status(), 200);
    for mut stream in stalled {
        let response = guarded("the 408", http1_response(&mut stream)).await;
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(response.contains("request_read_timeout"), "{response}");
    }
    assert_eq!(metric(addr, "rerank_calls_in_progress").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_at_its_share_leaves_room_for_another_and_unstarted_streams_hold_nothing() {
    let mut config = test_config(ONE_LABEL);
    config.max_concurrent_calls = 8;
    config.max_client_share = 0.5;
    config.request_read_timeout = Duration::from_millis(500);
    // Clients are named by a trusted proxy's x-forwarded-for, as behind a load balancer.
    config.trusted_proxies = vec!["127.0.0.1".parse().expect("address")];
    let server = start(config).await;
    let addr = server.local_addr;
    let start = || RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: "harbour".into(),
            ..Default::default()
        })),
    };
    // Client A, on one connection: streams that start and then send nothing hold a slot each.
    let mut a = client(&server).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let (outbound, inbound) = tokio::sync::mpsc::channel(1);
        outbound.send(start()).await.expect("queued");
        let stream = a
            .rerank_stream(from(
                "192.0.2.1",
                tokio_stream::wrappers::ReceiverStream::new(inbound),
            ))
            .await
            .expect("opened");
        held.push((outbound, stream));
    }
    metric_reaches(addr, "rerank_calls_in_progress", 4.0).await;
    // A's fifth call is past its share; the refusal says so.
    let refused = a
        .rerank(from("192.0.2.1", request(2)))
        .await
        .expect_err("past A's share");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_client_share"),
        "{refused:?}"
    );
    // Client C opens streams and never starts them: they hold no slot, and end once request_read_timeout
    // passes.
    let mut c = client(&server).await;
    let mut unstarted = Vec::new();
    for _ in 0..20 {
        let (outbound, inbound) = tokio::sync::mpsc::channel::<RerankStreamRequest>(1);
        let stream = c
            .rerank_stream(from(
                "192.0.2.3",
                tokio_stream::wrappers::ReceiverStream::new(inbound),
            ))
            .await
            .expect("opened")
            .into_inner();
        unstarted.push((outbound, stream));
    }
    // Client B is served at once, while A holds all it may and C's streams wait for their start.
    let mut b = RerankerServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let served = b
        .rerank(from("192.0.2.2", request(3)))
        .await
        .expect("B is served");
    assert_eq!(served.into_inner().results.len(), 3);
    assert_eq!(metric(addr, "rerank_calls_in_progress").await, Some(4.0));
    for (_outbound, mut stream) in unstarted {
        let ended = guarded("the unstarted stream's end", stream.message())
            .await
            .expect_err("ended");
        assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
        assert!(ended.message().contains("start"), "{ended:?}");
    }
    drop(held);
    metric_reaches(
        addr,
        r#"rerank_admission_refusals_total{reason="client_share"}"#,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_silent_connections_are_cut_off() {
    let mut config = test_config(ONE_LABEL);
    config.header_read_timeout = Duration::from_millis(300);
    let server = start(config).await;
    let addr = server.local_addr;
    let mut slowloris = TcpStream::connect(addr).await.expect("connect");
    slowloris
        .write_all(b"POST /v2/rerank HTTP/1.1\r\nhost: t\r\nx-a: 1\r\n")
        .await
        .expect("written");
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(
        post(addr).await.status(),
        200,
        "others are served meanwhile"
    );
    assert!(guarded("the slow head's close", http1_closed(&mut slowloris)).await);
    assert!(guarded("the silent connection's close", http1_closed(&mut silent)).await);
    metric_reaches(
        addr,
        r#"rerank_connections_closed_total{reason="header_timeout"}"#,
        2.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let mut config = test_config(ONE_LABEL);
    config.idle_timeout = Duration::from_millis(300);
    let server = start(config).await;
    let addr = server.local_addr;
    let mut connection = TcpStream::connect(addr).await.expect("connect");
    let health = http1_exchange(&mut connection, b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        !health.to_ascii_lowercase().contains("connection: close"),
        "{health}"
    );
    assert!(guarded("the idle connection's close", http1_closed(&mut connection)).await);
    metric_reaches(
        addr,
        r#"rerank_connections_closed_total{reason="idle"}"#,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_or_header_bytes_get_431() {
    let server = start(test_config(ONE_LABEL)).await;
    let addr = server.local_addr;
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let large = format!("x-large: {}\r\n", "v".repeat(20_000));
    for extra in [many, large] {
        let mut connection = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET /health HTTP/1.1\r\nhost: t\r\n{extra}\r\n");
        let response = http1_exchange(&mut connection, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    }
    assert_eq!(post(addr).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_max_connections_is_closed_and_the_others_are_served() {
    let mut config = test_config(ONE_LABEL);
    config.max_connections = 8;
    let server = start(config).await;
    let addr = server.local_addr;
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut surplus = TcpStream::connect(addr)
        .await
        .expect("the kernel accepts it");
    assert!(
        guarded("the surplus connection's close", http1_closed(&mut surplus)).await,
        "closed as soon as accepted"
    );
    for connection in &mut open {
        let health = http1_exchange(connection, b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }
    drop(open);
    metric_reaches(addr, "rerank_connections_refused_total", 1.0).await;
}

/// A body sent raw on its own connection, and the status and JSON message it got back.
async fn send_raw(addr: SocketAddr, request: &[u8]) -> (u16, serde_json::Value) {
    let mut connection = TcpStream::connect(addr).await.expect("connect");
    let response = http1_exchange(&mut connection, request).await;
    let status = response[9..12].parse().expect("status");
    let body = &response[response.find("\r\n\r\n").expect("head") + 4..];
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"));
    (status, json)
}

fn raw_post(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v2/rerank HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_a_clear_4xx_json_error() {
    let mut config = test_config(ONE_LABEL);
    config.max_message_bytes = 4096;
    let server = start(config).await;
    let addr = server.local_addr;
    let deep = format!(
        "{{\"extra\": {}1{}, \"query\": \"q\", \"documents\": [\"a\"]}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            br#"{"query": "q", "documents": ["#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "wrong types",
            br#"{"query": 5, "documents": "a"}"#.to_vec(),
            400,
            "invalid type",
        ),
        (
            "invalid UTF-8",
            b"{\"query\": \"\xff\xfe\", \"documents\": [\"a\"]}".to_vec(),
            400,
            "invalid JSON",
        ),
        ("deep nesting", deep.into_bytes(), 400, "recursion limit"),
        (
            "a huge number",
            br#"{"query": "q", "documents": ["a"], "top_n": 1e400}"#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "an integer past u64",
            br#"{"query": "q", "documents": ["a"], "top_n": 99999999999999999999999}"#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "a negative count",
            br#"{"query": "q", "documents": ["a"], "top_n": -1}"#.to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "duplicate keys",
            br#"{"query": "q", "query": "r", "documents": ["a"]}"#.to_vec(),
            400,
            "duplicate field",
        ),
        ("an empty body", Vec::new(), 400, "invalid JSON"),
        (
            "a body over max_message_bytes",
            format!("{{\"query\": \"{}\"}}", "q".repeat(5000)).into_bytes(),
            413,
            "max_message_bytes",
        ),
    ];
    for (what, body, status, says) in cases {
        let (got, reply) = send_raw(addr, &raw_post(&body)).await;
        assert_eq!(got, status, "{what}: {reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");
    }
    // A chunked body past max_message_bytes is cut off at the limit, whatever it announced.
    let mut chunked = b"POST /v2/rerank HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", "x".repeat(1024)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (got, reply) = send_raw(addr, &chunked).await;
    assert_eq!(got, 413, "{reply}");
    // A field the API does not know is refused by name, not silently ignored; the fields of documents given as
    // objects (Cohere v1, Jina) are the caller's own and stay allowed.
    let (got, reply) = send_raw(
        addr,
        &raw_post(
            br#"{"query": "q", "documents": ["a"], "return_citations": true, "x": {"y": [1]}}"#,
        ),
    )
    .await;
    assert_eq!(got, 400, "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unknown fields \"return_citations\", \"x\""),
        "{message}"
    );
    let (got, reply) = send_raw(
        addr,
        &raw_post(br#"{"query": "q", "documents": [{"text": "a", "id": 7, "meta": {"k": 1}}]}"#),
    )
    .await;
    assert_eq!(got, 200, "{reply}");
    assert_eq!(post(addr).await.status(), 200, "the server is unharmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_a_body_still_arriving_count_against_max_inflight_bytes_until_it_ends() {
    let mut config = test_config(ONE_LABEL);
    config.max_inflight_bytes = 4096;
    config.max_client_share = 1.0;
    config.request_read_timeout = Duration::from_millis(800);
    let server = start(config).await;
    let addr = server.local_addr;
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    let mut partial = b"POST /v2/rerank HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"query\": \"".to_vec();
    partial.extend(std::iter::repeat_n(b'q', 3000));
    stalled.write_all(&partial).await.expect("written");
    metric_reaches(addr, "rerank_held_bytes", 3000.0).await;
    let documents: Vec<String> = (0..4).map(|i| format!("{i} {}", "d".repeat(500))).collect();
    let body = json!({"query": "harbour", "documents": documents});
    let refused = reqwest::Client::new()
        .post(format!("http://{addr}/v2/rerank"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 429);
    let message = refused.text().await.expect("text");
    assert!(message.contains("max_inflight_bytes"), "{message}");
    let ended = guarded("the 408", http1_response(&mut stalled)).await;
    assert!(ended.starts_with("HTTP/1.1 408"), "{ended}");
    let served = reqwest::Client::new()
        .post(format!("http://{addr}/v2/rerank"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(
        served.status(),
        200,
        "the stalled body's bytes were released"
    );
}
