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

/// How to reach the Hub and where its cache lives, as the Hugging Face libraries read them from the
/// environment: HF_ENDPOINT, HF_HUB_CACHE (else HF_HOME/hub, else ~/.cache/huggingface/hub), HF_TOKEN (else
/// the token file under HF_HOME) and HF_HUB_OFFLINE.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: Option<String>,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubSettings {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cache = match var("HF_HUB_CACHE") {
            Some(dir) => Cache::new(PathBuf::from(dir)),
            None => Cache::from_env(),
        };
        Self {
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN").or_else(|| cache.token()),
            cache_dir: cache.path().clone(),
            offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
            progress: true,
        }
    }
}

/// Returns a local directory holding the model's files, with the settings from the environment.
pub async fn resolve(model_id: &str, revision: &str) -> Result<PathBuf, StartupError> {
    resolve_with(model_id, revision, &HubSettings::from_env()).await
}

/// Returns a local directory holding the model's files: `model_id` itself if it is a directory, else the
/// Hub repository's snapshot from the cache, downloading what is missing unless offline.
pub async fn resolve_with(
    model_id: &str,
    revision: &str,
    settings: &HubSettings,
) -> Result<PathBuf, StartupError> {
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
    if let Some(dir) = cached(&Cache::new(settings.cache_dir.clone()), &repo) {
        tracing::info!(model_id, revision, dir = %dir.display(), "using the cached model");
        return Ok(dir);
    }
    if settings.offline {
        return Err(StartupError::Hub(format!(
            "{model_id} (revision {revision}) is not in the cache at {} and HF_HUB_OFFLINE is set; download it \
             once online, or pass a local model directory with --model-id /path/to/model",
            settings.cache_dir.display()
        )));
    }
    download(model_id, repo, settings).await
}

fn looks_like_path(id: &str) -> bool {
    id.starts_with(['/', '.', '~']) || id.contains('\\') || id.matches('/').count() > 1
}

/// The cached snapshot directory when every file the model needs is already there.
fn cached(cache: &Cache, repo: &Repo) -> Option<PathBuf> {
    let config = cache.repo(repo.clone()).get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let complete =
        REQUIRED.iter().all(|f| dir.join(f).is_file()) && crate::model::weight_files(&dir).is_ok();
    complete.then_some(dir)
}

async fn download(
    model_id: &str,
    repo: Repo,
    settings: &HubSettings,
) -> Result<PathBuf, StartupError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_progress(settings.progress)
        .with_token(settings.token.clone());
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .map_err(|e| StartupError::Hub(e.to_string()))?;
    let repo = api.repo(repo);
    let info = repo.info().await.map_err(|e| hub_error(model_id, e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let wanted = files_to_fetch(model_id, &files)?;
    tracing::info!(model_id, files = ?wanted, "downloading from the Hugging Face Hub");
    let mut dir = None;
    for file in &wanted {
        let path = fetch(&repo, model_id, file).await?;
        dir = dir.or_else(|| path.parent().map(Path::to_path_buf));
    }
    dir.ok_or_else(|| StartupError::Hub(format!("{model_id}: nothing was downloaded")))
}

/// The files of a repository listing the server needs, config first; safetensors weights only.
fn files_to_fetch(model_id: &str, files: &[String]) -> Result<Vec<String>, StartupError> {
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
    } else if has("pytorch_model.bin") {
        return Err(StartupError::Hub(format!(
            "{model_id} only has pytorch_model.bin; the server loads safetensors weights (model.safetensors), so \
             convert it (transformers: save_pretrained(dir, safe_serialization=True)) and pass that directory"
        )));
    } else {
        return Err(StartupError::Hub(format!(
            "{model_id} has no model.safetensors weights"
        )));
    }
    Ok(wanted)
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

    #[test]
    fn picks_safetensors_and_refuses_pytorch_bin_only_repositories() {
        let listing = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let files = listing(&[
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "pytorch_model.bin",
            "README.md",
        ]);
        assert_eq!(
            files_to_fetch("m", &files).ok(),
            Some(listing(&[
                "config.json",
                "tokenizer.json",
                "model.safetensors"
            ]))
        );
        let sharded = listing(&[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]);
        assert_eq!(files_to_fetch("m", &sharded).map(|f| f.len()).ok(), Some(6));
        let bin_only = listing(&["config.json", "tokenizer.json", "pytorch_model.bin"]);
        let err = files_to_fetch("m", &bin_only)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("pytorch_model.bin") && err.contains("model.safetensors"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn offline_without_a_cached_copy_says_so() {
        let cache = tempfile::tempdir().expect("tempdir");
        let settings = HubSettings {
            endpoint: Some("http://127.0.0.1:9".into()),
            cache_dir: cache.path().to_path_buf(),
            token: None,
            offline: true,
            progress: false,
        };
        let err = resolve_with("org/model", "main", &settings)
            .await
            .expect_err("offline")
            .to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("--model-id"),
            "{err}"
        );
    }
}
