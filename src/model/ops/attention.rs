//! Self-attention over packed sequences: bidirectional (through the fused QKV layer, on the CPU's attention
//! kernel where it applies; the padded and per-sequence forms are in `sequences.rs`), windowed (ModernBERT's
//! local layers) and causal with grouped-query heads after a cached prefix (the decoders). The disentangled form
//! of DeBERTa is in `disentangled.rs`.

use candle_core::{Result, Tensor};

use super::{cpu, self_attention, Linear, Sequences};

/// Multi-head self-attention of packed sequences from the hidden state through the fused QKV layer (see
/// `self_attention`). x: [tokens, hidden].
pub fn projected_self_attention(
    qkv: &Linear,
    x: &Tensor,
    sequences: &Sequences,
    heads: usize,
    first_only: bool,
) -> Result<Tensor> {
    if let Some(context) =
        cpu::projected_self_attention(qkv, x, &sequences.cu_seqlens, heads, first_only)
    {
        return context;
    }
    self_attention(&qkv.matmul(x)?, qkv.bias(), sequences, heads, first_only)
}

/// Scores held at once per block of query rows (fp32 values), so a long sequence never holds [heads, L, L].
const SCORE_BLOCK: usize = 1 << 22;

/// Which keys a query at position p sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Keys at positions up to p (decoders).
    Causal,
    /// Keys within `w` of p on either side (ModernBERT's local layers), or every key with None.
    Window(Option<usize>),
}

impl Visibility {
    /// The keys a block of queries at positions from..to may see, of a sequence of `len`.
    fn keys(self, from: usize, to: usize, len: usize) -> std::ops::Range<usize> {
        match self {
            Self::Causal => 0..to,
            Self::Window(None) => 0..len,
            Self::Window(Some(w)) => from.saturating_sub(w)..(to + w).min(len),
        }
    }

    fn sees(self, query: usize, key: usize) -> bool {
        match self {
            Self::Causal => key <= query,
            Self::Window(None) => true,
            Self::Window(Some(w)) => query.abs_diff(key) <= w,
        }
    }
}

/// Causal self-attention of packed sequences with grouped key/value heads, in fp32. q: [tokens, heads, d];
/// k, v: [tokens, kv_heads, d]; query head h reads key/value head h / (heads / kv_heads), as transformers'
/// repeat_kv. Returns [tokens, heads · d], or with `last_only` each sequence's last token, [sequences, heads · d].
/// With `prefix`, every sequence follows the same cached keys and values [prefix, kv_heads, d] (a shared prompt
/// prefix computed once), and its own tokens sit at positions after them.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    last_only: bool,
    prefix: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    if let Some(result) =
        super::cpu::causal::causal_attention_tensors((q, k, v), cu_seqlens, last_only, prefix)
    {
        return result;
    }
    attention_in_blocks(
        q,
        k,
        v,
        cu_seqlens,
        Blocks {
            visibility: Visibility::Causal,
            last_only,
            score_block: SCORE_BLOCK,
            prefix,
        },
    )
}

/// How `attention_in_blocks` goes through a batch.
struct Blocks<'a> {
    visibility: Visibility,
    /// Only each sequence's last row.
    last_only: bool,
    /// Scores held at once.
    score_block: usize,
    /// Keys and values every sequence follows.
    prefix: Option<(&'a Tensor, &'a Tensor)>,
}

/// Bidirectional self-attention of packed sequences, over every key or (`window`) those within w positions,
/// in fp32. Shapes as `causal_attention`; returns [tokens, heads · d].
pub fn windowed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    window: Option<usize>,
) -> Result<Tensor> {
    attention_in_blocks(
        q,
        k,
        v,
        cu_seqlens,
        Blocks {
            visibility: Visibility::Window(window),
            last_only: false,
            score_block: SCORE_BLOCK,
            prefix: None,
        },
    )
}

