//! Finds the model directory: a local path as is, or a Hugging Face Hub id from the local cache or downloaded.

use std::path::{Path, PathBuf};

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::StartupError;

/// Files every model needs, and files read when present.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &["tokenizer_config.json", "config_sentence_transformers.json"];
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Returns a local directory holding the model's files.
pub async fn resolve(model_id: &str, revision: &str) -> Result<PathBuf, StartupError> {
    let path = Path::new(model_id);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if looks_like_path(model_id) {
        return Err(StartupError::MissingFile {
            path: path.to_path_buf(),
            expected: "a model directory with config.json, model.safetensors and tokenizer.json"
                .into(),
        });
    }
    let repo = Repo::with_revision(model_id.to_string(), RepoType::Model, revision.to_string());
    if let Some(dir) = cached(&repo) {
        tracing::info!(model_id, dir = %dir.display(), "using the cached model");
        return Ok(dir);
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Err(StartupError::Hub(format!(
            "{model_id} is not in the local cache and HF_HUB_OFFLINE is set; download it once online, or pass a \
             local model directory with --model-id /path/to/model"
        )));
    }
    download(model_id, repo).await
}

fn looks_like_path(id: &str) -> bool {
    id.starts_with(['/', '.', '~']) || id.contains('\\') || id.matches('/').count() > 1
}

/// The cached snapshot directory when every required file is already there.
fn cached(repo: &Repo) -> Option<PathBuf> {
    let cache = Cache::from_env().repo(repo.clone());
    let config = cache.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let complete = REQUIRED.iter().all(|f| dir.join(f).is_file())
        && (dir.join(WEIGHTS).is_file() || crate::model::weight_files(&dir).is_ok());
    complete.then_some(dir)
}

async fn download(model_id: &str, repo: Repo) -> Result<PathBuf, StartupError> {
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_token(token)
        .build()
        .map_err(|e| StartupError::Hub(e.to_string()))?;
    let repo = api.repo(repo);
    let info = repo.info().await.map_err(|e| hub_error(model_id, e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has = |name: &str| files.iter().any(|f| f == name);
    if let Some(missing) = REQUIRED.iter().find(|f| !has(f)) {
        return Err(StartupError::Hub(format!(
            "{model_id} has no {missing}, which the server needs"
        )));
    }
    let mut wanted: Vec<String> = REQUIRED
        .iter()
        .chain(OPTIONAL)
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    if has(WEIGHTS) {
        wanted.push(WEIGHTS.into());
    } else if has(WEIGHTS_INDEX) {
        wanted.push(WEIGHTS_INDEX.into());
        wanted.extend(
            files
                .iter()
                .filter(|f| f.starts_with("model-") && f.ends_with(".safetensors"))
                .cloned(),
        );
    } else {
        return Err(StartupError::Hub(format!(
            "{model_id} has no model.safetensors; the server loads safetensors weights only{}",
            if has("pytorch_model.bin") {
                " (this repository only has pytorch_model.bin)"
            } else {
                ""
            }
        )));
    }
    tracing::info!(model_id, files = ?wanted, "downloading from the Hugging Face Hub");
    let mut dir = None;
    for file in &wanted {
        let path = fetch(&repo, model_id, file).await?;
        dir = dir.or_else(|| path.parent().map(Path::to_path_buf));
    }
    dir.ok_or_else(|| StartupError::Hub(format!("{model_id}: nothing was downloaded")))
}

async fn fetch(repo: &ApiRepo, model_id: &str, file: &str) -> Result<PathBuf, StartupError> {
    repo.get(file).await.map_err(|e| hub_error(model_id, e))
}

fn hub_error(model_id: &str, error: ApiError) -> StartupError {
    let unreachable = match &error {
        ApiError::RequestError(e) => e.is_connect() || e.is_timeout() || e.is_request(),
        _ => false,
    };
    if unreachable {
        StartupError::Hub(format!(
            "could not reach the Hugging Face Hub to download {model_id} ({error}); pass a local model directory \
             instead with --model-id /path/to/model (config.json, model.safetensors, tokenizer.json)"
        ))
    } else {
        StartupError::Hub(format!("downloading {model_id}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_paths_from_hub_ids() {
        assert!(looks_like_path("./models/x"));
        assert!(looks_like_path("/srv/model"));
        assert!(looks_like_path("a/b/c"));
        assert!(!looks_like_path("cross-encoder/ms-marco-MiniLM-L6-v2"));
        assert!(!looks_like_path("bert-base-uncased"));
    }

    #[tokio::test]
    async fn a_missing_local_directory_is_named() {
        let err = resolve("./no/such/model", "main")
            .await
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("./no/such/model") && err.contains("config.json"),
            "{err}"
        );
    }
}
