//! Global admission control: bounds the pairs and tokens admitted but not yet scored, across all requests.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::RerankError;

/// Counts of work admitted and not yet released, against their limits.
#[derive(Debug)]
pub struct Admission {
    max_pairs: usize,
    max_tokens: usize,
    pairs: AtomicUsize,
    tokens: AtomicUsize,
}

impl Admission {
    pub fn new(max_pairs: usize, max_tokens: usize) -> Self {
        Self {
            max_pairs,
            max_tokens,
            pairs: AtomicUsize::new(0),
            tokens: AtomicUsize::new(0),
        }
    }

    /// Admits `pairs` more pairs, or refuses at once when that would pass max_pending_pairs.
    pub fn admit_pairs(&self, pairs: usize) -> Result<(), RerankError> {
        add_within(&self.pairs, pairs, self.max_pairs).map_err(|pending| {
            RerankError::ResourceExhausted(format!(
                "the server is at capacity: {pending} pairs pending, {pairs} more would pass max_pending_pairs {}; \
                 retry later",
                self.max_pairs
            ))
        })
    }

    /// Admits `tokens` more tokens, or refuses at once when that would pass max_pending_tokens.
    pub fn admit_tokens(&self, tokens: usize) -> Result<(), RerankError> {
        add_within(&self.tokens, tokens, self.max_tokens).map_err(|pending| {
            RerankError::ResourceExhausted(format!(
                "the server is at capacity: {pending} tokens pending, {tokens} more would pass max_pending_tokens \
                 {}; retry later",
                self.max_tokens
            ))
        })
    }

    /// Whether `pairs` more pairs would be admitted now (a hint: another request may take the room first).
    pub fn has_room_for(&self, pairs: usize) -> bool {
        let pending = self.pairs.load(Ordering::Acquire);
        pending == 0 || pending + pairs <= self.max_pairs
    }

    pub fn release(&self, pairs: usize, tokens: usize) {
        self.pairs.fetch_sub(pairs, Ordering::AcqRel);
        self.tokens.fetch_sub(tokens, Ordering::AcqRel);
    }

    /// (pairs, tokens) admitted and not yet released.
    pub fn pending(&self) -> (usize, usize) {
        (
            self.pairs.load(Ordering::Acquire),
            self.tokens.load(Ordering::Acquire),
        )
    }
}

/// Adds `amount` if the sum stays within `limit`; else returns the current value. A single request larger
/// than the limit is still admitted when nothing else is pending, so it can never wait forever.
fn add_within(counter: &AtomicUsize, amount: usize, limit: usize) -> Result<(), usize> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current == 0 || current + amount <= limit).then_some(current + amount)
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limits_and_frees_on_release() {
        let admission = Admission::new(10, 100);
        admission.admit_pairs(6).expect("fits");
        let err = admission.admit_pairs(5).expect_err("over");
        assert!(
            matches!(&err, RerankError::ResourceExhausted(m) if m.contains("max_pending_pairs")),
            "{err}"
        );
        admission.admit_tokens(90).expect("fits");
        assert!(admission.admit_tokens(11).is_err());
        admission.release(6, 90);
        assert_eq!(admission.pending(), (0, 0));
        admission
            .admit_pairs(50)
            .expect("an oversized request is admitted alone");
        assert!(admission.admit_pairs(1).is_err());
    }
}
