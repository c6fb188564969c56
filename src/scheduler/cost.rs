//! What a batch costs: the batching limits, how the device lays out a batch (padded or packed), and a batch
//! being filled within its budget.

use std::time::Duration;

use crate::batch::Pair;
use crate::config::Config;
use crate::model::PackedBatch;

/// Limits that decide when a batch is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// The cost a batch may reach, in tokens as its `BatchShape` counts them (padded: pairs × longest pair;
    /// packed: real tokens plus the attention term); a single larger pair runs alone.
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    /// A bucket that is not full is cut once its oldest pair has waited this long.
    pub max_wait: Duration,
}

impl From<&Config> for BatchPolicy {
    fn from(config: &Config) -> Self {
        Self {
            max_batch_tokens: config.max_batch_tokens,
            max_batch_size: config.max_batch_size,
            max_wait: config.max_wait,
        }
    }
}

/// How the device lays out a batch, which decides what a batch costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchShape {
    /// Every sequence padded to the longest one: a batch costs pairs × longest pair tokens.
    Padded,
    /// Real tokens only: a pair of n tokens costs n + n²/attention_span, since its dense layers grow with n
    /// and its attention with n². For an encoder, attention_span = 2·hidden + intermediate (the ratio of a
    /// token's dense FLOPs to its attention FLOPs per key).
    Packed { attention_span: usize },
}

impl BatchShape {
    /// The cost of one pair of `len` tokens on its own.
    pub fn pair_cost(self, len: usize) -> usize {
        match self {
            Self::Padded => len,
            Self::Packed { attention_span } => len + len * len / attention_span.max(1),
        }
    }

    /// Tokens the device computes for this batch (padding included).
    pub fn device_tokens(self, inputs: &PackedBatch) -> usize {
        match self {
            Self::Padded => inputs.padded_tokens(),
            Self::Packed { .. } => inputs.real_tokens(),
        }
    }

    /// The batch's cost in the budget's units.
    pub fn batch_cost(self, inputs: &PackedBatch) -> usize {
        match self {
            Self::Padded => inputs.padded_tokens(),
            Self::Packed { .. } => inputs.lengths().map(|len| self.pair_cost(len)).sum(),
        }
    }
}

/// A batch being filled: its pairs, the longest pair, the real tokens and the packed cost so far.
#[derive(Debug)]
pub(super) struct Fill {
    shape: BatchShape,
    pub(super) pairs: Vec<Pair>,
    padded_len: usize,
    real_tokens: usize,
    packed_cost: usize,
}

impl Fill {
    pub(super) fn new(shape: BatchShape) -> Self {
        Self {
            shape,
            pairs: Vec::new(),
            padded_len: 0,
            real_tokens: 0,
            packed_cost: 0,
        }
    }

    /// The batch's cost with `rows` rows, the longest `longest` tokens, and `extra` more packed cost.
    fn cost_with(&self, rows: usize, longest: usize, extra: usize) -> usize {
        match self.shape {
            BatchShape::Padded => rows * longest,
            BatchShape::Packed { .. } => self.packed_cost + extra,
        }
    }

    /// Whether a pair of `len` tokens fits the budget (a first pair always does: a larger one runs alone) and,
    /// when padded, keeps the padding ratio within `max_padding`.
    pub(super) fn accepts(
        &self,
        len: usize,
        policy: &BatchPolicy,
        max_padding: Option<f64>,
    ) -> bool {
        if self.pairs.is_empty() {
            return true;
        }
        let rows = self.pairs.len() + 1;
        let longest = self.padded_len.max(len);
        let cost = self.cost_with(rows, longest, self.shape.pair_cost(len));
        let within_budget = rows <= policy.max_batch_size && cost <= policy.max_batch_tokens;
        let within_padding = self.shape != BatchShape::Padded
            || max_padding.is_none_or(|limit| {
                (rows * longest) as f64 <= limit * (self.real_tokens + len) as f64
            });
        within_budget && within_padding
    }

    /// Whether any further pair could fit the size budget.
    pub(super) fn has_room(&self, policy: &BatchPolicy) -> bool {
        self.pairs.len() < policy.max_batch_size
            && self.cost_with(self.pairs.len() + 1, self.padded_len, 1) <= policy.max_batch_tokens
    }

    pub(super) fn push(&mut self, pair: Pair) {
        self.padded_len = self.padded_len.max(pair.len());
        self.real_tokens += pair.len();
        self.packed_cost += self.shape.pair_cost(pair.len());
        self.pairs.push(pair);
    }
}