/// Attention sequence by sequence, query rows in blocks that each read only the keys they may see, at most
/// `score_block` scores at a time (see `Blocks`).
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    how: Blocks,
) -> Result<Tensor> {
    let heads = q.dim(1)?;
    let offset = how.prefix.map_or(Ok(0), |(pk, _)| pk.dim(0))?;
    let with_prefix = |own: Tensor, cached: Option<&Tensor>| match cached {
        Some(cached) => Tensor::cat(&[cached, &own], 0),
        None => Ok(own),
    };
    let mut contexts = Vec::with_capacity(cu_seqlens.len().saturating_sub(1));
    for window in cu_seqlens.windows(2) {
        let (start, len) = (window[0], window[1] - window[0]);
        let rows = if how.last_only { 1 } else { len };
        let ks = with_prefix(k.narrow(0, start, len)?, how.prefix.map(|(pk, _)| pk))?;
        let vs = with_prefix(v.narrow(0, start, len)?, how.prefix.map(|(_, pv)| pv))?;
        let (ks, vs) = (
            ks.transpose(0, 1)?.contiguous()?,
            vs.transpose(0, 1)?.contiguous()?,
        );
        let total = offset + len;
        let block = (how.score_block / (heads * total).max(1)).max(1);
        let first = len - rows;
        let mut row = 0;
        while row < rows {
            let count = block.min(rows - row);
            let queries = q.narrow(0, start + first + row, count)?;
            let from = offset + first + row;
            let seen = how.visibility.keys(from, from + count, total);
            contexts.push(attend_block(
                &queries,
                &ks,
                &vs,
                from,
                seen,
                how.visibility,
            )?);
            row += count;
        }
    }
    Tensor::cat(&contexts, 0)
}

/// Attention of `queries` [rows, heads, d] at positions from..from + rows of one sequence over its keys and
/// values [kv_heads, len, d] in `seen`, masked by `visibility`. Returns [rows, heads · d].
fn attend_block(
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    from: usize,
    seen: std::ops::Range<usize>,
    visibility: Visibility,
) -> Result<Tensor> {
    let (rows, heads, d) = queries.dims3()?;
    let kv_heads = keys.dim(0)?;
    let group = heads / kv_heads.max(1);
    let keys = keys.narrow(1, seen.start, seen.len())?;
    let values = values.narrow(1, seen.start, seen.len())?;
    // [heads, rows, d] → [kv_heads, group · rows, d]: the query heads that share a key/value head together.
    let grouped = queries
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv_heads, group * rows, d))?;
    let scores = (grouped.matmul(&keys.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let all_seen = (from..from + rows).all(|p| seen.clone().all(|j| visibility.sees(p, j)));
    let scores = if all_seen {
        scores
    } else {
        scores.broadcast_add(&mask(
            from,
            rows,
            &seen,
            group,
            visibility,
            queries.device(),
        )?)?
    };
    candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&values.contiguous()?)?
        .reshape((heads, rows, d))?
        .transpose(0, 1)?
        .reshape((rows, heads * d))
}

