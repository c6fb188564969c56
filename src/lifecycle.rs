//! The server's lifecycle — loading, serving, draining, stopped or failed — in one place that health, the
//! transports and shutdown all read.

use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

use crate::error::RerankError;
use crate::metrics::Metrics;
use crate::rerank::Reranker;

/// Where the server is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Listening; the model is loading and warming up.
    Loading,
    /// The model is ready and calls are taken.
    Serving,
    /// Shutting down: health is NOT_SERVING so that balancers and clients go elsewhere, while calls that still
    /// arrive are taken and those in flight finish.
    Draining,
    /// The drain is over: new calls are refused and those still running end with UNAVAILABLE.
    Stopped,
    /// The model failed to load or the engine stopped; the reason says which.
    Failed(String),
}

/// The lifecycle state and, once loaded, the reranker it serves.
pub struct Lifecycle {
    state: watch::Sender<State>,
    reranker: OnceLock<Reranker>,
    metrics: Arc<Metrics>,
}

impl Lifecycle {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            state: watch::Sender::new(State::Loading),
            reranker: OnceLock::new(),
            metrics,
        })
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Every change of state, current one first.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Loading → Serving with the loaded reranker. Ignored once draining or failed.
    pub fn serve(&self, reranker: Reranker) {
        let _ = self.reranker.set(reranker);
        self.move_to(State::Serving, |state| *state == State::Loading);
    }

    /// Any state but Draining or Stopped → Failed; a failure while shutting down does not matter any more.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.move_to(State::Failed(reason), |state| {
            !matches!(state, State::Draining | State::Stopped)
        });
    }

    /// → Draining, from any state but Stopped.
    pub fn drain(&self) {
        self.move_to(State::Draining, |state| *state != State::Stopped);
    }

    /// → Stopped: new calls are refused, and calls still in flight end with UNAVAILABLE.
    pub fn stop(&self) {
        self.move_to(State::Stopped, |_| true);
        if let Some(reranker) = self.reranker.get() {
            reranker.stop_calls();
        }
    }

    fn move_to(&self, next: State, allowed: impl Fn(&State) -> bool) {
        let serving = next == State::Serving;
        let moved = self.state.send_if_modified(|state| {
            if allowed(state) && *state != next {
                *state = next;
                true
            } else {
                false
            }
        });
        if moved {
            self.metrics.serving.set(i64::from(serving));
        }
    }

    /// The reranker while serving or draining; otherwise UNAVAILABLE, saying why.
    pub fn reranker(&self) -> Result<&Reranker, RerankError> {
        let unavailable = |why: &str| Err(RerankError::Unavailable(why.into()));
        match &*self.state.borrow() {
            State::Serving | State::Draining => {}
            State::Loading => return unavailable("the model is still loading"),
            State::Stopped => return unavailable(crate::rerank::SHUTTING_DOWN),
            State::Failed(reason) => {
                return Err(RerankError::Unavailable(format!(
                    "the server cannot score: {reason}; retry at another replica"
                )))
            }
        }
        self.reranker
            .get()
            .ok_or_else(|| RerankError::Unavailable("the model is still loading".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_is_final_and_failures_while_shutting_down_are_ignored() {
        let lifecycle = Lifecycle::new(Arc::new(Metrics::new()));
        assert_eq!(lifecycle.state(), State::Loading);
        assert!(lifecycle.reranker().is_err());
        lifecycle.drain();
        lifecycle.fail("engine stopped");
        assert_eq!(lifecycle.state(), State::Draining);
        assert!(
            matches!(lifecycle.reranker(), Err(RerankError::Unavailable(m)) if m.contains("loading")),
            "draining before the model loaded still has no model"
        );
        lifecycle.stop();
        lifecycle.drain();
        lifecycle.fail("engine stopped");
        assert_eq!(lifecycle.state(), State::Stopped);
        assert!(
            matches!(lifecycle.reranker(), Err(RerankError::Unavailable(m)) if m.contains("shutting down"))
        );
        assert_eq!(lifecycle.metrics().serving.get(), 0);
    }
}
