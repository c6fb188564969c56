//! The global cap on rerank calls in progress across the transports, and each client's share of it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Refusal, RerankError};
use crate::metrics::Metrics;
use crate::rerank::clients::{ClientId, ClientShares};

/// The global cap on rerank calls in progress (unary calls and streams, every transport), and each client's
/// share of it: past either a call is refused at once. A call takes its slot once its request has arrived.
#[derive(Clone)]
pub struct CallSlots {
    permits: Arc<Semaphore>,
    max_calls: usize,
    clients: Arc<ClientShares>,
    metrics: Arc<Metrics>,
}

/// A call's slot among max_concurrent_calls (and its client's share); it frees when the last clone is dropped.
#[derive(Clone)]
pub struct CallSlot(#[allow(dead_code)] Arc<Held>);

struct Held {
    _permit: OwnedSemaphorePermit,
    client: Option<(Arc<ClientShares>, ClientId)>,
    metrics: Arc<Metrics>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((shares, client)) = &self.client {
            shares.give_back(client, 1);
        }
        self.metrics.calls_in_progress.dec();
    }
}

impl CallSlots {
    pub fn new(max_calls: usize, client_share: f64, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            clients: Arc::new(ClientShares::new(max_calls, client_share)),
            metrics,
        }
    }

    /// A slot for a call of `client` (None: a caller the transport could not name, held to the global cap only).
    pub fn try_acquire(&self, client: Option<&ClientId>) -> Result<CallSlot, RerankError> {
        if let Some(client) = client {
            if let Err(held) = self.clients.take(client, 1) {
                self.metrics.record_refusal(Refusal::ClientShare);
                return Err(RerankError::refused(
                    Refusal::ClientShare,
                    format!(
                        "this client ({}) has {held} calls in progress, its share of max_concurrent_calls {} \
                         (max_client_share); retry later",
                        client.as_str(),
                        self.max_calls
                    ),
                ));
            }
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                self.metrics.calls_in_progress.inc();
                Ok(CallSlot(Arc::new(Held {
                    _permit: permit,
                    client: client.map(|client| (Arc::clone(&self.clients), client.clone())),
                    metrics: Arc::clone(&self.metrics),
                })))
            }
            Err(_) => {
                if let Some(client) = client {
                    self.clients.give_back(client, 1);
                }
                self.metrics.record_refusal(Refusal::Calls);
                Err(RerankError::refused(
                    Refusal::Calls,
                    format!(
                        "the server has {} calls in progress (max_concurrent_calls); retry later",
                        self.max_calls
                    ),
                ))
            }
        }
    }

    pub fn max_calls(&self) -> usize {
        self.max_calls
    }

    /// Calls one client may have in progress.
    pub fn per_client(&self) -> usize {
        self.clients.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_at_its_share_is_refused_while_another_takes_a_slot() {
        let slots = CallSlots::new(4, 0.5, Arc::new(Metrics::new()));
        let (a, b) = (ClientId::new("10.0.0.1"), ClientId::new("10.0.0.2"));
        let held: Vec<CallSlot> = (0..2)
            .map(|_| slots.try_acquire(Some(&a)).expect("within a's share"))
            .collect();
        let refused = slots.try_acquire(Some(&a)).err().expect("past a's share");
        assert!(
            matches!(
                &refused,
                RerankError::ResourceExhausted {
                    reason: Refusal::ClientShare,
                    ..
                }
            ),
            "{refused}"
        );
        let b_slots: Vec<CallSlot> = (0..2)
            .map(|_| slots.try_acquire(Some(&b)).expect("b is served"))
            .collect();
        assert!(matches!(
            slots.try_acquire(None),
            Err(RerankError::ResourceExhausted {
                reason: Refusal::Calls,
                ..
            })
        ));
        drop(held);
        slots.try_acquire(Some(&a)).expect("a's slots came back");
        drop(b_slots);
    }
}
