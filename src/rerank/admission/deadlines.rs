//! Admission by time: whether a call's work, shared fairly with the work already admitted at the engine's
//! measured speed, finishes before its deadline and max_queue_time without making an admitted call late.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Admission, CallId, CallLoad, SAFETY};
use crate::error::{Refusal, RerankError};

impl Admission {
    /// The call's load with `tokens` more, if it can finish in time without making another call late.
    pub(super) fn check_time(
        &self,
        calls: &HashMap<CallId, CallLoad>,
        call: CallId,
        tokens: usize,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<CallLoad, RerankError> {
        let seconds_per_token = self.throughput.seconds_per_token() * SAFETY;
        let before = calls.get(&call).map_or(0, |load| load.remaining);
        let after = before + tokens;
        let own_time = secs(after as f64 * seconds_per_token);
        let load = CallLoad {
            remaining: after,
            deadline,
            queue_due: calls
                .get(&call)
                .map_or(now, |load| load.queue_due.max(now))
                .max(later(
                    now,
                    own_time.saturating_add(self.limits.max_queue_time),
                )),
        };
        // Work cut into batches already runs to the end of its batch before anything new starts.
        let start = if self.throughput.is_busy() {
            later(now, self.limits.batches_in_flight)
        } else {
            now
        };
        let others: Vec<(usize, Instant)> = calls
            .iter()
            .filter(|(id, load)| **id != call && load.remaining > 0)
            .map(|(_, load)| (load.remaining, load.due()))
            .collect();
        let shares = FairShares::new(others.iter().map(|(r, _)| *r));
        let finish = later(
            start,
            secs(seconds_per_token * (shares.overlap(after) + after) as f64),
        );
        if finish > load.due() {
            return Err(self.too_late(&load, finish, own_time, now));
        }
        // Each other call's finishing time grows by the part of this work that shares its turns.
        let harmed = others
            .iter()
            .filter(|(remaining, due)| {
                let grows = |own: usize| shares.overlap(*remaining) + own.min(*remaining);
                let finish_with =
                    |own: usize| later(start, secs(seconds_per_token * grows(own) as f64));
                finish_with(before) <= *due && finish_with(after) > *due
            })
            .count();
        if harmed > 0 {
            return Err(RerankError::refused(Refusal::OthersDeadlines, format!(
                "the server is at capacity: this work would make {harmed} admitted calls miss their deadlines \
                 (engine speed {:.0} tokens/s); retry later or at another replica",
                self.throughput.tokens_per_second()
            )));
        }
        Ok(load)
    }

    fn too_late(
        &self,
        load: &CallLoad,
        finish: Instant,
        own: Duration,
        now: Instant,
    ) -> RerankError {
        let wait = finish.saturating_duration_since(now).saturating_sub(own);
        let (reason, limit) = match load.deadline {
            Some(deadline) if deadline <= load.queue_due => (
                Refusal::Deadline,
                format!(
                    "its deadline in {:.1}s",
                    deadline.saturating_duration_since(now).as_secs_f64()
                ),
            ),
            _ => (
                Refusal::QueueTime,
                format!(
                    "max_queue_time {:.1}s",
                    self.limits.max_queue_time.as_secs_f64()
                ),
            ),
        };
        RerankError::refused(reason, format!(
            "the server is at capacity: expected wait {:.1}s and {:.1}s of computing (engine speed {:.0} \
             tokens/s) would pass {limit}; retry later or at another replica",
            wait.as_secs_f64(),
            own.as_secs_f64(),
            self.throughput.tokens_per_second()
        ))
    }
}

/// The remaining work of calls, sorted, to ask how much of it shares turns with a call of a given size.
pub(super) struct FairShares {
    sorted: Vec<usize>,
    prefix: Vec<usize>,
}

impl FairShares {
    pub(super) fn new(remaining: impl Iterator<Item = usize>) -> Self {
        let mut sorted: Vec<usize> = remaining.collect();
        sorted.sort_unstable();
        let prefix = sorted
            .iter()
            .scan(0usize, |sum, r| {
                *sum += r;
                Some(*sum)
            })
            .collect();
        Self { sorted, prefix }
    }

    /// Σ min(r, work) over the calls: the work of others done before a call of `work` tokens finishes when
    /// every call gets an equal share of the engine.
    pub(super) fn overlap(&self, work: usize) -> usize {
        let smaller = self.sorted.partition_point(|&r| r <= work);
        let below = if smaller == 0 {
            0
        } else {
            self.prefix[smaller - 1]
        };
        below + work * (self.sorted.len() - smaller)
    }
}

/// `now + duration`, saturating far in the future instead of overflowing (a huge max_queue_time).
fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .or_else(|| now.checked_add(Duration::from_secs(1 << 32)))
        .unwrap_or(now)
}

fn secs(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX)
}
