//! Row kernels of the rotary encoders on packed f32 activations: rotary positions applied to the Q and K parts of
//! a fused QKV projection, and the gated activation of a GLU projection, each in one pass per row.

use rayon::prelude::*;

use super::vector;
use crate::model::ops::FeedForwardActivation;

/// Rotates the Q and K blocks of each row of `qkv` ([tokens, 3·hidden], heads of `head_dim` in Q | K | V order)
/// in place by the row's angles: cos and sin are [tokens, head_dim/2]. Rotate-half form: the pair (x_i,
/// x_{i+d/2}) becomes (x_i·cos − x_{i+d/2}·sin, x_{i+d/2}·cos + x_i·sin).
pub fn rotate_qk(qkv: &mut [f32], hidden: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let width = 3 * hidden;
    qkv.par_chunks_mut(width)
        .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
        .for_each(|(row, (cos, sin))| {
            for head in row[..2 * hidden].chunks_exact_mut(head_dim) {
                let (first, second) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (first[i], second[i]);
                    first[i] = a * cos[i] - b * sin[i];
                    second[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}

/// act(activated half) · other half for each row of x [rows, 2·n]: the GLU's product, [rows, n].
pub fn gated_activation(
    x: &[f32],
    n: usize,
    activated_first: bool,
    activation: FeedForwardActivation,
) -> Vec<f32> {
    let rows = x.len() / (2 * n).max(1);
    let mut out = vec![0f32; rows * n];
    let zeros = vec![0f32; n];
    let rows_per_task = (super::VALUES_PER_TASK / n.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * n)
        .zip(x.par_chunks(rows_per_task * 2 * n))
        .for_each(|(out, x)| {
            for (o, row) in out.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
                let (first, second) = row.split_at(n);
                let (activated, other) = if activated_first {
                    (first, second)
                } else {
                    (second, first)
                };
                o.copy_from_slice(activated);
                vector::bias_activation(o, &zeros, activation);
                for (o, g) in o.iter_mut().zip(other) {
                    *o *= g;
                }
            }
        });
    out
}
