//! Long documents scored in windows (chunk-max): the best window's score and its index against a reference
//! computed with transformers on every fixture model, through gRPC unary calls, streams and HTTP; and a
//! 20,000-token document scored whole.

mod common;

use common::{client, fixture, post_json, start, test_config, ALL_MODELS, ONE_LABEL};
use rerank_server::proto::{
    rerank_stream_request, rerank_stream_response, DocumentChunk, RerankRequest, RerankStart,
    RerankStreamRequest, Truncation,
};
use rerank_server::tokenization::PairTokenizer;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct ChunkExpected {
    max_length: usize,
    cases: Vec<ChunkCase>,
}

#[derive(Deserialize)]
struct ChunkCase {
    name: String,
    query: String,
    documents: Vec<String>,
    chunk_overlap_tokens: usize,
    max_chunks_per_doc: u32,
    scores: Vec<f32>,
    best_window: Vec<u32>,
    windows: Vec<u32>,
}

fn chunk_expected(model: &str) -> ChunkExpected {
    let path = fixture("expected").join(format!("{model}.chunk-max.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks one ranking against the reference: every document's best-window score and that window's index.
fn check(model: &str, case: &ChunkCase, via: &str, results: &[(u32, f32, Option<u32>)]) {
    assert_eq!(
        results.len(),
        case.documents.len(),
        "{model} {} via {via}",
        case.name
    );
    for &(index, score, chunk) in results {
        let i = index as usize;
        assert!(
            (score - case.scores[i]).abs() < 1e-4,
            "{model} {} via {via}: document {i} scored {score}, reference {}",
            case.name,
            case.scores[i]
        );
        assert_eq!(
            chunk,
            Some(case.best_window[i]),
            "{model} {} via {via}: best window of document {i}",
            case.name
        );
    }
}

#[tokio::test]
async fn chunk_max_matches_the_reference_on_every_fixture_and_transport() {
    for model in ALL_MODELS {
        let expected = chunk_expected(model);
        for case in &expected.cases {
            let mut config = test_config(model);
            config.max_length = Some(expected.max_length);
            config.chunk_overlap_tokens = case.chunk_overlap_tokens;
            let server = start(config).await;
            let mut grpc = client(&server).await;
            let request = RerankRequest {
                query: case.query.clone(),
                documents: case.documents.clone(),
                truncation: Truncation::ChunkMax as i32,
                max_chunks_per_doc: case.max_chunks_per_doc,
                ..Default::default()
            };
            let unary = grpc.rerank(request).await.expect("rerank").into_inner();
            let usage = unary.usage.expect("usage");
            assert_eq!(
                usage.pairs,
                case.windows.iter().sum::<u32>(),
                "{model} {}: one pair per window",
                case.name
            );
            let ranked: Vec<_> = unary
                .results
                .iter()
                .map(|r| (r.index, r.score, r.chunk))
                .collect();
            check(model, case, "gRPC", &ranked);

            let streamed = stream(&mut grpc, case).await;
            check(model, case, "gRPC stream", &streamed);

            let (status, reply) = post_json(
                &server,
                "/v1/rerank",
                &json!({"query": case.query, "documents": case.documents, "max_chunks_per_doc": case.max_chunks_per_doc}),
            )
            .await;
            assert_eq!(status, 200, "{reply}");
            let over_http: Vec<_> = reply["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|r| {
                    let index = r["index"].as_u64().expect("index") as u32;
                    let chunk = r["chunk"].as_u64().map(|c| c as u32);
                    (
                        index,
                        r["relevance_score"].as_f64().expect("score") as f32,
                        chunk,
                    )
                })
                .collect();
            check(model, case, "HTTP", &over_http);
            server.shutdown().await.expect("shutdown");
        }
    }
}

/// The final ranking of a RerankStream that sends the case's documents one per chunk.
async fn stream(
    grpc: &mut rerank_server::proto::reranker_service_client::RerankerServiceClient<
        tonic::transport::Channel,
    >,
    case: &ChunkCase,
) -> Vec<(u32, f32, Option<u32>)> {
    let start = RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Start(RerankStart {
            query: case.query.clone(),
            truncation: Truncation::ChunkMax as i32,
            max_chunks_per_doc: case.max_chunks_per_doc,
            ..Default::default()
        })),
    };
    let chunks = case.documents.iter().map(|d| RerankStreamRequest {
        item: Some(rerank_stream_request::Item::Documents(DocumentChunk {
            documents: vec![d.clone()],
        })),
    });
    let messages: Vec<_> = std::iter::once(start).chain(chunks).collect();
    let mut responses = grpc
        .rerank_stream(futures::stream::iter(messages))
        .await
        .expect("stream")
        .into_inner();
    let mut partial = 0;
    while let Some(message) = responses.message().await.expect("message") {
        match message.item {
            Some(rerank_stream_response::Item::Scores(scores)) => {
                // A chunked document's score is sent once, when all its windows are scored.
                assert!(scores.results.iter().all(|r| r.chunk.is_some()));
                partial += scores.results.len();
            }
            Some(rerank_stream_response::Item::Final(last)) => {
                assert_eq!(
                    partial,
                    case.documents.len(),
                    "each document's score was streamed once"
                );
                return last
                    .results
                    .iter()
                    .map(|r| (r.index, r.score, r.chunk))
                    .collect();
            }
            None => panic!("an empty stream message"),
        }
    }
    panic!("the stream ended without its final ranking")
}

#[tokio::test]
async fn a_20000_token_document_is_scored_in_full() {
    let max_length = 64;
    let overlap = 16;
    let query = "where is fresh fish sold?";
    let sentence =
        "the harbour wall was rebuilt after the storm and the fishermen moved their boats ";
    let document = sentence.repeat(20_000 / 14 + 1);
    let tokenizer =
        PairTokenizer::load(&fixture(ONE_LABEL), Some(max_length), 512, 1).expect("tokenizer");
    let doc_tokens = tokenizer
        .reference_document_ids(&document)
        .expect("ids")
        .len();
    let query_tokens = tokenizer.reference_document_ids(query).expect("ids").len();
    assert!(doc_tokens >= 20_000, "{doc_tokens} tokens");
    // The windows the document needs: a pair's text less the query, moving by the window less the overlap.
    let width = (max_length - 3) - query_tokens;
    let step = width - overlap;
    let windows = 1 + (doc_tokens - width).div_ceil(step);

    let mut config = test_config(ONE_LABEL);
    config.max_length = Some(max_length);
    config.chunk_overlap_tokens = overlap;
    config.max_chunks_per_doc = 2000;
    let server = start(config).await;
    let response = client(&server)
        .await
        .rerank(RerankRequest {
            query: query.into(),
            documents: vec![document, "fish market".into()],
            truncation: Truncation::ChunkMax as i32,
            ..Default::default()
        })
        .await
        .expect("rerank")
        .into_inner();
    let usage = response.usage.expect("usage");
    assert_eq!(
        usage.pairs as usize,
        windows + 1,
        "every window of the document was scored"
    );
    assert!(
        usage.tokens as usize >= doc_tokens,
        "all {doc_tokens} document tokens reached the model"
    );
    let long = response
        .results
        .iter()
        .find(|r| r.index == 0)
        .expect("the long document");
    assert!(long.chunk.is_some_and(|c| (c as usize) < windows));
}
