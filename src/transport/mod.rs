//! Network transports over the one rerank core. Each stays thin: decode, call `Reranker`, encode. gRPC and
//! HTTP share one listener and one router; every call gets a request id, a tracing span and its client here.

pub mod access;
pub mod call_slots;
pub mod connections;
pub mod grpc;
pub mod grpc_gate;
pub mod http;
pub mod tls;

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::config::IpRange;
use crate::rerank::clients::ClientId;
use connections::PeerAddr;

/// The header (gRPC metadata key) that carries a call's request id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Takes the client's `x-request-id` (up to 128 visible ASCII characters) or makes one, runs the call inside
/// a span that carries it (tokenize, queue and batch events of the call are logged within), and returns it
/// in the response headers (gRPC: initial metadata).
pub async fn with_request_id(mut request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| v.len() <= 128 && v.to_str().is_ok_and(|s| !s.is_empty()))
        .cloned();
    let id = given.unwrap_or_else(|| {
        HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    });
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let span = tracing::info_span!(
        "call",
        request_id = id.to_str().unwrap_or_default(),
        path = request.uri().path()
    );
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// Names the client of every request, gRPC and HTTP alike (a `ClientId` extension), for the per-client shares
/// of call slots and admission.
pub async fn with_client(
    State(trusted): State<Arc<[IpRange]>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .map(|peer| peer.0.ip());
    if let Some(client) = client_of(request.headers(), peer, &trusted) {
        request.extensions_mut().insert(client);
    }
    next.run(request).await
}

/// The peer's address; or, when the peer is a trusted proxy, the nearest address in `x-forwarded-for` that is
/// not a trusted proxy (the entries further left are whatever the client wrote, and are not believed).
pub fn client_of(
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    trusted: &[IpRange],
) -> Option<ClientId> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|range| range.contains(ip));
    let mut client = peer;
    if is_trusted(&peer) {
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect();
        for entry in entries.into_iter().rev() {
            let Some(ip) = forwarded_ip(entry) else { break };
            client = ip;
            if !is_trusted(&ip) {
                break;
            }
        }
    }
    Some(client.into())
}

/// One `x-forwarded-for` entry: an address, possibly with a port (`10.0.0.1:4242`, `[fd00::1]:4242`).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    entry
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                "x-forwarded-for",
                HeaderValue::from_str(value).expect("header"),
            );
        }
        headers
    }

    fn ip(text: &str) -> Option<IpAddr> {
        text.parse().ok()
    }

    #[test]
    fn only_a_trusted_proxy_may_name_the_client() {
        let trusted: Vec<IpRange> = vec![
            "10.77.0.254".parse().expect("ip"),
            "10.1.0.0/16".parse().expect("cidr"),
        ];
        let name = |h: &[&str], peer: &str| {
            client_of(&headers(h), ip(peer), &trusted).map(|c| c.as_str().to_string())
        };
        assert_eq!(
            name(&["1.2.3.4"], "192.0.2.9").as_deref(),
            Some("192.0.2.9"),
            "an untrusted peer is the client"
        );
        assert_eq!(
            name(&["1.2.3.4"], "10.77.0.254").as_deref(),
            Some("1.2.3.4")
        );
        assert_eq!(
            name(&["6.6.6.6, 1.2.3.4, 10.1.2.3"], "10.77.0.254").as_deref(),
            Some("1.2.3.4"),
            "the nearest untrusted entry; the client's own entries further left are not believed"
        );
        assert_eq!(
            name(&["6.6.6.6", "1.2.3.4:5000"], "10.77.0.254").as_deref(),
            Some("1.2.3.4"),
            "header lines in order"
        );
        assert_eq!(
            name(&["garbage, 1.2.3.4"], "10.77.0.254").as_deref(),
            Some("1.2.3.4")
        );
        assert_eq!(
            name(&["1.2.3.4, garbage"], "10.77.0.254").as_deref(),
            Some("10.77.0.254"),
            "an unreadable hop stops the walk"
        );
        assert_eq!(name(&[], "10.77.0.254").as_deref(), Some("10.77.0.254"));
        assert_eq!(
            name(&["[fd00::1]:443"], "10.77.0.254").as_deref(),
            Some("fd00::1")
        );
        assert_eq!(client_of(&headers(&[]), None, &trusted), None);
    }
}
