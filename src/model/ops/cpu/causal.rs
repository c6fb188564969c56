//! Causal self-attention with grouped key/value heads over packed sequences on the CPU, after an optional prefix
//! of cached keys and values that every sequence follows: per (sequence, query head), blocks of query rows go
//! through the GEMM library over only the keys they may see, with the vectorised softmax in between.

use std::cell::RefCell;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{vector, F32View, SharedOut};

/// Query rows per block: a block reads the keys up to its last row, so the masked part it computes is at most
/// this many columns.
const BLOCK_ROWS: usize = 64;

/// The shapes of one call.
#[derive(Clone, Copy)]
pub struct CausalShape<'a> {
    /// Offsets of the sequences in the packed tokens.
    pub cu_seqlens: &'a [usize],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Only each sequence's last query row.
    pub last_only: bool,
    /// Cached positions before every sequence's own tokens.
    pub prefix_len: usize,
}

/// Row-major f32 inputs: q [tokens, heads·d], k and v [tokens, kv_heads·d], the prefix's [prefix_len, kv_heads·d].
#[derive(Clone, Copy)]
pub struct CausalInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub prefix_k: &'a [f32],
    pub prefix_v: &'a [f32],
}

thread_local! {
    /// Scores of the block running on this thread, reused across blocks and batches.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The tensor form of `ops::causal_attention` (q [tokens, heads, d], k and v [tokens, kv_heads, d], prefix
/// [prefix, kv_heads, d]), when every input is an f32 CPU tensor.
pub fn causal_attention_tensors(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    cu_seqlens: &[usize],
    last_only: bool,
    prefix: Option<(&Tensor, &Tensor)>,
) -> Option<Result<Tensor>> {
    let (tokens, heads, head_dim) = q.dims3().ok()?;
    let kv_heads = k.dim(1).ok()?;
    let mut all = vec![q, k, v];
    all.extend(prefix.iter().flat_map(|(pk, pv)| [*pk, *pv]));
    if !super::is_cpu_f32(&all) {
        return None;
    }
    let contiguous: Vec<Tensor> = all
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()
        .ok()?;
    let views: Vec<F32View> = contiguous.iter().map(F32View::of).collect::<Option<_>>()?;
    let prefix_len = prefix.map_or(Ok(0), |(pk, _)| pk.dim(0)).ok()?;
    let (prefix_k, prefix_v) = match views.get(3..5) {
        Some([pk, pv]) => (pk.data(), pv.data()),
        _ => (&[][..], &[][..]),
    };
    let shape = CausalShape {
        cu_seqlens,
        heads,
        kv_heads,
        head_dim,
        last_only,
        prefix_len,
    };
    let inputs = CausalInputs {
        q: views[0].data(),
        k: views[1].data(),
        v: views[2].data(),
        prefix_k,
        prefix_v,
    };
    let rows = if last_only {
        cu_seqlens.len().saturating_sub(1)
    } else {
        tokens
    };
    let mut out = vec![0f32; rows * heads * head_dim];
    Some(
        causal_attention(inputs, shape, &mut out)
            .and_then(|()| Tensor::from_vec(out, (rows, heads * head_dim), q.device())),
    )
}

/// out: [tokens, heads·d], or [sequences, heads·d] with `last_only`. Query head h reads key/value head
/// h / (heads / kv_heads); the query at own position i sees the whole prefix and own keys 0..=i.
pub fn causal_attention(
    inputs: CausalInputs<'_>,
    shape: CausalShape<'_>,
    out: &mut [f32],
) -> Result<()> {
    check(inputs, shape, out.len())?;
    let sequences = shape.cu_seqlens.len() - 1;
    let shared = SharedOut(out.as_mut_ptr());
    (0..sequences * shape.heads)
        .into_par_iter()
        .for_each(|task| {
            let (seq, head) = (task / shape.heads, task % shape.heads);
            let (start, end) = (shape.cu_seqlens[seq], shape.cu_seqlens[seq + 1]);
            let first_row = if shape.last_only {
                end.saturating_sub(start + 1)
            } else {
                0
            };
            let out_row = if shape.last_only { seq } else { start };
            let mut row = first_row;
            while row < end - start {
                let rows = BLOCK_ROWS.min(end - start - row);
                let block = QueryBlock {
                    start,
                    from: row,
                    rows,
                    head,
                    out_row: out_row + row - first_row,
                };
                one_block(inputs, shape, block, shared);
                row += rows;
            }
        });
    Ok(())
}

fn check(inputs: CausalInputs<'_>, shape: CausalShape<'_>, out_len: usize) -> Result<()> {
    let CausalShape {
        cu_seqlens,
        heads,
        kv_heads,
        head_dim,
        last_only,
        prefix_len,
    } = shape;
    let tokens = cu_seqlens.last().copied().unwrap_or(0);
    let sequences = cu_seqlens.len().saturating_sub(1);
    let rows = if last_only { sequences } else { tokens };
    let kv_width = kv_heads * head_dim;
    let consistent = kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && cu_seqlens.first() == Some(&0)
        && cu_seqlens
            .windows(2)
            .all(|w| w[0] < w[1] || (w[0] == w[1] && !last_only))
        && inputs.q.len() == tokens * heads * head_dim
        && inputs.k.len() == tokens * kv_width
        && inputs.v.len() == tokens * kv_width
        && inputs.prefix_k.len() == prefix_len * kv_width
        && inputs.prefix_v.len() == prefix_len * kv_width
        && out_len == rows * heads * head_dim;
    if !consistent {
        candle_core::bail!(
            "causal attention shapes disagree: {tokens} tokens in {sequences} sequences, {heads} query and \
             {kv_heads} key/value heads of {head_dim}, prefix {prefix_len}"
        );
    }
    Ok(())
}

/// Query rows from..from + rows of the sequence starting at token `start`, for one query head.
#[derive(Clone, Copy)]
struct QueryBlock {
    start: usize,
    from: usize,
    rows: usize,
    head: usize,
    /// The output row of the block's first query.
    out_row: usize,
}

/// Scores [rows, prefix + own keys up to the block's last row], softmax, then the values; writes the block's
/// rows of the head's output columns (a region no other block or head writes).
fn one_block(inputs: CausalInputs<'_>, shape: CausalShape<'_>, block: QueryBlock, out: SharedOut) {
    let d = shape.head_dim;
    let (q_width, kv_width) = (shape.heads * d, shape.kv_heads * d);
    let kv_column = (block.head / (shape.heads / shape.kv_heads)) * d;
    let prefix = shape.prefix_len;
    let own_keys = block.from + block.rows;
    let keys = prefix + own_keys;
    let scale = 1.0 / (d as f32).sqrt();
    let q = &inputs.q[(block.start + block.from) * q_width + block.head * d..];
    let own_k = &inputs.k[block.start * kv_width..];
    let own_v = &inputs.v[block.start * kv_width..];
    SCORES.with_borrow_mut(|buffer| {
        let needed = block.rows * keys + block.rows;
        if buffer.len() < needed {
            buffer.resize(needed, 0.0);
        }
        let (scores, sums) = buffer[..needed].split_at_mut(block.rows * keys);
        // This head's key/value columns of a [rows, kv_width] buffer (an empty prefix's pointer is never read).
        let operand = |data: &[f32]| Strided {
            ptr: data.as_ptr().wrapping_add(kv_column),
            row_stride: kv_width,
        };
        // The prefix's keys and values, then the sequence's own: (keys, values, first score column, count).
        let segments = [
            (
                operand(inputs.prefix_k),
                operand(inputs.prefix_v),
                0,
                prefix,
            ),
            (operand(own_k), operand(own_v), prefix, own_keys),
        ];
        let segments = segments.iter().filter(|segment| segment.3 > 0);
        for &(keys_of, _, column, count) in segments.clone() {
            // SAFETY: scores is [rows, keys]; columns column..column + count of each row take Q·Kᵀ over this
            // segment's `count` keys, which lie in its buffer (prefix rows, or the sequence's rows).
            unsafe {
                scores_into(
                    scores[column..].as_mut_ptr(),
                    keys,
                    q,
                    q_width,
                    keys_of,
                    (block.rows, count, d),
                    scale,
                )
            };
        }
        for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
            // Query at own position from + i sees own keys 0..=from + i.
            row[prefix + block.from + i + 1..].fill(f32::NEG_INFINITY);
        }
        vector::softmax_numerators(scores, keys, sums);
        let dst = out.at(block.out_row * q_width + block.head * d);
        for (n, &(_, values_of, column, count)) in segments.enumerate() {
            // SAFETY: dst rows are this block's, the head's d columns at row stride q_width; P's columns for this
            // segment start at `column`. The first segment writes, the next adds.
            unsafe {
                values_into(
                    dst,
                    q_width,
                    scores[column..].as_ptr(),
                    keys,
                    values_of,
                    (block.rows, count, d),
                    n > 0,
                )
            };
        }
        for (i, &sum) in sums.iter().enumerate() {
            // SAFETY: row i < rows of this block's region.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.wrapping_add(i * q_width), d) };
            vector::scale(row, 1.0 / sum);
        }
    });
}

