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
    /// A second SIGTERM/SIGINT ended the drain before the calls in flight had finished.
    #[error("a second signal ended the drain; calls still in flight were cut off")]
    Interrupted,
}

/// Why one rerank call failed. Each variant maps to exactly one gRPC status code and one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RerankError {
    /// The request itself is malformed (INVALID_ARGUMENT; HTTP 400).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is over a configured size limit (INVALID_ARGUMENT; HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// Missing or wrong API key (UNAUTHENTICATED; HTTP 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The server is not ready or is shutting down (UNAVAILABLE; HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// A fault inside the server, e.g. a failed batch (INTERNAL; HTTP 500).
    #[error("{0}")]
    Internal(String),
    /// The server is at one of its admission limits (RESOURCE_EXHAUSTED; HTTP 429); retry later.
    #[error("{message}")]
    ResourceExhausted { reason: Refusal, message: String },
    /// The call's deadline passed before its scores were ready (DEADLINE_EXCEEDED; HTTP 504).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A stream's client neither read nor sent for stream_idle_timeout (ABORTED).
    #[error("{0}")]
    Aborted(String),
    /// The client went away (CANCELLED).
    #[error("{0}")]
    Cancelled(String),
    /// The request did not arrive whole within request_read_timeout (DEADLINE_EXCEEDED; HTTP 408).
    #[error("{0}")]
    RequestTimeout(String),
}

/// Which admission limit refused work: the `reason` label of `rerank_admission_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// max_concurrent_calls.
    Calls,
    /// max_pending_pairs.
    Pairs,
    /// max_pending_tokens.
    Tokens,
    /// max_inflight_bytes.
    Bytes,
    /// The expected wait passes max_queue_time.
    QueueTime,
    /// The work cannot finish before the call's deadline.
    Deadline,
    /// The work would make admitted calls miss their deadlines.
    OthersDeadlines,
    /// The calling client already holds its share (max_client_share) of slots or admission.
    ClientShare,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Self::Calls,
        Self::Pairs,
        Self::Tokens,
        Self::Bytes,
        Self::QueueTime,
        Self::Deadline,
        Self::OthersDeadlines,
        Self::ClientShare,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Calls => "calls",
            Self::Pairs => "pairs",
            Self::Tokens => "tokens",
            Self::Bytes => "bytes",
            Self::QueueTime => "queue_time",
            Self::Deadline => "deadline",
            Self::OthersDeadlines => "others_deadlines",
            Self::ClientShare => "client_share",
        }
    }
}

impl RerankError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::TooLarge(message.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }

    pub fn refused(reason: Refusal, message: impl Into<String>) -> Self {
        Self::ResourceExhausted {
            reason,
            message: message.into(),
        }
    }

    /// The `outcome` label of `rerank_requests_total` for a call that failed with this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "invalid_argument",
            Self::TooLarge(_) => "too_large",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
            Self::ResourceExhausted { .. } => "resource_exhausted",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Aborted(_) => "aborted",
            Self::Cancelled(_) => "cancelled",
            Self::RequestTimeout(_) => "request_timeout",
        }
    }
}
