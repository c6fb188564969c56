//! The Hugging Face Hub download path against a local stand-in that serves the Hub's file layout.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::{fixture, ONE_LABEL};
use rerank_server::hub::{resolve_with, HubSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves two repositories: `org/tiny` (the BERT fixture) and `org/bin-only` (no safetensors).
struct StandIn {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

async fn stand_in() -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, Arc::clone(&log)));
        }
    });
    StandIn { endpoint, requests }
}

fn repository_files(repo: &str) -> Vec<(String, Vec<u8>)> {
    match repo {
        "org/tiny" => std::fs::read_dir(fixture(ONE_LABEL))
            .expect("fixture")
            .map(|e| e.expect("entry").path())
            .map(|p| {
                (
                    p.file_name().expect("name").to_string_lossy().into_owned(),
                    std::fs::read(&p).expect("read"),
                )
            })
            .collect(),
        "org/bin-only" => ["config.json", "tokenizer.json", "pytorch_model.bin"]
            .iter()
            .map(|f| (f.to_string(), b"{}".to_vec()))
            .collect(),
        _ => Vec::new(),
    }
}

async fn answer(mut stream: TcpStream, log: Arc<Mutex<Vec<String>>>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    log.lock().expect("log").push(path.clone());
    let range = text.lines().find_map(|l| {
        let lower = l.to_ascii_lowercase();
        let spec = lower.strip_prefix("range: bytes=")?.to_string();
        let (a, b) = spec.split_once('-')?;
        Some((
            a.trim().parse::<usize>().ok()?,
            b.trim().parse::<usize>().ok()?,
        ))
    });
    let response = route(&path, range);
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

fn route(path: &str, range: Option<(usize, usize)>) -> Vec<u8> {
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let repo = rest.split("/revision/").next().unwrap_or_default();
        let files = repository_files(repo);
        if files.is_empty() {
            return http(404, &[], b"not found");
        }
        let siblings: Vec<_> = files
            .iter()
            .map(|(f, _)| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        return http(
            200,
            &[("content-type", "application/json".into())],
            body.as_bytes(),
        );
    }
    let Some((repo, file)) = path.trim_start_matches('/').split_once("/resolve/main/") else {
        return http(404, &[], b"not found");
    };
    let Some((_, bytes)) = repository_files(repo).into_iter().find(|(f, _)| f == file) else {
        return http(404, &[], b"not found");
    };
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    let (start, end) = range.unwrap_or((0, bytes.len() - 1));
    let end = end.min(bytes.len() - 1);
    let headers = [
        ("etag", format!("\"{:016x}\"", hasher.finish())),
        ("x-repo-commit", COMMIT.into()),
        (
            "content-range",
            format!("bytes {start}-{end}/{}", bytes.len()),
        ),
    ];
    http(
        if range.is_some() { 206 } else { 200 },
        &headers,
        &bytes[start..=end],
    )
}

fn http(status: u16, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    response.extend_from_slice(body);
    response
}

fn settings(endpoint: &str, cache: PathBuf, offline: bool) -> HubSettings {
    HubSettings {
        endpoint: Some(endpoint.into()),
        cache_dir: cache,
        token: None,
        offline,
        progress: false,
    }
}

#[tokio::test]
async fn downloads_into_the_cache_then_starts_from_it_without_the_network() {
    let hub = stand_in().await;
    let cache = tempfile::tempdir().expect("tempdir");
    let dir = resolve_with(
        "org/tiny",
        "main",
        &settings(&hub.endpoint, cache.path().into(), false),
    )
    .await
    .expect("download");
    assert!(
        dir.starts_with(cache.path()),
        "{} is in the cache",
        dir.display()
    );
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let (got, want) = (
            std::fs::read(dir.join(file)).expect("cached"),
            std::fs::read(fixture(ONE_LABEL).join(file)).expect("fixture"),
        );
        assert_eq!(got, want, "{file} downloaded intact");
    }
    rerank_server::model::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)
        .expect("the downloaded model loads");
    let first_start = hub.requests.lock().expect("log").len();
    assert!(first_start >= 5, "listing and file requests were made");

    let again = resolve_with(
        "org/tiny",
        "main",
        &settings(&hub.endpoint, cache.path().into(), false),
    )
    .await
    .expect("cached");
    assert_eq!(again, dir);
    assert_eq!(
        hub.requests.lock().expect("log").len(),
        first_start,
        "the second start used the cache only"
    );

    let offline = resolve_with(
        "org/tiny",
        "main",
        &settings("http://127.0.0.1:9", cache.path().into(), true),
    )
    .await
    .expect("offline from cache");
    assert_eq!(offline, dir);
}

#[tokio::test]
async fn refuses_repositories_without_safetensors_and_names_unreachable_hubs() {
    let hub = stand_in().await;
    let cache = tempfile::tempdir().expect("tempdir");
    let err = resolve_with(
        "org/bin-only",
        "main",
        &settings(&hub.endpoint, cache.path().into(), false),
    )
    .await
    .expect_err("no safetensors")
    .to_string();
    assert!(
        err.contains("pytorch_model.bin") && err.contains("model.safetensors"),
        "{err}"
    );

    let err = resolve_with(
        "org/missing",
        "main",
        &settings(&hub.endpoint, cache.path().into(), false),
    )
    .await
    .expect_err("404")
    .to_string();
    assert!(err.contains("org/missing"), "{err}");

    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let err = resolve_with(
        "org/tiny",
        "main",
        &settings(&endpoint, cache.path().into(), false),
    )
    .await
    .expect_err("unreachable")
    .to_string();
    assert!(
        err.contains("could not reach the Hugging Face Hub") && err.contains("--model-id"),
        "{err}"
    );
}