/// A row-major operand read in place: element (r, c) at ptr[r·row_stride + c].
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    row_stride: usize,
}

/// dst[r, c] (row stride dst_stride) = scale · Σ_k q[r, k]·keys[c, k], for (rows, cols, depth).
///
/// # Safety
/// Every addressed element must lie in its buffer: q rows·q_stride, keys cols·row_stride, dst rows·dst_stride.
unsafe fn scores_into(
    dst: *mut f32,
    dst_stride: usize,
    q: &[f32],
    q_stride: usize,
    keys: Strided,
    (rows, cols, depth): (usize, usize, usize),
    scale: f32,
) {
    gemm::gemm(
        rows,
        cols,
        depth,
        dst,
        1,
        dst_stride as isize,
        false,
        q.as_ptr(),
        1,
        q_stride as isize,
        keys.ptr,
        keys.row_stride as isize,
        1,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// dst[r, c] (row stride dst_stride) (+)= Σ_j p[r, j]·values[j, c], for (rows, keys, depth); `accumulate` adds
/// to what dst holds.
///
/// # Safety
/// As `scores_into`: p is rows × keys at row stride p_stride, values keys rows, dst rows × depth.
unsafe fn values_into(
    dst: *mut f32,
    dst_stride: usize,
    p: *const f32,
    p_stride: usize,
    values: Strided,
    (rows, keys, depth): (usize, usize, usize),
    accumulate: bool,
) {
    gemm::gemm(
        rows,
        depth,
        keys,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        p,
        1,
        p_stride as isize,
        values.ptr,
        1,
        values.row_stride as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in f64: softmax over the prefix and own keys up to the query, grouped heads.
    fn reference(inputs: CausalInputs<'_>, shape: CausalShape<'_>) -> Vec<f32> {
        let (h, kvh, d, p) = (
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            shape.prefix_len,
        );
        let mut out = Vec::new();
        for w in shape.cu_seqlens.windows(2) {
            let first = if shape.last_only { w[1] - w[0] - 1 } else { 0 };
            for i in first..w[1] - w[0] {
                for head in 0..h {
                    let kv = head / (h / kvh);
                    let key = |j: usize| -> (&[f32], &[f32]) {
                        let (ks, vs, row) = if j < p {
                            (inputs.prefix_k, inputs.prefix_v, j)
                        } else {
                            (inputs.k, inputs.v, w[0] + j - p)
                        };
                        let at = row * kvh * d + kv * d;
                        (&ks[at..at + d], &vs[at..at + d])
                    };
                    let q = &inputs.q[(w[0] + i) * h * d + head * d..][..d];
                    let scores: Vec<f64> = (0..p + i + 1)
                        .map(|j| {
                            let k = key(j).0;
                            q.iter()
                                .zip(k)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..d {
                        let v: f64 = e
                            .iter()
                            .enumerate()
                            .map(|(j, pj)| pj * key(j).1[c] as f64)
                            .sum();
                        out.push((v / total) as f32);
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i + seed) * 2_654_435_761) % 1000) as f32 / 250.0) - 2.0)
            .collect()
    }

    #[test]
    fn grouped_causal_attention_after_a_prefix_matches_the_definition() {
        let (heads, kv_heads, head_dim) = (4, 2, 8);
        // Sequences longer than a block, shorter, and of one token.
        let cu = [0usize, 150, 151, 170];
        let tokens = cu[cu.len() - 1];
        for (prefix_len, last_only) in [(0, false), (7, false), (7, true), (0, true)] {
            let q = values(tokens * heads * head_dim, 1);
            let k = values(tokens * kv_heads * head_dim, 2);
            let v = values(tokens * kv_heads * head_dim, 3);
            let pk = values(prefix_len * kv_heads * head_dim, 4);
            let pv = values(prefix_len * kv_heads * head_dim, 5);
            let inputs = CausalInputs {
                q: &q,
                k: &k,
                v: &v,
                prefix_k: &pk,
                prefix_v: &pv,
            };
            let shape = CausalShape {
                cu_seqlens: &cu,
                heads,
                kv_heads,
                head_dim,
                last_only,
                prefix_len,
            };
            let rows = if last_only { cu.len() - 1 } else { tokens };
            let mut out = vec![f32::NAN; rows * heads * head_dim];
            causal_attention(inputs, shape, &mut out).expect("shapes agree");
            let expected = reference(inputs, shape);
            let worst = out
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "prefix {prefix_len}, last_only {last_only}: {worst}"
            );
        }
    }

    #[test]
    fn inconsistent_shapes_are_an_error() {
        let shape = CausalShape {
            cu_seqlens: &[0, 2],
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
            last_only: false,
            prefix_len: 0,
        };
        let data = vec![0f32; 64];
        let inputs = CausalInputs {
            q: &data[..24],
            k: &data[..16],
            v: &data[..16],
            prefix_k: &[],
            prefix_v: &[],
        };
        assert!(causal_attention(inputs, shape, &mut [0f32; 24]).is_err());
    }
}
