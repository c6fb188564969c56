//! Who is calling, and each client's share of a budget the server shares between all calls (call slots,
//! pending pairs, tokens, request bytes): no single client may hold more than its share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A client as the transports identify it (its address, or the one a trusted proxy names).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId(Arc<str>);

impl ClientId {
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<std::net::IpAddr> for ClientId {
    fn from(ip: std::net::IpAddr) -> Self {
        Self::new(ip.to_string())
    }
}

/// What each client holds of one budget, against `share` of its total. A share of 1 or more keeps no books:
/// the budget's own limit is the client's.
#[derive(Debug)]
pub struct ClientShares {
    /// The most one client may hold: the share of the budget, at least 1.
    limit: usize,
    whole: bool,
    held: Mutex<HashMap<ClientId, usize>>,
}

impl ClientShares {
    pub fn new(total: usize, share: f64) -> Self {
        let limit = (total as f64 * share).ceil();
        Self {
            limit: if limit >= 1.0 { limit as usize } else { 1 },
            whole: share >= 1.0,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `amount` for `client`, unless that would pass its share. A client that holds nothing may take
    /// any amount (the budget's own limit decides), so one large request is never refused for its size alone.
    pub fn take(&self, client: &ClientId, amount: usize) -> Result<(), usize> {
        if self.whole {
            return Ok(());
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let current = held.get(client).copied().unwrap_or(0);
        if current > 0 && current.saturating_add(amount) > self.limit {
            return Err(current);
        }
        if amount > 0 {
            held.insert(client.clone(), current.saturating_add(amount));
        }
        Ok(())
    }

    /// Adds `amount` without a check: copies of what the client was already admitted for.
    pub fn add(&self, client: &ClientId, amount: usize) {
        if amount == 0 || self.whole {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        *held.entry(client.clone()).or_insert(0) += amount;
    }

    pub fn give_back(&self, client: &ClientId, amount: usize) {
        if amount == 0 || self.whole {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = held.get_mut(client) {
            *current = current.saturating_sub(amount);
            if *current == 0 {
                held.remove(client);
            }
        }
    }

    /// What `client` holds now.
    pub fn held(&self, client: &ClientId) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(client).copied().unwrap_or(0)
    }

    /// Clients holding anything (the books forget a client once it holds nothing).
    pub fn clients(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_held_to_its_share_and_others_are_not() {
        let shares = ClientShares::new(10, 0.5);
        let (a, b) = (ClientId::new("a"), ClientId::new("b"));
        assert_eq!(shares.limit(), 5);
        for _ in 0..5 {
            shares.take(&a, 1).expect("within a's share");
        }
        assert_eq!(shares.take(&a, 1), Err(5), "past a's share");
        shares.take(&b, 3).expect("b has its own share");
        shares.give_back(&a, 1);
        shares.take(&a, 1).expect("room again");
        shares.give_back(&a, 5);
        shares.give_back(&b, 3);
        assert_eq!(shares.clients(), 0, "clients holding nothing are forgotten");
    }

    #[test]
    fn a_client_holding_nothing_may_take_more_than_its_share_once() {
        let shares = ClientShares::new(10, 0.5);
        let a = ClientId::new("a");
        shares
            .take(&a, 8)
            .expect("alone, a large request is not refused for its size");
        assert!(shares.take(&a, 1).is_err());
        assert_eq!(shares.held(&a), 8);
    }

    #[test]
    fn the_limit_is_at_least_one_and_a_whole_share_keeps_no_books() {
        assert_eq!(ClientShares::new(1, 0.01).limit(), 1);
        let whole = ClientShares::new(512, 1.0);
        let a = ClientId::new("a");
        whole.take(&a, 400).expect("taken");
        whole.take(&a, 400).expect("the budget's own limit decides");
        assert_eq!(whole.clients(), 0);
    }
}
