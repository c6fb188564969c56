//! DeBERTa's disentangled self-attention over packed sequences: the content-to-content score of a query and a
//! key plus a content-to-position term (the query against the key's relative position, "c2p") and a
//! position-to-content term (the key against the query's relative position, "p2c"), the positions read from a
//! table of relative-position embeddings at (optionally log-bucketed) distances. In candle's device-generic ops,
//! sequence by sequence, since the relative term belongs to each sequence.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};

/// How a distance between a query and a key becomes a row of the relative-position table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelativeDistances {
    /// Rows of the table on each side of distance 0 (`position_buckets` if set, else `max_relative_positions`).
    pub span: usize,
    /// `position_buckets`: distances beyond half of it share rows on a log scale; None: distances are clamped.
    pub buckets: Option<usize>,
    /// `max_relative_positions`: the distance the log scale reaches its last bucket at.
    pub max_position: usize,
}

impl RelativeDistances {
    /// The bucket of distance `r` (query position minus key position), as DeBERTa-v2's `make_log_bucket_position`
    /// computes it (in fp32, as the reference does, so the rounding up lands on the same bucket).
    pub fn bucket(&self, r: i64) -> i64 {
        let Some(size) = self.buckets else {
            return r;
        };
        let mid = (size / 2) as i64;
        if r.abs() <= mid {
            return r;
        }
        let ratio = (r.abs() as f32 / mid as f32).ln()
            / ((self.max_position as f32 - 1.0) / mid as f32).ln();
        let log_pos = (ratio * (mid - 1) as f32).ceil() + mid as f32;
        r.signum() * log_pos as i64
    }

    /// The table row of distance `r`: bucket + span, clamped to the table's 2·span rows.
    fn row(&self, r: i64) -> u32 {
        let span = self.span as i64;
        (self.bucket(r) + span).clamp(0, 2 * span - 1) as u32
    }

    /// For a sequence of `n` tokens: the [n, n] rows of query i and key j, and the same transposed.
    fn rows(&self, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let by_distance: Vec<u32> = (0..2 * n as i64).map(|d| self.row(d - n as i64)).collect();
        let at = |i: usize, j: usize| by_distance[i + n - j];
        let rows: Vec<u32> = (0..n).flat_map(|i| (0..n).map(move |j| at(i, j))).collect();
        let transposed: Vec<u32> = (0..n).flat_map(|j| (0..n).map(move |i| at(i, j))).collect();
        Ok((
            Tensor::from_vec(rows, (n, n), device)?,
            Tensor::from_vec(transposed, (n, n), device)?,
        ))
    }
}

/// The relative-position rows of every sequence length in a batch, built once and read by every layer.
pub struct RelativeRows {
    by_length: HashMap<usize, (Tensor, Tensor)>,
}

impl RelativeRows {
    pub fn new(
        distances: &RelativeDistances,
        cu_seqlens: &[usize],
        target: &super::Target,
    ) -> Result<Self> {
        let device = target.device();
        let mut by_length = HashMap::new();
        for n in cu_seqlens.windows(2).map(|w| w[1] - w[0]) {
            if let std::collections::hash_map::Entry::Vacant(slot) = by_length.entry(n) {
                slot.insert(distances.rows(n, device)?);
            }
        }
        Ok(Self { by_length })
    }

    /// For models without relative positions.
    pub fn empty() -> Self {
        Self {
            by_length: HashMap::new(),
        }
    }

    fn get(&self, n: usize) -> Result<&(Tensor, Tensor)> {
        self.by_length
            .get(&n)
            .ok_or_else(|| candle_core::Error::Msg(format!("no relative rows for length {n}")))
    }
}

/// A layer's relative-position embeddings projected as keys (for c2p) and as queries (for p2c): [heads,
/// 2·span, head_dim] fp32 each, present for the terms the model uses. Computed once at load.
#[derive(Debug, Clone)]
pub struct PositionProjections {
    pub keys: Option<Tensor>,
    pub queries: Option<Tensor>,
}

impl PositionProjections {
    /// From [2·span, heads·head_dim] projections.
    pub fn new(keys: Option<Tensor>, queries: Option<Tensor>, heads: usize) -> Result<Self> {
        let split = |t: Option<Tensor>| -> Result<Option<Tensor>> {
            t.map(|t| {
                let (rows, width) = t.dims2()?;
                t.to_dtype(DType::F32)?
                    .reshape((rows, heads, width / heads))?
                    .transpose(0, 1)?
                    .contiguous()
            })
            .transpose()
        };
        Ok(Self {
            keys: split(keys)?,
            queries: split(queries)?,
        })
    }

    /// 1 + the number of position terms: the reference divides every term by √(head_dim · this).
    fn scale_factor(&self) -> usize {
        1 + usize::from(self.keys.is_some()) + usize::from(self.queries.is_some())
    }
}

