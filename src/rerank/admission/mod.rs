//! Global admission control: bounds the pairs, tokens and request bytes held across all calls and by each
//! client, and admits work only when the engine's measured speed lets every admitted call finish in time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::clients::{ClientId, ClientShares};
use crate::config::Config;
use crate::error::{Refusal, RerankError};
use crate::throughput::Throughput;

mod deadlines;

/// Identifies one call (a unary request or a stream) in the admission books.
pub type CallId = u64;

/// Expected engine time is multiplied by this before it is compared with deadlines: the speed estimate is
/// an average, and tokenization shares the machine with the engine.
const SAFETY: f64 = 1.15;

/// Limits of admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionLimits {
    pub max_pending_pairs: usize,
    pub max_pending_tokens: usize,
    pub max_inflight_bytes: usize,
    pub max_queue_time: Duration,
    /// How long new work may wait for batches already cut (the one the engine runs, and the next one when
    /// batches are cut ahead): they cannot be interrupted.
    pub batches_in_flight: Duration,
    /// The share of each count limit one client may hold.
    pub max_client_share: f64,
}

impl AdmissionLimits {
    /// The configured limits, with how long new work waits for the batches already cut on this device.
    pub fn from_config(config: &Config, batches_in_flight: Duration) -> Self {
        Self {
            max_pending_pairs: config.max_pending_pairs,
            max_pending_tokens: config.max_pending_tokens,
            max_inflight_bytes: config.max_inflight_bytes,
            max_queue_time: config.max_queue_time,
            batches_in_flight,
            max_client_share: config.max_client_share,
        }
    }
}

/// The work of one admitted call that the engine has not scored yet, and when it must be done by.
#[derive(Debug, Clone, Copy)]
struct CallLoad {
    /// Real tokens admitted and not yet scored.
    remaining: usize,
    /// The caller's deadline, if any.
    deadline: Option<Instant>,
    /// Admission time + own work + max_queue_time, from the latest admission of this call.
    queue_due: Instant,
}

impl CallLoad {
    fn due(&self) -> Instant {
        self.deadline
            .map_or(self.queue_due, |deadline| deadline.min(self.queue_due))
    }
}

/// Counts of work admitted and not yet released, against their limits.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    throughput: Arc<Throughput>,
    pairs: AtomicUsize,
    tokens: AtomicUsize,
    bytes: AtomicUsize,
    calls: Mutex<HashMap<CallId, CallLoad>>,
    /// Each client's pairs, tokens and bytes, against its share of max_pending_pairs, max_pending_tokens and
    /// max_inflight_bytes.
    client_pairs: ClientShares,
    client_tokens: ClientShares,
    client_bytes: ClientShares,
}