/// [group · rows, keys]: 0 where the query may see the key, -inf where not.
fn mask(
    from: usize,
    rows: usize,
    seen: &std::ops::Range<usize>,
    group: usize,
    visibility: Visibility,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let values: Vec<f32> = (0..group * rows)
        .flat_map(|r| {
            let position = from + r % rows;
            seen.clone().map(move |j| {
                if visibility.sees(position, j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (group * rows, seen.len()), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::{gated_activation, rotary_tables_from, rotate_qk, ActivatedHalf};
    use candle_core::{DType, Device};

    /// The CPU kernel (f32) and the composed path (taken for f64) against the rotation written out.
    #[test]
    fn rotating_fused_qkv_turns_q_and_k_and_leaves_v() -> Result<()> {
        let (tokens, heads, head_dim) = (3, 2, 4);
        let hidden = heads * head_dim;
        let qkv = Tensor::randn(0f32, 1.0, (tokens, 3 * hidden), &Device::Cpu)?;
        let rotary = rotary_tables_from([0..1, 0..2].into_iter(), &[0.7, 0.05], &Device::Cpu)?;
        let values: Vec<Vec<f32>> = qkv.to_vec2()?;
        let (cos, sin): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (rotary.0.to_vec2()?, rotary.1.to_vec2()?);
        let mut expected = values.clone();
        for (t, row) in expected.iter_mut().enumerate() {
            for head in row[..2 * hidden].chunks_exact_mut(head_dim) {
                let original = head.to_vec();
                for i in 0..head_dim / 2 {
                    let (a, b) = (original[i], original[i + head_dim / 2]);
                    head[i] = a * cos[t][i] - b * sin[t][i];
                    head[i + head_dim / 2] = b * cos[t][i] + a * sin[t][i];
                }
            }
        }
        for input in [qkv.clone(), qkv.to_dtype(DType::F64)?] {
            let got: Vec<Vec<f32>> = rotate_qk(&input, heads, &rotary)?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            for (g, e) in got.iter().flatten().zip(expected.iter().flatten()) {
                assert!((g - e).abs() < 1e-6, "{g} vs {e} ({:?})", input.dtype());
            }
        }
        Ok(())
    }

    /// Both halves orders, the CPU kernel (f32) and the composed path (f64), against act(a)·b written out.
    #[test]
    fn gated_activation_multiplies_the_activated_half_by_the_other() -> Result<()> {
        let n = 5;
        let x = Tensor::randn(0f32, 1.5, (4, 2 * n), &Device::Cpu)?;
        let rows: Vec<Vec<f32>> = x.to_vec2()?;
        let relu = super::super::FeedForwardActivation::Relu;
        for half in [ActivatedHalf::First, ActivatedHalf::Second] {
            for input in [x.clone(), x.to_dtype(DType::F64)?] {
                let got: Vec<Vec<f32>> = gated_activation(&input, half, relu)?
                    .to_dtype(DType::F32)?
                    .to_vec2()?;
                for (row, out) in rows.iter().zip(&got) {
                    let (first, second) = row.split_at(n);
                    let (activated, other) = match half {
                        ActivatedHalf::First => (first, second),
                        ActivatedHalf::Second => (second, first),
                    };
                    for i in 0..n {
                        let want = activated[i].max(0.0) * other[i];
                        assert!(
                            (out[i] - want).abs() < 1e-6,
                            "{half:?}: {} vs {want}",
                            out[i]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Attention of one sequence written out directly: softmax over the visible keys of each position.
    fn naive(
        q: &[Vec<Vec<f32>>],
        k: &[Vec<Vec<f32>>],
        v: &[Vec<Vec<f32>>],
        group: usize,
    ) -> Vec<Vec<f32>> {
        let (len, heads, d) = (q.len(), q[0].len(), q[0][0].len());
        (0..len)
            .map(|t| {
                (0..heads)
                    .flat_map(|h| {
                        let kv = h / group;
                        let scores: Vec<f32> = (0..=t)
                            .map(|j| {
                                (0..d).map(|i| q[t][h][i] * k[j][kv][i]).sum::<f32>()
                                    / (d as f32).sqrt()
                            })
                            .collect();
                        let top = scores.iter().cloned().fold(f32::MIN, f32::max);
                        let weights: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
                        let total: f32 = weights.iter().sum();
                        (0..d)
                            .map(|i| {
                                (0..=t)
                                    .map(|j| weights[j] / total * v[j][kv][i])
                                    .sum::<f32>()
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect()
    }

    fn values(tokens: usize, heads: usize, d: usize, seed: u32) -> Vec<Vec<Vec<f32>>> {
        (0..tokens)
            .map(|t| {
                (0..heads)
                    .map(|h| {
                        (0..d)
                            .map(|i| {
                                (((t * 31 + h * 7 + i * 3) as u32 + seed) % 17) as f32 / 8.0 - 1.0
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn tensor(v: &[Vec<Vec<f32>>]) -> Tensor {
        let (t, h, d) = (v.len(), v[0].len(), v[0][0].len());
        Tensor::from_vec(
            v.iter().flatten().flatten().copied().collect::<Vec<_>>(),
            (t, h, d),
            &Device::Cpu,
        )
        .expect("tensor")
    }

    #[test]
    fn packed_grouped_causal_attention_matches_the_direct_sum() {
        let (heads, kv_heads, d) = (4, 2, 3);
        let lengths = [5, 1, 3, 70];
        let tokens: usize = lengths.iter().sum();
        let (q, k, v) = (
            values(tokens, heads, d, 1),
            values(tokens, kv_heads, d, 5),
            values(tokens, kv_heads, d, 9),
        );
        let mut cu = vec![0];
        lengths
            .iter()
            .for_each(|l| cu.push(cu.last().copied().unwrap_or(0) + l));
        let run = |how: Blocks| {
            attention_in_blocks(&tensor(&q), &tensor(&k), &tensor(&v), &cu, how)
                .and_then(|t| t.to_vec2::<f32>())
                .expect("attention")
        };
        let causal = |last_only, score_block| Blocks {
            visibility: Visibility::Causal,
            last_only,
            score_block,
            prefix: None,
        };
        let all = run(causal(false, SCORE_BLOCK));
        let last = run(causal(true, SCORE_BLOCK));
        // Blocks of 8 query rows of the longest sequence (single rows of the others) give the same.
        let blocked = run(causal(false, heads * 70 * 8));
        for (b, a) in blocked.iter().flatten().zip(all.iter().flatten()) {
            assert!((b - a).abs() < 1e-6, "in blocks {b} vs whole {a}");
        }
        for (s, w) in cu.windows(2).enumerate() {
            let expected = naive(
                &q[w[0]..w[1]],
                &k[w[0]..w[1]],
                &v[w[0]..w[1]],
                heads / kv_heads,
            );
            for (row, want) in expected.iter().enumerate() {
                for (got, want) in all[w[0] + row].iter().zip(want) {
                    assert!(
                        (got - want).abs() < 1e-5,
                        "sequence {s} row {row}: {got} vs {want}"
                    );
                }
            }
            for (got, want) in last[s].iter().zip(&expected[expected.len() - 1]) {
                assert!(
                    (got - want).abs() < 1e-5,
                    "sequence {s} last row: {got} vs {want}"
                );
            }
        }
    }

    /// The composed path (what other devices run) and the CPU kernel agree after a cached prefix, for every row
    /// and for the last rows only.
    #[test]
    fn composed_causal_attention_after_a_prefix_matches_the_cpu_kernel() {
        let (heads, kv_heads, d) = (4, 2, 3);
        let cu = [0usize, 6, 7, 90];
        let (q, k, v) = (
            tensor(&values(90, heads, d, 2)),
            tensor(&values(90, kv_heads, d, 4)),
            tensor(&values(90, kv_heads, d, 6)),
        );
        let (pk, pv) = (
            tensor(&values(11, kv_heads, d, 8)),
            tensor(&values(11, kv_heads, d, 3)),
        );
        for last_only in [false, true] {
            let composed = attention_in_blocks(
                &q,
                &k,
                &v,
                &cu,
                Blocks {
                    visibility: Visibility::Causal,
                    last_only,
                    score_block: heads * 101 * 8,
                    prefix: Some((&pk, &pv)),
                },
            )
            .and_then(|t| t.to_vec2::<f32>())
            .expect("composed");
            let kernel = super::super::cpu::causal::causal_attention_tensors(
                (&q, &k, &v),
                &cu,
                last_only,
                Some((&pk, &pv)),
            )
            .expect("f32 CPU inputs take the kernel")
            .and_then(|t| t.to_vec2::<f32>())
            .expect("kernel");
            for (a, b) in composed.iter().flatten().zip(kernel.iter().flatten()) {
                assert!((a - b).abs() < 1e-5, "last_only {last_only}: {a} vs {b}");
            }
        }
    }
}
