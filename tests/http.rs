//! End-to-end tests of the HTTP/JSON APIs (Cohere v2, Cohere v1 / Jina, TEI), served on the gRPC port: the
//! same scores and order as gRPC, error statuses, request ids, health, info and the Prometheus metrics.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{
    client, expected, http_url, post_json, start, start_wrapped, test_config, Gate, ONE_LABEL,
    TWO_LABEL, XLMR,
};
use rerank_server::proto::RerankRequest;
use serde_json::{json, Value};

/// (index, score) pairs of a JSON result list, with the score under `key`.
fn ranking(results: &Value, key: &str) -> Vec<(u32, f32)> {
    results
        .as_array()
        .expect("a result list")
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().expect("index") as u32,
                r[key].as_f64().expect("score") as f32,
            )
        })
        .collect()
}

#[tokio::test]
async fn every_http_api_gives_the_grpc_scores_and_order() {
    for model in [ONE_LABEL, TWO_LABEL, XLMR] {
        let server = start(test_config(model)).await;
        let case = &expected(model).cases[0];
        let grpc = client(&server)
            .await
            .rerank(RerankRequest {
                query: case.query.clone(),
                documents: case.documents.clone(),
                ..Default::default()
            })
            .await
            .expect("gRPC rerank")
            .into_inner();
        let want: Vec<(u32, f32)> = grpc.results.iter().map(|r| (r.index, r.score)).collect();
        for (i, (index, score)) in want.iter().enumerate() {
            assert!(
                (score - case.scores[*index as usize]).abs() < 1e-4,
                "{model} result {i}"
            );
        }

        let (status, v2) = post_json(
            &server,
            "/v2/rerank",
            &json!({"model": model, "query": case.query, "documents": case.documents, "max_tokens_per_doc": null}),
        )
        .await;
        assert_eq!(status, 200, "{v2}");
        assert_eq!(
            ranking(&v2["results"], "relevance_score"),
            want,
            "{model} /v2/rerank"
        );
        assert_eq!(v2["meta"]["billed_units"]["search_units"], 1);
        assert_eq!(
            v2["meta"]["tokens"]["input_tokens"],
            grpc.usage.as_ref().map_or(0, |u| u.tokens)
        );

        let objects: Vec<Value> = case
            .documents
            .iter()
            .map(|d| json!({ "text": d }))
            .collect();
        let (status, v1) = post_json(
            &server,
            "/v1/rerank",
            &json!({"query": case.query, "documents": objects, "return_documents": true, "top_n": 2}),
        )
        .await;
        assert_eq!(status, 200, "{v1}");
        assert_eq!(
            ranking(&v1["results"], "relevance_score"),
            want[..2].to_vec(),
            "{model} /v1/rerank"
        );
        let first = &v1["results"][0];
        let text = &case.documents[first["index"].as_u64().expect("index") as usize];
        assert_eq!(first["document"]["text"], json!(text));
        assert!(v1["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0));

        let (status, tei) = post_json(
            &server,
            "/rerank",
            &json!({"query": case.query, "texts": case.documents, "return_text": true}),
        )
        .await;
        assert_eq!(status, 200, "{tei}");
        assert_eq!(ranking(&tei, "score"), want, "{model} /rerank");
        assert_eq!(tei[0]["text"], json!(case.documents[want[0].0 as usize]));
        server.shutdown().await.expect("shutdown");
    }
}

#[tokio::test]
async fn json_is_served_over_http2_as_well_as_http1() {
    let server = start(test_config(ONE_LABEL)).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2
        .post(http_url(&server, "/rerank"))
        .json(&json!({"query": "capital of france", "texts": ["paris", "berlin"], "raw_scores": true}))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body.as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn errors_are_json_messages_with_the_matching_status() {
    let mut config = test_config(ONE_LABEL);
    config.max_documents = 3;
    config.max_message_bytes = 4096;
    let server = start(config).await;
    let docs = json!(["a", "b"]);
    let cases = [
        (
            json!({"query": "", "documents": docs}),
            400,
            "query must not be empty",
        ),
        (
            json!({"query": "q", "documents": docs, "model": "someone/else"}),
            400,
            "not served here",
        ),
        (
            json!({"query": "q", "documents": ["a", "b", "c", "d"]}),
            413,
            "max_documents",
        ),
        (
            json!({"query": "q", "documents": ["x".repeat(5000)]}),
            413,
            "max_message_bytes",
        ),
        (
            json!({"query": "q", "documents": docs, "truncation": "reject", "max_chunks_per_doc": 65}),
            413,
            "max_chunks_per_doc",
        ),
        (
            json!({"query": "q", "documents": docs, "truncation": "sideways"}),
            400,
            "truncation",
        ),
        (json!({"query": "q"}), 400, "invalid JSON body"),
    ];
    for (body, status, needle) in cases {
        let (got, reply) = post_json(&server, "/v2/rerank", &body).await;
        assert_eq!(got, status, "{body} → {reply}");
        let message = reply["message"].as_str().expect("a message");
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
    let (status, reply) = post_json(&server, "/nope", &json!({})).await;
    assert_eq!((status, reply["message"].is_string()), (404, true));
    // The model's own id (or its last path part) is accepted.
    let (status, _) = post_json(
        &server,
        "/v2/rerank",
        &json!({"query": "q", "documents": docs, "model": ONE_LABEL}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_api_key_guards_rerank_and_info_but_not_health_or_metrics() {
    let mut config = test_config(ONE_LABEL);
    config.api_key = Some("s3cret".into());
    let server = start(config).await;
    let http = reqwest::Client::new();
    let body = json!({"query": "q", "texts": ["a"]});
    let call = |key: Option<&str>| {
        let mut request = http.post(http_url(&server, "/rerank")).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(call(None).await.expect("sent").status(), 401);
    assert_eq!(call(Some("wrong")).await.expect("sent").status(), 401);
    assert_eq!(call(Some("s3cret")).await.expect("sent").status(), 200);
    let get = |path: &str| http.get(http_url(&server, path)).send();
    assert_eq!(get("/info").await.expect("sent").status(), 401);
    assert_eq!(get("/health").await.expect("sent").status(), 200);
    assert_eq!(get("/metrics").await.expect("sent").status(), 200);
    let counted = scrape(&server).await;
    assert_eq!(
        counted.get(r#"rerank_requests_total{endpoint="http_tei",outcome="unauthenticated"}"#),
        Some(&2.0),
        "refused calls are counted"
    );
}

#[tokio::test]
async fn admission_refusals_are_429_and_passed_deadlines_504() {
    let mut config = test_config(ONE_LABEL);
    config.max_batch_size = 1;
    config.max_pending_pairs = 20;
    // Both calls come from one client: the global limit, not the client's share, is under test here.
    config.max_client_share = 1.0;
    let gate = Gate::closed();
    let server = start_wrapped(config, gate.wrapper()).await;
    let docs: Vec<String> = (0..19).map(|i| format!("document {i}")).collect();
    let url = http_url(&server, "/rerank");
    let body = json!({"query": "q", "texts": docs});
    let first = tokio::spawn(reqwest::Client::new().post(url).json(&body).send());
    // Its first pair is held at the gate: all 19 pairs are pending, room for one more.
    gate.wait_entered(1).await;
    let (status, reply) = post_json(
        &server,
        "/v2/rerank",
        &json!({"query": "q", "documents": ["two", "more"]}),
    )
    .await;
    assert_eq!(status, 429, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_pending_pairs")),
        "{reply}"
    );
    let metrics = scrape(&server).await;
    assert_eq!(
        metrics.get(r#"rerank_admission_refusals_total{reason="pairs"}"#),
        Some(&1.0)
    );

    // A call whose deadline passes while the gate holds the engine gets 504.
    let late = reqwest::Client::new()
        .post(http_url(&server, "/v1/rerank"))
        .header("x-request-timeout", "2s")
        .json(&json!({"query": "q", "documents": ["late"]}));
    let first_done = async {
        let response = late.send().await.expect("sent");
        assert_eq!(response.status(), 504);
    };
    tokio::time::timeout(Duration::from_secs(30), first_done)
        .await
        .expect("the deadline is applied");
    gate.open();
    let first = first.await.expect("task").expect("sent");
    assert_eq!(first.status(), 200);
}

#[tokio::test]
async fn health_follows_the_lifecycle_and_a_draining_server_serves_until_it_stops() {
    let server = start(test_config(ONE_LABEL)).await;
    let http = reqwest::Client::new();
    let health = |http: &reqwest::Client| http.get(http_url(&server, "/health")).send();
    assert_eq!(health(&http).await.expect("sent").status(), 200);
    let info: Value = http
        .get(http_url(&server, "/info"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert!(info["model"]
        .as_str()
        .is_some_and(|m| m.ends_with(ONE_LABEL)));
    assert_eq!(info["max_concurrent_calls"], 512);
    let call = json!({"query": "q", "texts": ["a"]});
    server.lifecycle().drain();
    let draining = health(&http).await.expect("sent");
    assert_eq!(draining.status(), 503);
    let body: Value = draining.json().await.expect("json");
    assert_eq!(body["status"], "draining");
    let (status, reply) = post_json(&server, "/rerank", &call).await;
    assert_eq!(
        status, 200,
        "calls are still served while balancers notice: {reply}"
    );
    server.lifecycle().stop();
    assert_eq!(health(&http).await.expect("sent").status(), 503);
    let (status, reply) = post_json(&server, "/rerank", &call).await;
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{reply}"
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated_on_http_and_grpc() {
    let server = start(test_config(ONE_LABEL)).await;
    let http = reqwest::Client::new();
    let body = json!({"query": "q", "documents": ["a"]});
    let given = http
        .post(http_url(&server, "/v2/rerank"))
        .header("x-request-id", "abc-123")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(given.headers()["x-request-id"], "abc-123");
    let reply: Value = given.json().await.expect("json");
    assert_eq!(
        reply["id"], "abc-123",
        "Cohere's response id is the request id"
    );
    let generated = http
        .post(http_url(&server, "/v2/rerank"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let id = generated.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
    let grpc = client(&server)
        .await
        .rerank(RerankRequest {
            query: "q".into(),
            documents: vec!["a".into()],
            ..Default::default()
        })
        .await
        .expect("rerank");
    assert!(grpc.metadata().get("x-request-id").is_some());
}

/// Every sample of `/metrics`, by name with labels.
async fn scrape(server: &rerank_server::server::RunningServer) -> HashMap<String, f64> {
    let text = reqwest::get(http_url(server, "/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_the_traffic_and_readme_lists_every_metric() {
    let server = start(test_config(ONE_LABEL)).await;
    let docs = ["paris", "berlin", "rome"];
    for path in ["/v2/rerank", "/v1/rerank"] {
        let (status, _) = post_json(
            &server,
            path,
            &json!({"query": "capital", "documents": docs}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = post_json(&server, "/rerank", &json!({"query": "", "texts": docs})).await;
    assert_eq!(status, 400);
    // Calls refused before they reach the core are counted too: a body that is not the API's JSON, and a
    // gRPC request with an unknown option.
    let (status, _) = post_json(&server, "/v2/rerank", &json!({"documents": docs})).await;
    assert_eq!(status, 400);
    let unknown_truncation = client(&server)
        .await
        .rerank(RerankRequest {
            query: "capital".into(),
            documents: vec!["paris".into()],
            truncation: 99,
            ..Default::default()
        })
        .await;
    assert!(unknown_truncation.is_err());
    client(&server)
        .await
        .rerank(RerankRequest {
            query: "capital".into(),
            documents: docs.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("gRPC rerank");
    let metrics = scrape(&server).await;
    let get = |name: &str| {
        metrics
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("{name} is missing"))
    };
    assert_eq!(
        get(r#"rerank_requests_total{endpoint="http_v2",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"rerank_requests_total{endpoint="http_v1",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"rerank_requests_total{endpoint="http_tei",outcome="invalid_argument"}"#),
        1.0
    );
    assert_eq!(
        get(r#"rerank_requests_total{endpoint="grpc",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"rerank_requests_total{endpoint="http_v2",outcome="invalid_argument"}"#),
        1.0
    );
    assert_eq!(
        get(r#"rerank_requests_total{endpoint="grpc",outcome="invalid_argument"}"#),
        1.0
    );
    assert_eq!(get("rerank_documents_total"), 9.0);
    assert_eq!(get("rerank_pairs_total"), 9.0);
    assert_eq!(get("rerank_batch_pairs_sum"), 9.0);
    assert!(get("rerank_batch_pairs_count") >= 1.0);
    assert_eq!(get("rerank_real_tokens_total"), get("rerank_tokens_total"));
    assert_eq!(
        get(r#"rerank_request_duration_seconds_count{endpoint="grpc"}"#),
        2.0
    );
    assert_eq!(get("rerank_tokenize_duration_seconds_count"), 3.0);
    assert!(get("rerank_engine_busy_seconds_total") > 0.0);
    assert!(get("rerank_tokenizer_busy_seconds_total") > 0.0);
    assert_eq!(get("rerank_queue_pairs"), 0.0);
    assert_eq!(get("rerank_pending_pairs"), 0.0);
    assert_eq!(get("rerank_serving"), 1.0);

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("rerank_"))
        .map(str::to_string)
        .collect();
    let text = reqwest::get(http_url(&server, "/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect();
    assert_eq!(
        documented, exported,
        "README's metrics table lists exactly the exported metrics"
    );
}

#[tokio::test]
async fn json_over_https_works_with_http1_and_http2_clients() {
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
    let url = format!("https://localhost:{}/rerank", server.local_addr.port());
    let root = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).expect("root");
    for (http2, version) in [
        (false, reqwest::Version::HTTP_11),
        (true, reqwest::Version::HTTP_2),
    ] {
        let mut builder = reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .tls_built_in_root_certs(false);
        builder = if http2 { builder } else { builder.http1_only() };
        let response = builder
            .build()
            .expect("client")
            .post(&url)
            .json(&json!({"query": "capital of france", "texts": ["paris", "berlin"]}))
            .send()
            .await
            .expect("HTTPS request");
        assert_eq!(
            response.version(),
            version,
            "ALPN chose {:?}",
            response.version()
        );
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_the_served_model() {
    let mut config = test_config(ONE_LABEL);
    config.max_documents = 77;
    let server = start(config).await;
    let doc: Value = reqwest::get(http_url(&server, "/openapi.json"))
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v2/rerank",
        "/v1/rerank",
        "/rerank",
        "/info",
        "/health",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    let cohere = &doc["components"]["schemas"]["CohereRequest"]["properties"];
    assert_eq!(cohere["documents"]["maxItems"], 77);
    assert_eq!(
        doc["components"]["schemas"]["TeiRequest"]["properties"]["texts"]["maxItems"],
        77
    );
    let names = cohere["model"]["enum"].as_array().expect("model names");
    assert!(names.contains(&json!(ONE_LABEL)), "{names:?}");
    assert_eq!(
        cohere["instruction"]["type"], "null",
        "a cross-encoder takes no instruction, and the document says so"
    );
    assert_eq!(
        cohere["max_chunks_per_doc"]["maximum"],
        rerank_server::config::Config::default().max_chunks_per_doc
    );
}
