//! End-to-end tests of the gRPC API against the real server on an ephemeral port.

mod common;

use common::{client, expected, start, test_config, ONE_LABEL, TWO_LABEL, XLMR};
use rerank_server::proto::{
    rerank_stream_request, rerank_stream_response, DocumentChunk, InfoRequest, RerankRequest,
    RerankStart, RerankStreamRequest, Truncation,
};
use tonic::Code;

fn request(query: &str, documents: &[&str]) -> RerankRequest {
    RerankRequest {
        query: query.into(),
        documents: documents.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

fn start_message(start: RerankStart) -> RerankStreamRequest {
    RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(start)),
    }
}

fn chunk_message(documents: Vec<String>) -> RerankStreamRequest {
    RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
            documents,
        })),
    }
}

#[tokio::test]
async fn unary_rerank_ranks_with_reference_scores_and_honours_options() {
    for model in [ONE_LABEL, XLMR] {
        unary_rerank_for(model).await;
    }
}

async fn unary_rerank_for(model: &str) {
    let server = start(test_config(model)).await;
    let mut client = client(&server).await;
    let case = &expected(model).cases[0];
    let docs: Vec<&str> = case.documents.iter().map(String::as_str).collect();

    let full = client
        .rerank(request(&case.query, &docs))
        .await
        .expect("rerank")
        .into_inner();
    assert_eq!(full.results.len(), docs.len());
    assert!(
        full.results.windows(2).all(|w| w[0].score >= w[1].score),
        "sorted highest first"
    );
    let mut indices: Vec<u32> = full.results.iter().map(|r| r.index).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..docs.len() as u32).collect::<Vec<_>>());
    for r in &full.results {
        assert!((r.score - case.scores[r.index as usize]).abs() < 1e-4);
        assert!(r.document.is_none(), "documents only on request");
    }
    let usage = full.usage.expect("usage");
    assert_eq!(usage.pairs, docs.len() as u32);
    assert!(usage.tokens > 0 && usage.total_ns >= usage.tokenize_ns && usage.inference_ns > 0);
    assert!(full.model.ends_with(model));

    let top = client
        .rerank(RerankRequest {
            top_n: 2,
            return_documents: true,
            ..request(&case.query, &docs)
        })
        .await
        .expect("top_n")
        .into_inner();
    assert_eq!(top.results.len(), 2);
    for (got, want) in top.results.iter().zip(&full.results) {
        assert_eq!((got.index, got.score), (want.index, want.score));
        assert_eq!(got.document.as_deref(), Some(docs[got.index as usize]));
    }

    let raw = client
        .rerank(RerankRequest {
            raw_scores: true,
            top_n: 100,
            ..request(&case.query, &docs)
        })
        .await
        .expect("raw")
        .into_inner();
    assert_eq!(
        raw.results.len(),
        docs.len(),
        "top_n over the count returns all"
    );
    for r in &raw.results {
        assert!(
            (r.score - case.logits[r.index as usize][0]).abs() < 1e-4,
            "raw score is the logit"
        );
    }
}

#[tokio::test]
async fn two_label_models_score_the_probability_of_label_one() {
    let server = start(test_config(TWO_LABEL)).await;
    let mut client = client(&server).await;
    let case = &expected(TWO_LABEL).cases[2];
    let docs: Vec<&str> = case.documents.iter().map(String::as_str).collect();
    let response = client
        .rerank(request(&case.query, &docs))
        .await
        .expect("rerank")
        .into_inner();
    for r in &response.results {
        assert!((r.score - case.scores[r.index as usize]).abs() < 1e-4);
        assert!((0.0..=1.0).contains(&r.score));
    }
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!((info.num_labels, info.activation.as_str()), (2, "softmax"));
}

#[tokio::test]
async fn a_stream_of_5000_documents_matches_the_unary_ranking() {
    for model in [ONE_LABEL, XLMR] {
        stream_matches_unary_for(model).await;
    }
}

