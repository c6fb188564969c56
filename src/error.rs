//! Error types of the library: start-up failures and per-request failures (mapped to gRPC codes in the transport).

use std::path::PathBuf;

/// Why the server could not start: bad configuration, missing or malformed model files, unsupported models.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("model file {path} is missing: {expected}")]
    MissingFile { path: PathBuf, expected: String },
    #[error("model file {path} is not valid: {reason}")]
    InvalidFile { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
    #[error("loading weights: {0}")]
    Weights(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The background model load failed; the reason is the original error's text.
    #[error("model failed to load: {0}")]
    Load(String),
}

/// Why one rerank request failed. Each variant maps to exactly one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RerankError {
    /// The request itself is malformed or over a limit (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The server is not ready or is shutting down (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A fault inside the server, e.g. a failed batch (INTERNAL).
    #[error("{0}")]
    Internal(String),
    /// The server is at its admission limits (RESOURCE_EXHAUSTED); retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The call's deadline passed before its scores were ready (DEADLINE_EXCEEDED).
    #[error("{0}")]
    DeadlineExceeded(String),
}

impl RerankError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }
}
