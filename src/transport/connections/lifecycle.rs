//! A connection's own deadlines (its age, the grace after a close for age) and why it is closing, as steps
//! the connection's loop applies.

use std::time::{Duration, Instant};

use super::activity::Watchdog;
use super::{ConnectionLimits, Ended, Phase};

/// What `serve` does after one of its events.
pub(super) enum Step {
    Continue,
    /// Close gracefully (GOAWAY, or close after the current response).
    Close,
    End(Ended),
}

/// A connection's own deadlines and why it is closing, apart from the connection itself.
pub(super) struct Lifecycle {
    pub(super) age_due: Option<tokio::time::Instant>,
    /// After a close for age, when the connection is dropped whatever its calls.
    pub(super) force_due: Option<tokio::time::Instant>,
    age_grace: Duration,
    pub(super) closing: Option<Ended>,
}

impl Lifecycle {
    pub(super) fn new(limits: &ConnectionLimits) -> Self {
        Self {
            age_due: limits
                .max_connection_age
                .map(|age| tokio::time::Instant::now() + jittered(age)),
            force_due: None,
            age_grace: limits.age_grace,
            closing: None,
        }
    }

    fn close(&mut self, why: Ended) -> Step {
        if self.closing.is_some() {
            return Step::Continue;
        }
        self.closing = Some(why);
        Step::Close
    }

    pub(super) fn phase(&mut self, now: Phase) -> Step {
        match now {
            Phase::Open => Step::Continue,
            Phase::Closing => self.close(Ended::Drain),
            Phase::Closed => Step::End(Ended::Drain),
        }
    }

    pub(super) fn aged(&mut self) -> Step {
        self.age_due = None;
        let step = self.close(Ended::Age);
        if matches!(step, Step::Close) {
            self.force_due = Some(tokio::time::Instant::now() + self.age_grace);
        }
        step
    }

    /// The watchdog's timer ran; the state may have moved on meanwhile, so act on what is due now.
    pub(super) fn watchdog(&mut self, due: Option<(Instant, Watchdog)>) -> Step {
        match due {
            Some((due, Watchdog::HeaderTimeout)) if due <= Instant::now() => {
                Step::End(Ended::HeaderTimeout)
            }
            Some((due, Watchdog::Idle)) if due <= Instant::now() => self.close(Ended::Idle),
            _ => Step::Continue,
        }
    }
}

/// A deadline for `sleep_until` whose branch is disabled when there is none.
pub(super) fn at_or_far(due: Option<tokio::time::Instant>) -> tokio::time::Instant {
    due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365))
}

/// `age` moved by up to ±10%, so that connections opened together do not all close together.
fn jittered(age: Duration) -> Duration {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let fraction = (random % 10_000) as f64 / 10_000.0;
    age.mul_f64(0.9 + 0.2 * fraction)
}