async fn stream_matches_unary_for(model: &str) {
    let mut config = test_config(model);
    config.max_documents = 5000;
    let server = start(config).await;
    let mut client = client(&server).await;
    let query = "which market sells fresh fish?";
    let documents: Vec<String> = (0..5000)
        .map(|i| {
            format!(
                "document {i}: the {} market sells {} by the river",
                ["old", "new", "city"][i % 3],
                ["fish", "bread", "fruit", "cloth", "tea"][i % 5]
            )
            .repeat(1 + i % 4)
        })
        .collect();

    let unary = client
        .rerank(RerankRequest {
            query: query.into(),
            documents: documents.clone(),
            ..Default::default()
        })
        .await
        .expect("unary")
        .into_inner();

    let mut messages = vec![start_message(RerankStart {
        query: query.into(),
        ..Default::default()
    })];
    messages.extend(documents.chunks(250).map(|c| chunk_message(c.to_vec())));
    let mut inbound = client
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut partial = vec![None; documents.len()];
    let (mut score_messages, mut final_response) = (0, None);
    while let Some(message) = inbound.message().await.expect("stream message") {
        match message.item.expect("item") {
            rerank_stream_response::Item::Scores(chunk) => {
                assert!(final_response.is_none(), "scores after final");
                score_messages += 1;
                for r in chunk.results {
                    assert!(
                        partial[r.index as usize].replace(r.score).is_none(),
                        "index {} scored twice",
                        r.index
                    );
                }
            }
            rerank_stream_response::Item::Final(response) => {
                assert!(
                    final_response.replace(response).is_none(),
                    "exactly one final"
                );
            }
        }
    }
    assert!(score_messages > 1, "partial scores flow as batches finish");
    assert!(
        partial.iter().all(Option::is_some),
        "every document scored once in partial results"
    );
    let final_response = final_response.expect("final ranking");
    assert_eq!(final_response.results.len(), unary.results.len());
    for (s, u) in final_response.results.iter().zip(&unary.results) {
        assert!(
            (s.score - u.score).abs() < 1e-5,
            "same ranking, position by position"
        );
    }
    let unary_by_index: std::collections::HashMap<u32, f32> =
        unary.results.iter().map(|r| (r.index, r.score)).collect();
    for r in &final_response.results {
        assert!((r.score - unary_by_index[&r.index]).abs() < 1e-5);
        assert_eq!(
            Some(r.score),
            partial[r.index as usize],
            "final agrees with the partial score"
        );
    }
    assert_eq!(final_response.usage.expect("usage").pairs, 5000);
}

#[tokio::test]
async fn stream_options_apply_to_the_final_ranking() {
    let server = start(test_config(ONE_LABEL)).await;
    let mut client = client(&server).await;
    let docs: Vec<String> = (0..30).map(|i| format!("doc {i} about paris")).collect();
    let messages = vec![
        start_message(RerankStart {
            query: "paris".into(),
            top_n: 3,
            return_documents: true,
            ..Default::default()
        }),
        chunk_message(docs[..10].to_vec()),
        chunk_message(Vec::new()),
        chunk_message(docs[10..].to_vec()),
    ];
    let mut inbound = client
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut last = None;
    while let Some(message) = inbound.message().await.expect("message") {
        last = message.item;
    }
    let Some(rerank_stream_response::Item::Final(response)) = last else {
        panic!("final must come last")
    };
    assert_eq!(response.results.len(), 3);
    for r in &response.results {
        assert_eq!(
            r.document.as_deref(),
            Some(docs[r.index as usize].as_str()),
            "global indices across chunks"
        );
    }
}

async fn expect_invalid(result: Result<tonic::Response<impl Sized>, tonic::Status>, needle: &str) {
    let status = result
        .err()
        .unwrap_or_else(|| panic!("expected INVALID_ARGUMENT naming {needle}"));
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should name {needle}",
        status.message()
    );
}

#[tokio::test]
async fn bad_unary_input_is_invalid_argument_naming_the_limit() {
    let mut config = test_config(ONE_LABEL);
    config.max_documents = 3;
    config.max_document_bytes = 500;
    config.max_query_bytes = 40;
    let server = start(config).await;
    let mut c = client(&server).await;
    expect_invalid(c.rerank(request("", &["a"])).await, "query").await;
    expect_invalid(c.rerank(request(" \t\n", &["a"])).await, "query").await;
    expect_invalid(c.rerank(request("q", &[])).await, "documents").await;
    expect_invalid(
        c.rerank(request("q", &["a", "b", "c", "d"])).await,
        "max_documents",
    )
    .await;
    expect_invalid(
        c.rerank(request("q", &["ok", &"x".repeat(501)])).await,
        "max_document_bytes",
    )
    .await;
    expect_invalid(
        c.rerank(request(&"q".repeat(41), &["a"])).await,
        "max_query_bytes",
    )
    .await;
    let long = "word ".repeat(70);
    let over = RerankRequest {
        truncation: Truncation::Reject as i32,
        ..request("query", &["short", &long])
    };
    expect_invalid(c.rerank(over).await, "max_length").await;
    let fits = RerankRequest {
        truncation: Truncation::Reject as i32,
        ..request("query", &["short"])
    };
    assert!(c.rerank(fits).await.is_ok(), "NONE accepts pairs that fit");
    expect_invalid(
        c.rerank(RerankRequest {
            truncation: 9,
            ..request("q", &["a"])
        })
        .await,
        "truncation",
    )
    .await;
    // The server keeps serving after every refusal.
    assert!(c.rerank(request("q", &["a"])).await.is_ok());
}

