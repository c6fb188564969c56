//! The engines' measured speed (smoothed seconds per token) and whether one of them can take a batch:
//! written by the engines, read by admission (expected waits) and the scheduler (batch sizes and when to cut).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// How quickly old measurements fade: a measurement weighs 1 - exp(-batch time / this).
const SMOOTHING: Duration = Duration::from_secs(2);

/// Speed of one engine, as exponentially smoothed seconds per token; how many engines run; and the batches
/// handed to them and not yet done.
#[derive(Debug)]
pub struct Throughput {
    /// f64 bits: one engine's seconds per real token (what a request's queued work is measured in).
    seconds_per_token: AtomicU64,
    /// f64 bits: seconds per unit of batch cost (what a batch's size is measured in; see `BatchShape`).
    seconds_per_cost: AtomicU64,
    /// Engines taking batches (devices of the same kind, of about the same speed).
    engines: AtomicUsize,
    /// Batches handed out (waiting for an engine or computing) and not yet done.
    batches: AtomicUsize,
    idle: Notify,
}

impl Throughput {
    /// Starts from a first measurement (the warm-up batch): `tokens` real tokens of batch cost `cost`
    /// computed in `elapsed`.
    pub fn new(tokens: usize, cost: usize, elapsed: Duration) -> Self {
        let rate = per_token(elapsed, tokens);
        Self {
            seconds_per_token: AtomicU64::new(rate.to_bits()),
            seconds_per_cost: AtomicU64::new(per_token(elapsed, cost).to_bits()),
            engines: AtomicUsize::new(1),
            batches: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Folds in one batch: `real` tokens of batch cost `cost` computed in `elapsed`.
    pub fn record(&self, real: usize, cost: usize, elapsed: Duration) {
        if real == 0 || elapsed.is_zero() {
            return;
        }
        let weight = 1.0 - (-elapsed.as_secs_f64() / SMOOTHING.as_secs_f64()).exp();
        blend(&self.seconds_per_token, per_token(elapsed, real), weight);
        blend(&self.seconds_per_cost, per_token(elapsed, cost), weight);
    }

    /// Seconds per real token of all engines together.
    pub fn seconds_per_token(&self) -> f64 {
        f64::from_bits(self.seconds_per_token.load(Ordering::Relaxed))
            / self.engines().max(1) as f64
    }

    /// Engines taking batches.
    pub fn engines(&self) -> usize {
        self.engines.load(Ordering::Acquire)
    }

    /// Sets how many engines take batches (at start).
    pub fn set_engines(&self, engines: usize) {
        self.engines.store(engines, Ordering::Release);
        self.idle.notify_waiters();
    }

    /// An engine stopped for good: the others carry on with the work.
    pub fn engine_stopped(&self) {
        let _ = self
            .engines
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.idle.notify_waiters();
    }

    /// Real tokens per second of all engines together.
    pub fn tokens_per_second(&self) -> f64 {
        1.0 / self.seconds_per_token()
    }

    /// Expected time for `tokens` real tokens on all engines.
    pub fn time_for(&self, tokens: usize) -> Duration {
        Duration::try_from_secs_f64(tokens as f64 * self.seconds_per_token())
            .unwrap_or(Duration::MAX)
    }

    /// Batch cost one engine computes in `duration` (at least 1).
    pub fn cost_in(&self, duration: Duration) -> usize {
        let per = f64::from_bits(self.seconds_per_cost.load(Ordering::Relaxed));
        ((duration.as_secs_f64() / per) as usize).max(1)
    }

    /// The scheduler hands a batch to the engines.
    pub fn set_busy(&self) {
        self.batches.fetch_add(1, Ordering::AcqRel);
    }

    /// An engine finished a batch.
    pub fn set_idle(&self) {
        let _ = self
            .batches
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.idle.notify_waiters();
    }

    /// Whether every engine has a batch (computing, or waiting for it).
    pub fn is_busy(&self) -> bool {
        self.batches.load(Ordering::Acquire) >= self.engines().max(1)
    }

    /// Resolves once an engine could take a batch now.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_busy() {
                return;
            }
            notified.await;
        }
    }
}

fn per_token(elapsed: Duration, tokens: usize) -> f64 {
    // A floor keeps a degenerate measurement (an empty or instant batch) from promising infinite speed.
    (elapsed.as_secs_f64() / tokens.max(1) as f64).max(1e-12)
}

fn blend(cell: &AtomicU64, sample: f64, weight: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        let old = f64::from_bits(bits);
        Some((old + weight * (sample - old)).to_bits())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_measured_speed_and_sizes_batches_by_time() {
        let speed = Throughput::new(1000, 1000, Duration::from_secs(1));
        assert_eq!(speed.cost_in(Duration::from_millis(250)), 250);
        // The engine turns out four times faster: after some seconds of batches the estimate follows.
        for _ in 0..100 {
            speed.record(1000, 1000, Duration::from_millis(250));
        }
        assert!(
            (speed.tokens_per_second() - 4000.0).abs() < 40.0,
            "{}",
            speed.tokens_per_second()
        );
        assert_eq!(speed.time_for(4000).as_millis(), 1000);
        // Padding costs time: a batch with half its tokens padding computes half as many real tokens per second.
        for _ in 0..100 {
            speed.record(500, 1000, Duration::from_millis(250));
        }
        assert!((speed.tokens_per_second() - 2000.0).abs() < 20.0);
        assert!((speed.cost_in(Duration::from_secs(1)) as f64 - 4000.0).abs() < 40.0);
    }

    #[tokio::test]
    async fn idle_resolves_only_once_the_engine_is_idle() {
        let speed = std::sync::Arc::new(Throughput::new(1, 1, Duration::from_millis(1)));
        speed.idle().await;
        speed.set_busy();
        let waiter = tokio::spawn({
            let speed = std::sync::Arc::clone(&speed);
            async move { speed.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        speed.set_idle();
        waiter.await.expect("waiter");
    }

    #[test]
    fn two_engines_are_busy_with_two_batches_and_twice_as_fast_together() {
        let speed = Throughput::new(1000, 1000, Duration::from_secs(1));
        speed.set_engines(2);
        assert!((speed.tokens_per_second() - 2000.0).abs() < 1e-6);
        assert_eq!(
            speed.cost_in(Duration::from_secs(1)),
            1000,
            "a batch is one engine's"
        );
        speed.set_busy();
        assert!(!speed.is_busy(), "one engine is still free");
        speed.set_busy();
        assert!(speed.is_busy());
        speed.set_idle();
        assert!(!speed.is_busy());
        speed.engine_stopped();
        assert!(speed.is_busy(), "one engine left, and it has a batch");
        assert!((speed.tokens_per_second() - 1000.0).abs() < 1e-6);
    }
}
