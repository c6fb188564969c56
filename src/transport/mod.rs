//! Network transports over the one rerank path. Each stays thin: decode, call `Reranker`, encode.

pub mod call_limit;
pub mod grpc;
