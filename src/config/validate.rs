//! The start-up check of a loaded configuration: values no server could run with are refused, naming the key.

use super::Config;
use crate::error::StartupError;

impl Config {
    /// Rejects values no server could run with, naming the key.
    pub fn validate(&self) -> Result<(), StartupError> {
        if let Some(key) = self.first_zero_limit() {
            return Err(StartupError::Config(format!(
                "{key} must be greater than 0"
            )));
        }
        if let Some(message) = self.first_inconsistency() {
            return Err(StartupError::Config(message.into()));
        }
        self.listen_addr().map(|_| ())
    }

    /// The first limit or time set to 0 where 0 would stop all work.
    fn first_zero_limit(&self) -> Option<&'static str> {
        let positive_times = [
            ("max_queue_time", self.max_queue_time),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("stream_idle_timeout", self.stream_idle_timeout),
            ("request_read_timeout", self.request_read_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ];
        let positive = [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_batch_size", self.max_batch_size),
            ("max_documents", self.max_documents),
            ("max_stream_documents", self.max_stream_documents),
            ("max_document_bytes", self.max_document_bytes),
            ("max_query_bytes", self.max_query_bytes),
            ("max_message_bytes", self.max_message_bytes),
            ("max_chunks_per_doc", self.max_chunks_per_doc),
            ("max_pending_pairs", self.max_pending_pairs),
            ("max_pending_tokens", self.max_pending_tokens),
            ("max_stream_pending_pairs", self.max_stream_pending_pairs),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            ("max_concurrent_calls", self.max_concurrent_calls),
            ("max_inflight_bytes", self.max_inflight_bytes),
            ("max_consecutive_failures", self.max_consecutive_failures),
            ("max_connections", self.max_connections),
            ("max_headers", self.max_headers),
            ("max_length", self.max_length.unwrap_or(1)),
        ];
        let time = positive_times.iter().find(|(_, value)| value.is_zero());
        let count = positive.iter().find(|(_, value)| *value == 0);
        time.map(|(key, _)| *key).or(count.map(|(key, _)| *key))
    }

    /// The first pair of settings that contradict each other, or a value out of its range.
    fn first_inconsistency(&self) -> Option<&'static str> {
        let empty_key = self
            .api_key
            .as_ref()
            .is_some_and(|key| key.expose().trim().is_empty());
        let rules = [
            (empty_key, "api_key must not be empty when set"),
            (
                self.tls_cert.is_some() != self.tls_key.is_some(),
                "tls_cert and tls_key must be set together",
            ),
            (
                !(self.max_client_share > 0.0 && self.max_client_share <= 1.0),
                "max_client_share must be greater than 0 and at most 1",
            ),
            // hyper reads an HTTP/1.1 head into a buffer of at least 8 KiB.
            (
                self.max_header_bytes < 8192,
                "max_header_bytes must be at least 8192",
            ),
            (
                self.health_port != 0 && self.health_port == self.port,
                "health_port must differ from port",
            ),
            (
                self.model_id.trim().is_empty(),
                "model_id must not be empty",
            ),
        ];
        rules
            .into_iter()
            .find(|(broken, _)| *broken)
            .map(|(_, message)| message)
    }
}