#[tokio::test]
async fn bad_streams_are_invalid_argument() {
    let server = start(test_config(ONE_LABEL)).await;
    let mut c = client(&server).await;
    let first_not_start = vec![chunk_message(vec!["a".into()])];
    let start_twice = vec![
        start_message(RerankStart {
            query: "q".into(),
            ..Default::default()
        }),
        chunk_message(vec!["a".into()]),
        start_message(RerankStart {
            query: "q".into(),
            ..Default::default()
        }),
    ];
    let empty_query = vec![start_message(RerankStart::default())];
    let no_documents = vec![start_message(RerankStart {
        query: "q".into(),
        ..Default::default()
    })];
    for (messages, needle) in [
        (first_not_start, "first stream message must be `start`"),
        (start_twice, "twice"),
        (empty_query, "query"),
        (no_documents, "no documents"),
    ] {
        let mut inbound = c
            .rerank_stream(tokio_stream::iter(messages))
            .await
            .expect("stream opens")
            .into_inner();
        let mut error = None;
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(status) => {
                    error = Some(status);
                    break;
                }
            }
        }
        let status = error.unwrap_or_else(|| panic!("stream should fail naming {needle}"));
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} should name {needle}",
            status.message()
        );
    }
}

#[tokio::test]
async fn info_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = start(test_config(ONE_LABEL)).await;
    let mut c = client(&server).await;
    let info = c.info(InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.architecture, "BertForSequenceClassification");
    assert_eq!(
        (info.max_length, info.device.as_str(), info.dtype.as_str()),
        (64, "cpu", "f32")
    );
    assert_eq!(
        (
            info.activation.as_str(),
            info.num_labels,
            info.max_documents
        ),
        ("sigmoid", 1, 1000)
    );
    assert!(!info.version.is_empty() && info.max_batch_tokens > 0 && info.max_wait_us > 0);
    c.rerank(request("q", &["a", "bb", "ccc"]))
        .await
        .expect("rerank");
    let stats = c
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .stats
        .expect("stats");
    assert!(stats.batches >= 1 && stats.pairs >= 3 && stats.padding_ratio >= 1.0);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.local_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "rerank.v1.RerankerService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            status.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("message")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(services)) = response.message_response else {
        panic!("expected a service list")
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    for wanted in ["rerank.v1.RerankerService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn health_is_not_serving_while_the_model_loads_and_rpcs_are_unavailable() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    // A model that never loads: the server still listens and reports NOT_SERVING.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(ONE_LABEL);
    config.model_id = dir.path().to_string_lossy().into_owned();
    let mut server = rerank_server::server::start(config).await.expect("listens");
    let err = server.ready().await.expect_err("load fails").to_string();
    assert!(
        err.contains("config.json"),
        "the error names the missing file: {err}"
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.local_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(status.status, ServingStatus::NotServing as i32);
    let mut c = rerank_server::proto::reranker_service_client::RerankerServiceClient::new(channel);
    let status = c
        .rerank(request("q", &["a"]))
        .await
        .expect_err("unavailable");
    assert_eq!(status.code(), Code::Unavailable);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_client_that_goes_away_has_its_pending_pairs_dropped() {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 1; // many small batches, so most pairs are still queued when the client leaves
    config.max_documents = 3000;
    let server = start(config).await;
    let mut c = client(&server).await;
    let documents: Vec<String> = (0..3000)
        .map(|i| format!("document {i} about the harbour market"))
        .collect();
    let messages = vec![
        start_message(RerankStart {
            query: "harbour".into(),
            ..Default::default()
        }),
        chunk_message(documents),
    ];
    let mut inbound = c
        .rerank_stream(tokio_stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let first = inbound
        .message()
        .await
        .expect("message")
        .expect("some scores");
    assert!(matches!(
        first.item,
        Some(rerank_stream_response::Item::Scores(_))
    ));
    drop(inbound);
    drop(c);

    let mut info_client = client(&server).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stats = loop {
        let stats = info_client
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .stats
            .expect("stats");
        if stats.queued_pairs == 0 || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(stats.queued_pairs, 0, "the queue is empty again");
    assert!(
        stats.cancelled_pairs > 0,
        "pending pairs were dropped, not computed: {stats:?}"
    );
    assert!(
        stats.pairs < 3000,
        "{} of 3000 pairs were computed after the client left",
        stats.pairs
    );
}