impl Admission {
    pub fn new(limits: AdmissionLimits, throughput: Arc<Throughput>) -> Self {
        let share = |total| ClientShares::new(total, limits.max_client_share);
        Self {
            client_pairs: share(limits.max_pending_pairs),
            client_tokens: share(limits.max_pending_tokens),
            client_bytes: share(limits.max_inflight_bytes),
            limits,
            throughput,
            pairs: AtomicUsize::new(0),
            tokens: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `amount` of `client`'s share of one limit (none to take without a client), then the global count
    /// through `global`; a refusal by either leaves both as they were.
    fn admit_shared(
        shares: &ClientShares,
        client: Option<&ClientId>,
        amount: usize,
        what: &str,
        global: impl FnOnce() -> Result<(), RerankError>,
    ) -> Result<(), RerankError> {
        if let Some(client) = client {
            shares.take(client, amount).map_err(|held| {
                RerankError::refused(
                    Refusal::ClientShare,
                    format!(
                        "this client ({}) holds {held} {what}, and {amount} more would pass its share of {} \
                         (max_client_share); retry later",
                        client.as_str(),
                        shares.limit()
                    ),
                )
            })?;
        }
        global().inspect_err(|_| {
            if let Some(client) = client {
                shares.give_back(client, amount);
            }
        })
    }

    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    pub fn throughput(&self) -> &Throughput {
        &self.throughput
    }

    /// Admits `pairs` more pairs of `client`, or refuses at once when that would pass max_pending_pairs or
    /// the client's share of it.
    pub fn admit_pairs(&self, client: Option<&ClientId>, pairs: usize) -> Result<(), RerankError> {
        Self::admit_shared(&self.client_pairs, client, pairs, "pending pairs", || {
            add_within(&self.pairs, pairs, self.limits.max_pending_pairs).map_err(|pending| {
                RerankError::refused(Refusal::Pairs, format!(
                    "the server is at capacity: {pending} pairs pending, {pairs} more would pass max_pending_pairs \
                     {}; retry later",
                    self.limits.max_pending_pairs
                ))
            })
        })
    }

    /// Holds `bytes` of request text (received, not yet tokenized, or kept to return), or refuses at once when
    /// that would pass max_inflight_bytes or the client's share of it.
    pub fn admit_bytes(&self, client: Option<&ClientId>, bytes: usize) -> Result<(), RerankError> {
        Self::admit_shared(
            &self.client_bytes,
            client,
            bytes,
            "bytes of requests",
            || {
                add_within(&self.bytes, bytes, self.limits.max_inflight_bytes).map_err(|held| {
                RerankError::refused(
                    Refusal::Bytes,
                    format!(
                        "the server is at capacity: {held} bytes of requests held, {bytes} more would pass \
                         max_inflight_bytes {}; retry later",
                        self.limits.max_inflight_bytes
                    ),
                )
            })
            },
        )
    }

    /// Holds `bytes` more without a limit check: copies of texts already admitted (their source is released
    /// soon after, and with top_n their number is bounded).
    pub fn hold_bytes(&self, client: Option<&ClientId>, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if let Some(client) = client {
            self.client_bytes.add(client, bytes);
        }
    }

    pub fn release_bytes(&self, client: Option<&ClientId>, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(client) = client {
            self.client_bytes.give_back(client, bytes);
        }
    }

    /// Admits `tokens` more tokens of `call`, or refuses at once when that would pass max_pending_tokens, when
    /// the call could not finish before its deadline or would wait longer than max_queue_time, or when it would
    /// make an admitted call miss its own. Finishing times are those of fair sharing (every call with work
    /// gets its turn, as the scheduler gives them) at the engine's measured speed.
    pub fn admit_tokens(
        &self,
        call: CallId,
        client: Option<&ClientId>,
        tokens: usize,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), RerankError> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let load = self.check_time(&calls, call, tokens, deadline, now)?;
        Self::admit_shared(
            &self.client_tokens,
            client,
            tokens,
            "pending tokens",
            || {
                add_within(&self.tokens, tokens, self.limits.max_pending_tokens).map_err(
                    |pending| {
                        RerankError::refused(
                            Refusal::Tokens,
                            format!(
                    "the server is at capacity: {pending} tokens pending, {tokens} more would pass \
                     max_pending_tokens {}; retry later",
                    self.limits.max_pending_tokens
                ),
                        )
                    },
                )
            },
        )?;
        calls.insert(call, load);
        Ok(())
    }

    /// Refuses before any tokenizer work when even `at_least_tokens` (a low estimate of the work) could not be
    /// admitted by time. Finishing times only grow with the work, so this never refuses what `admit_tokens`
    /// would admit, and under a flood of retries refusals stay cheap.
    pub fn precheck(
        &self,
        call: CallId,
        at_least_tokens: usize,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(), RerankError> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        self.check_time(&calls, call, at_least_tokens, deadline, now)
            .map(|_| ())
    }

    /// Returns scored (or dropped) work of `call`.
    pub fn release(&self, call: CallId, client: Option<&ClientId>, pairs: usize, tokens: usize) {
        self.pairs.fetch_sub(pairs, Ordering::AcqRel);
        self.tokens.fetch_sub(tokens, Ordering::AcqRel);
        if let Some(client) = client {
            self.client_pairs.give_back(client, pairs);
            self.client_tokens.give_back(client, tokens);
        }
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(load) = calls.get_mut(&call) {
            load.remaining = load.remaining.saturating_sub(tokens);
        }
    }

    /// Forgets a call that has ended.
    pub fn end_call(&self, call: CallId) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.remove(&call);
    }