/// Disentangled self-attention of packed sequences. `qkv`: [tokens, 3·heads·head_dim] (Q | K | V, biases added).
/// Returns the context [tokens, heads·head_dim] (fp32), or with `first_only` only each sequence's first token's,
/// [sequences, heads·head_dim].
pub fn disentangled_attention(
    qkv: &Tensor,
    cu_seqlens: &[usize],
    heads: usize,
    positions: &PositionProjections,
    rows: &RelativeRows,
    first_only: bool,
) -> Result<Tensor> {
    let width = qkv.dim(1)? / 3;
    let head_dim = width / heads;
    let scale = ((head_dim * positions.scale_factor()) as f64).sqrt();
    let contexts = cu_seqlens
        .windows(2)
        .map(|w| {
            let sequence = qkv.narrow(0, w[0], w[1] - w[0])?;
            let part = |i: usize| -> Result<Tensor> {
                sequence
                    .narrow(1, i * width, width)?
                    .to_dtype(DType::F32)?
                    .reshape((w[1] - w[0], heads, head_dim))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let queries = if first_only { 1 } else { w[1] - w[0] };
            let q = q.narrow(1, 0, queries)?;
            let relative = match positions.scale_factor() > 1 {
                true => {
                    let (relative, transposed) = rows.get(w[1] - w[0])?;
                    Some((
                        relative.narrow(0, 0, queries)?,
                        transposed.narrow(1, 0, queries)?,
                    ))
                }
                false => None,
            };
            let scores = sequence_scores(&q, &k, positions, relative.as_ref())?;
            let probs = candle_nn::ops::softmax_last_dim(&(scores / scale)?)?;
            probs.matmul(&v)?.transpose(0, 1)?.reshape((queries, width))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&contexts, 0)
}

/// q·kᵀ + c2p + p2c of one sequence, unscaled: [heads, queries, keys]. `relative`: the [queries, keys] table
/// rows and the same as [keys, queries], when the model has position terms.
fn sequence_scores(
    q: &Tensor,
    k: &Tensor,
    positions: &PositionProjections,
    relative: Option<&(Tensor, Tensor)>,
) -> Result<Tensor> {
    let heads = q.dim(0)?;
    let mut scores = q.matmul(&k.t()?)?;
    let Some((relative, transposed)) = relative else {
        return Ok(scores);
    };
    if let Some(keys) = &positions.keys {
        let index = relative
            .unsqueeze(0)?
            .broadcast_as((heads, relative.dim(0)?, relative.dim(1)?))?
            .contiguous()?;
        let c2p = q.matmul(&keys.t()?)?.contiguous()?;
        scores = (scores + c2p.gather(&index, D::Minus1)?)?;
    }
    if let Some(queries) = &positions.queries {
        let index = transposed
            .unsqueeze(0)?
            .broadcast_as((heads, transposed.dim(0)?, transposed.dim(1)?))?
            .contiguous()?;
        let p2c = k.matmul(&queries.t()?)?.contiguous()?;
        scores = (scores + p2c.gather(&index, D::Minus1)?.transpose(1, 2)?)?;
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_buckets_follow_the_reference_table() {
        // DeBERTa-v3's settings: 256 buckets, max_relative_positions 512. Values from transformers'
        // make_log_bucket_position on the same distances.
        let v3 = RelativeDistances {
            span: 256,
            buckets: Some(256),
            max_position: 512,
        };
        let distances = [
            0, 1, -1, 127, 128, 129, -129, 200, 300, 511, -511, 1000, 5000,
        ];
        let expected = [0, 1, -1, 127, 128, 129, -129, 169, 207, 255, -255, 317, 465];
        let got: Vec<i64> = distances.iter().map(|&r| v3.bucket(r)).collect();
        assert_eq!(got, expected);
        // The fixtures' settings (16 buckets, 64 positions): the first shared buckets and the far end.
        let tiny = RelativeDistances {
            span: 16,
            buckets: Some(16),
            max_position: 64,
        };
        let got: Vec<i64> = [8, 9, 10, 11, 30, 63, 100, -10, -100]
            .iter()
            .map(|&r| tiny.bucket(r))
            .collect();
        assert_eq!(got, [8, 9, 9, 10, 13, 15, 17, -9, -17]);
        // Rows are clamped to the table: 2·span rows.
        assert_eq!((v3.row(-5000), v3.row(5000)), (0, 511));
        let clamped = RelativeDistances {
            span: 24,
            buckets: None,
            max_position: 24,
        };
        assert_eq!(
            (clamped.bucket(-40), clamped.row(-40), clamped.row(40)),
            (-40, 0, 47)
        );
    }
}
