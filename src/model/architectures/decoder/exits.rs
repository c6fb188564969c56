//! Where a decoder's scores come from: its score rows (after the last layer, or one per layer for layerwise
//! rerankers), and the scores of a batch gathered layer by layer as its sequences exit.

use candle_core::{Result, Tensor};

use super::Decoder;
use crate::model::ops::Target;
use crate::model::prefix_cache::KeysValues;

/// The score rows: one after the last layer, or (layerwise rerankers) one per layer from `first` on.
pub(super) enum Heads {
    /// [1, hidden], fp32.
    Last(Tensor),
    /// Row i scores the output of layer first + i (1-based); `default` when a sequence names no layer.
    PerLayer {
        first: usize,
        rows: Vec<Tensor>,
        default: usize,
    },
}

/// The keys and values of the first `capture` tokens, copied out unless they are all of them (so the batch's
/// tensors are freed layer by layer).
pub(super) fn leading(k: Tensor, v: Tensor, capture: usize) -> Result<KeysValues> {
    Ok(match capture < k.dim(0)? {
        true => (
            k.narrow(0, 0, capture)?.copy()?,
            v.narrow(0, 0, capture)?.copy()?,
        ),
        false => (k, v),
    })
}

/// Scores gathered layer by layer: which sequences each piece holds, in order.
pub(super) struct ExitScores {
    pub(super) sequences: Vec<usize>,
    pub(super) pieces: Vec<Tensor>,
}

impl ExitScores {
    /// Scores the sequences whose exit is `layer`; `rows[i]` is sequence i's last row in `x`.
    pub(super) fn take(
        &mut self,
        decoder: &Decoder,
        x: &Tensor,
        exits: &[usize],
        layer: usize,
        rows: &[u32],
    ) -> Result<()> {
        let leaving: Vec<usize> = (0..exits.len()).filter(|&i| exits[i] == layer).collect();
        if leaving.is_empty() {
            return Ok(());
        }
        let picked: Vec<u32> = leaving.iter().map(|&i| rows[i]).collect();
        self.pieces.push(decoder.exit_scores(x, &picked, layer)?);
        self.sequences.extend(leaving);
        Ok(())
    }

    /// [sequences, 1] in the batch's order.
    pub(super) fn in_batch_order(self, size: usize, target: &Target) -> Result<Tensor> {
        let scores = Tensor::cat(&self.pieces, 0)?;
        let mut place = vec![0u32; size];
        for (position, &sequence) in self.sequences.iter().enumerate() {
            place[sequence] = position as u32;
        }
        scores
            .index_select(&target.ids(&place)?, 0)?
            .reshape((size, 1))
    }
}
