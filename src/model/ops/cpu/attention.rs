//! Multi-head self-attention over packed sequences on the CPU: per (sequence, head), S = scale·Q·Kᵀ and O = P·V
//! through the GEMM library, reading Q, K and V in place from the fused projection, with a vectorised softmax
//! in between. Only real tokens are ever computed: each sequence attends over its own keys.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{vector, SharedOut};

/// Where the fused projection's rows and the output live, and the shapes that index them.
#[derive(Clone, Copy)]
pub struct AttentionShape<'a> {
    /// Offsets of the sequences in the packed tokens: sequence i is rows cu_seqlens[i]..cu_seqlens[i + 1].
    pub cu_seqlens: &'a [usize],
    pub hidden: usize,
    pub heads: usize,
    /// Only each sequence's first query row (the [CLS]/`<s>` token), as the last layer needs.
    pub first_only: bool,
}

thread_local! {
    /// Score matrix of the task running on this thread, reused across tasks and batches.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// qkv: [tokens, 3·hidden] with biases added (Q | K | V, `heads` heads each). out: [tokens, hidden], or
/// [sequences, hidden] when `first_only`.
pub fn attention(
    qkv: &[f32],
    shape: AttentionShape<'_>,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let AttentionShape {
        cu_seqlens,
        hidden,
        heads,
        first_only,
    } = shape;
    let sequences = cu_seqlens.len().saturating_sub(1);
    let tokens = cu_seqlens.last().copied().unwrap_or(0);
    let out_rows = if first_only { sequences } else { tokens };
    if heads == 0
        || !hidden.is_multiple_of(heads)
        || qkv.len() != tokens * 3 * hidden
        || out.len() != out_rows * hidden
        || cu_seqlens.windows(2).any(|w| w[0] > w[1])
    {
        candle_core::bail!(
            "attention shapes disagree: {} projection values and {} output values for {tokens} tokens in \
             {sequences} sequences, hidden {hidden}, {heads} heads",
            qkv.len(),
            out.len()
        );
    }
    // Each task writes only its own (sequence, head) block: distinct rows or distinct head columns.
    let shared = SharedOut(out.as_mut_ptr());
    (0..sequences * heads).into_par_iter().for_each(|task| {
        let (seq, head) = (task / heads, task % heads);
        let (start, end) = (cu_seqlens[seq], cu_seqlens[seq + 1]);
        let out_row = if first_only { seq } else { start };
        let rows = &qkv[start * 3 * hidden..end * 3 * hidden];
        // The block starting at (out_row, head) spans q_rows rows of this sequence and this head's head_dim
        // columns: no other task writes it, and it lies inside `out` (sizes checked above).
        let dst = shared.at(out_row * hidden);
        one_head(rows, end - start, head, shape, dst);
    });
    Ok(())
}

/// One (sequence, head): `rows` are the sequence's `len` rows of the fused projection; writes the head's context
/// columns of the sequence's output rows starting at `dst` (row stride `hidden`).
fn one_head(rows: &[f32], len: usize, head: usize, shape: AttentionShape<'_>, dst: *mut f32) {
    if len == 0 {
        return;
    }
    let hidden = shape.hidden;
    let head_dim = hidden / shape.heads;
    let q_rows = if shape.first_only { 1 } else { len };
    let row_stride = (3 * hidden) as isize;
    let column = head * head_dim;
    let (q, k, v) = (
        rows[column..].as_ptr(),
        rows[hidden + column..].as_ptr(),
        rows[2 * hidden + column..].as_ptr(),
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    SCORES.with_borrow_mut(|buffer| {
        // Grown, never cleared: the GEMM overwrites the scores without reading them.
        let needed = q_rows * len + q_rows;
        if buffer.len() < needed {
            buffer.resize(needed, 0.0);
        }
        let (scores, sums) = buffer[..needed].split_at_mut(q_rows * len);
        // SAFETY: every pointer and stride addresses elements inside `rows` (len rows of 3·hidden, the head's
        // head_dim columns of Q, K or V) or inside `scores` ([q_rows, len] row-major).
        unsafe {
            gemm::gemm(
                q_rows,
                len,
                head_dim,
                scores.as_mut_ptr(),
                1,
                len as isize,
                false,
                q,
                1,
                row_stride,
                k,
                row_stride,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        vector::softmax_numerators(scores, len, sums);
        // SAFETY: P is [q_rows, len] in `scores`, V is len rows of `rows` at row_stride, and dst has q_rows
        // rows of head_dim columns at row stride `hidden` reserved for this task by the caller.
        unsafe {
            gemm::gemm(
                q_rows,
                head_dim,
                len,
                dst.add(column),
                1,
                hidden as isize,
                false,
                scores.as_ptr(),
                1,
                len as isize,
                v,
                1,
                row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        // SAFETY: dst has q_rows = sums.len() rows of head_dim columns at `column`, row stride `hidden`.
        unsafe { divide_rows(dst.add(column), hidden, head_dim, sums) };
    });
}

/// Divides each of `sums.len()` rows of `width` elements at `dst` (row stride `stride`) by its softmax sum.
///
/// # Safety
/// Those rows must lie inside memory this task alone writes.
unsafe fn divide_rows(dst: *mut f32, stride: usize, width: usize, sums: &[f32]) {
    for (row, &sum) in sums.iter().enumerate() {
        // SAFETY: the caller guarantees the row is inside its block.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(row * stride), width) };
        vector::scale(out, 1.0 / sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of one head written out loop by loop, in f64.
    fn reference(qkv: &[f32], cu: &[usize], hidden: usize, heads: usize) -> Vec<f32> {
        let d = hidden / heads;
        let mut out = vec![0f32; cu[cu.len() - 1] * hidden];
        let at = |row: usize, col: usize| qkv[row * 3 * hidden + col] as f64;
        for s in 0..cu.len() - 1 {
            for h in 0..heads {
                for i in cu[s]..cu[s + 1] {
                    let scores: Vec<f64> = (cu[s]..cu[s + 1])
                        .map(|j| {
                            (0..d)
                                .map(|c| at(i, h * d + c) * at(j, hidden + h * d + c))
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let v: f64 = (cu[s]..cu[s + 1])
                            .zip(&e)
                            .map(|(j, p)| p * at(j, 2 * hidden + h * d + c))
                            .sum();
                        out[i * hidden + h * d + c] = (v / sum) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn packed_attention_matches_the_definition() {
        let (hidden, heads) = (24, 3);
        let cu = [0usize, 5, 6, 19, 40, 40 + 300];
        let tokens = cu[cu.len() - 1];
        let qkv: Vec<f32> = (0..tokens * 3 * hidden)
            .map(|i| (((i * 2654435761) % 1000) as f32 / 250.0) - 2.0)
            .collect();
        let expected = reference(&qkv, &cu, hidden, heads);
        let mut out = vec![f32::NAN; tokens * hidden];
        let shape = AttentionShape {
            cu_seqlens: &cu,
            hidden,
            heads,
            first_only: false,
        };
        attention(&qkv, shape, &mut out).expect("shapes");
        for (a, b) in out.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let mut first = vec![f32::NAN; (cu.len() - 1) * hidden];
        attention(
            &qkv,
            AttentionShape {
                first_only: true,
                ..shape
            },
            &mut first,
        )
        .expect("shapes");
        for (s, row) in first.chunks(hidden).enumerate() {
            for (a, b) in row.iter().zip(&out[cu[s] * hidden..][..hidden]) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }
}
