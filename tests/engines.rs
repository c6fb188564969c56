//! Several engines fed by one scheduler (`device = "cpu,cpu"`, as `cuda:0,cuda:1` on a GPU node): the batches
//! go to whichever engine frees first, and the scores are those of a single engine.

mod common;

use common::{client, expected, start, start_wrapped, test_config, Gate, ONE_LABEL};
use rerank_server::proto::{InfoRequest, RerankRequest};

fn request(query: &str, documents: &[String]) -> RerankRequest {
    RerankRequest {
        query: query.into(),
        documents: documents.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn two_engines_both_take_batches_and_score_as_one_engine() {
    let case = &expected(ONE_LABEL).cases[0];
    let single = start(test_config(ONE_LABEL)).await;
    let reference = client(&single)
        .await
        .rerank(request(&case.query, &case.documents))
        .await
        .expect("one engine")
        .into_inner();

    let mut config = test_config(ONE_LABEL);
    config.device = "cpu,cpu".into();
    config.max_batch_size = 2;
    let gate = Gate::closed();
    let server = start_wrapped(config, gate.wrapper()).await;
    let mut grpc = client(&server).await;
    let info = grpc.info(InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.device, "cpu,cpu");
    let call = tokio::spawn({
        let mut grpc = grpc.clone();
        let request = request(&case.query, &case.documents);
        async move { grpc.rerank(request).await }
    });
    // Two batches of two pairs: one engine holds the first at the gate, so only the other can take the second.
    tokio::time::timeout(std::time::Duration::from_secs(60), gate.wait_entered(2))
        .await
        .expect("a second engine takes the second batch while the first is held");
    let threads = gate.threads();
    let engine_of = |thread: &str| thread.split("-compute-").next().unwrap_or("").to_string();
    assert_ne!(
        engine_of(&threads[0]),
        engine_of(&threads[1]),
        "both engines compute: {threads:?}"
    );
    assert!(
        threads.iter().all(|t| t.starts_with("engine-")),
        "{threads:?}"
    );
    gate.open();
    let both = call.await.expect("task").expect("two engines").into_inner();
    let order = |r: &rerank_server::proto::RerankResponse| {
        r.results.iter().map(|d| d.index).collect::<Vec<_>>()
    };
    assert_eq!(order(&both), order(&reference));
    for (a, b) in both.results.iter().zip(&reference.results) {
        assert!(
            (a.score - b.score).abs() < 1e-6,
            "{} against {}",
            a.score,
            b.score
        );
    }
}
