//! rerank-server: a gRPC and HTTP inference server for cross-encoder rerankers.
//!
//! The path of a request: `transport` (gRPC, HTTP) → `rerank` (the session) → `tokenization` → `scheduler`
//! (length-bucketed batches, handed over as `batch`es) → `engine` (the device worker) → `model` (one file
//! per architecture) → back through `rerank` (ranking).

pub mod assembly;
pub mod batch;
pub mod config;
pub mod engine;
pub mod error;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod rerank;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod throughput;
pub mod tokenization;
pub mod transport;

/// Generated `rerank.v1` messages, client and server.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("rerank.v1");

    /// The encoded descriptors of rerank.v1, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rerank_descriptor");
}