    /// (pairs, tokens) admitted and not yet released.
    pub fn pending(&self) -> (usize, usize) {
        (
            self.pairs.load(Ordering::Acquire),
            self.tokens.load(Ordering::Acquire),
        )
    }

    /// Bytes of request text held.
    pub fn held_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// Adds `amount` if the sum stays within `limit`; else returns the current value. A single request larger
/// than the limit is still admitted when nothing else is pending, so it can never wait forever.
fn add_within(counter: &AtomicUsize, amount: usize, limit: usize) -> Result<(), usize> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current == 0 || current.saturating_add(amount) <= limit)
                .then_some(current.saturating_add(amount))
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::deadlines::FairShares;
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// An engine measured at 1,000 tokens per second.
    fn admission(max_queue_time: Duration) -> Admission {
        let limits = AdmissionLimits {
            max_pending_pairs: 10,
            max_pending_tokens: 100_000,
            max_inflight_bytes: 1000,
            max_queue_time,
            batches_in_flight: Duration::from_millis(250),
            max_client_share: 1.0,
        };
        Admission::new(limits, Arc::new(Throughput::new(1000, 1000, SECOND)))
    }

    #[test]
    fn refuses_past_the_count_limits_and_frees_on_release() {
        let admission = admission(100 * SECOND);
        let now = Instant::now();
        admission.admit_pairs(None, 6).expect("fits");
        let err = admission.admit_pairs(None, 5).expect_err("over");
        assert!(
            matches!(&err, RerankError::ResourceExhausted { message: m, .. } if m.contains("max_pending_pairs")),
            "{err}"
        );
        admission
            .admit_tokens(1, None, 90_000, None, now)
            .expect("fits");
        let err = admission
            .admit_tokens(2, None, 11_000, None, now)
            .expect_err("over");
        assert!(err.to_string().contains("max_pending_tokens"), "{err}");
        admission.release(1, None, 6, 90_000);
        assert_eq!(admission.pending(), (0, 0));
        admission
            .admit_pairs(None, 50)
            .expect("an oversized request is admitted alone");
        assert!(admission.admit_pairs(None, 1).is_err());
        admission.admit_bytes(None, 600).expect("fits");
        assert!(admission.admit_bytes(None, 500).is_err());
        admission.release_bytes(None, 600);
        assert_eq!(admission.held_bytes(), 0);
    }

    #[test]
    fn a_call_that_cannot_finish_before_its_deadline_is_refused_at_once() {
        let admission = admission(100 * SECOND);
        let now = Instant::now();
        // 5 s of work, deadline in 4 s.
        let err = admission
            .admit_tokens(1, None, 5000, Some(now + 4 * SECOND), now)
            .expect_err("cannot finish");
        assert!(
            matches!(&err, RerankError::ResourceExhausted { message: m, .. } if m.contains("deadline")),
            "{err}"
        );
        admission
            .admit_tokens(1, None, 3000, Some(now + 4 * SECOND), now)
            .expect("3.45 s of work fits in 4 s");
    }

    #[test]
    fn the_queue_is_bounded_by_time() {
        let admission = admission(10 * SECOND);
        let now = Instant::now();
        // Equal calls of 4 s each, no deadlines: under fair sharing the n-th waits (n - 1) x 4.6 s.
        for call in 1..=3 {
            admission
                .admit_tokens(call, None, 4000, None, now)
                .unwrap_or_else(|e| panic!("call {call}: {e}"));
        }
        let err = admission
            .admit_tokens(4, None, 4000, None, now)
            .expect_err("a fourth would wait about 14 s");
        assert!(err.to_string().contains("max_queue_time"), "{err}");
        // As work is scored the room comes back.
        admission.release(1, None, 0, 4000);
        admission.end_call(1);
        admission
            .admit_tokens(4, None, 4000, None, now)
            .expect("room again");
    }

    #[test]
    fn a_precheck_admits_nothing() {
        let admission = admission(10 * SECOND);
        let now = Instant::now();
        admission
            .admit_tokens(1, None, 6000, None, now)
            .expect("alone");
        assert!(admission
            .precheck(2, 1000, Some(now + 12 * SECOND), now)
            .is_ok());
        assert!(admission
            .precheck(2, 40_000, Some(now + 12 * SECOND), now)
            .is_err());
        assert_eq!(admission.pending(), (0, 6000));
    }

    #[test]
    fn a_busy_engine_finishes_its_batch_first() {
        let admission = admission(100 * SECOND);
        let now = Instant::now();
        // 100 tokens take 0.115 s: they fit a 0.2 s deadline on an idle engine, not behind a 0.25 s batch.
        admission
            .precheck(1, 100, Some(now + Duration::from_millis(200)), now)
            .expect("idle engine");
        admission.throughput().set_busy();
        assert!(admission
            .precheck(1, 100, Some(now + Duration::from_millis(200)), now)
            .is_err());
    }

    #[test]
    fn a_huge_max_queue_time_does_not_overflow() {
        let admission = admission(Duration::MAX);
        admission
            .admit_tokens(1, None, 1000, None, Instant::now())
            .expect("admitted");
    }

    #[test]
    fn new_work_may_not_make_an_admitted_call_late() {
        let admission = admission(100 * SECOND);
        let now = Instant::now();
        // A call of 2 s with a deadline in 3 s is admitted; a 2 s call without a deadline would share its turns
        // and finish both at 4.6 s, making the first one late.
        admission
            .admit_tokens(1, None, 2000, Some(now + 3 * SECOND), now)
            .expect("fits");
        let err = admission
            .admit_tokens(2, None, 2000, None, now)
            .expect_err("would make call 1 late");
        assert!(err.to_string().contains("miss their deadlines"), "{err}");
        // A small call shares little of call 1's turns and fits.
        admission
            .admit_tokens(3, None, 300, None, now)
            .expect("small");
    }

    #[test]
    fn a_client_past_its_share_is_refused_while_another_is_admitted() {
        let limits = AdmissionLimits {
            max_client_share: 0.5,
            ..*admission(100 * SECOND).limits()
        };
        let admission = Admission::new(limits, Arc::new(Throughput::new(1000, 1000, SECOND)));
        let (a, b) = (ClientId::new("a"), ClientId::new("b"));
        admission
            .admit_pairs(Some(&a), 4)
            .expect("within a's share of 10");
        let err = admission
            .admit_pairs(Some(&a), 2)
            .expect_err("past a's share");
        assert!(
            matches!(
                &err,
                RerankError::ResourceExhausted {
                    reason: Refusal::ClientShare,
                    ..
                }
            ),
            "{err}"
        );
        admission.admit_pairs(Some(&b), 5).expect("b has room");
        assert_eq!(admission.pending().0, 9, "the refusal left no count behind");
        admission.release(1, Some(&a), 4, 0);
        admission
            .admit_pairs(Some(&a), 1)
            .expect("a's room came back");
        admission
            .admit_bytes(Some(&a), 500)
            .expect("half the bytes");
        assert!(admission.admit_bytes(Some(&a), 1).is_err());
        admission.release_bytes(Some(&a), 500);
        admission.admit_bytes(Some(&a), 1).expect("room again");
    }

    #[test]
    fn fair_shares_sum_the_smaller_calls_and_cap_the_larger() {
        let shares = FairShares::new([5, 1, 10].into_iter());
        assert_eq!(shares.overlap(0), 0);
        assert_eq!(shares.overlap(4), 1 + 4 + 4);
        assert_eq!(shares.overlap(5), 1 + 5 + 5);
        assert_eq!(shares.overlap(100), 16);
    }
}
