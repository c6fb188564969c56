//! Fused f32 CPU kernels, parallel over rows. Each returns None when its inputs are not f32 tensors on the
//! CPU, and the caller falls back to composed candle operations.

use candle_core::{CpuStorage, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::{FeedForwardActivation, LayerNorm};

/// Borrowed f32 data of a contiguous CPU tensor.
struct F32View<'a> {
    storage: StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> F32View<'a> {
    fn of(t: &'a Tensor) -> Option<Self> {
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))).then_some(Self {
            storage,
            range: start..end,
        })
    }

    fn data(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.range.clone()],
            _ => &[],
        }
    }
}

fn is_cpu_f32(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: FeedForwardActivation,
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[x, bias]) {
        return None;
    }
    let (x, bias) = (x.contiguous().ok()?, bias.contiguous().ok()?);
    let (xs, b) = (F32View::of(&x)?, F32View::of(&bias)?);
    let (xs, b) = (xs.data(), b.data());
    if b.is_empty() || xs.len() % b.len() != 0 {
        return None;
    }
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(b.len())
        .zip(xs.par_chunks(b.len()))
        .for_each(|(o, row)| {
            for ((o, &v), &b) in o.iter_mut().zip(row).zip(b) {
                *o = activate(v + b, activation);
            }
        });
    Some(Tensor::from_vec(out, x.shape(), x.device()))
}

fn activate(v: f32, activation: FeedForwardActivation) -> f32 {
    match activation {
        FeedForwardActivation::GeluErf => {
            0.5 * v * (1.0 + candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2))
        }
        FeedForwardActivation::GeluTanh => {
            let inner = 0.797_884_6 * (v + 0.044_715 * v * v * v);
            0.5 * v * (1.0 + inner.tanh())
        }
        FeedForwardActivation::Relu => v.max(0.0),
    }
}

pub fn add_bias_layer_norm(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[x, bias, residual, &norm.weight, &norm.bias]) || x.shape() != residual.shape()
    {
        return None;
    }
    let (x, residual) = (x.contiguous().ok()?, residual.contiguous().ok()?);
    let views = [&x, bias, &residual, &norm.weight, &norm.bias].map(F32View::of);
    let [Some(xs), Some(b), Some(rs), Some(g), Some(be)] = &views else {
        return None;
    };
    let (xs, b, rs, g, be) = (xs.data(), b.data(), rs.data(), g.data(), be.data());
    let n = b.len();
    if n == 0 || g.len() != n || be.len() != n || xs.len() % n != 0 {
        return None;
    }
    let eps = norm.eps;
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(n)
        .zip(xs.par_chunks(n).zip(rs.par_chunks(n)))
        .for_each(|(o, (x, r))| {
            for (((o, x), r), b) in o.iter_mut().zip(x).zip(r).zip(b) {
                *o = x + b + r;
            }
            let mean = o.iter().sum::<f32>() / n as f32;
            let var = o.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((o, g), be) in o.iter_mut().zip(g).zip(be) {
                *o = (*o - mean) * inv * g + be;
            }
        });
    Some(Tensor::from_vec(out, x.shape(), x.device()))
}

/// Fused attention: for each (sequence, head) in parallel and each query row, the scores against the real
/// keys, their softmax and the weighted sum of values, without materialising the score matrix. Padding
/// keys are skipped, not masked. q: [batch, heads, q_rows, head_dim]; k, v: [batch, heads, seq, head_dim].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    lengths: &[usize],
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[q, k, v]) {
        return None;
    }
    let (batch, heads, q_rows, head_dim) = q.dims4().ok()?;
    let seq = k.dim(2).ok()?;
    if batch != lengths.len()
        || seq == 0
        || k.dims4().ok()? != (batch, heads, seq, head_dim)
        || k.shape() != v.shape()
    {
        return None;
    }
    // Keys transposed to [head_dim, seq] per head, so each score row accumulates over contiguous memory.
    let (q, k_t, v) = (
        q.contiguous().ok()?,
        k.transpose(2, 3).ok()?.contiguous().ok()?,
        v.contiguous().ok()?,
    );
    let (qs, ks, vs) = (F32View::of(&q)?, F32View::of(&k_t)?, F32View::of(&v)?);
    let (qs, ks, vs) = (qs.data(), ks.data(), vs.data());
    let mut out = vec![0f32; batch * heads * q_rows * head_dim];
    let dims = HeadDims {
        seq,
        head_dim,
        scale,
    };
    out.par_chunks_mut(q_rows * head_dim)
        .enumerate()
        .for_each(|(bh, out)| {
            let len = lengths[bh / heads].clamp(1, seq);
            let q = &qs[bh * q_rows * head_dim..][..q_rows * head_dim];
            let k_t = &ks[bh * head_dim * seq..][..head_dim * seq];
            let v = &vs[bh * seq * head_dim..][..seq * head_dim];
            attend_one_head(q, k_t, v, len, dims, out);
        });
    Some(Tensor::from_vec(
        out,
        (batch, heads, q_rows, head_dim),
        q.device(),
    ))
}

#[derive(Clone, Copy)]
struct HeadDims {
    seq: usize,
    head_dim: usize,
    scale: f32,
}

/// One head's attention over its first `len` keys, row by row.
fn attend_one_head(q: &[f32], k_t: &[f32], v: &[f32], len: usize, dims: HeadDims, out: &mut [f32]) {
    let HeadDims {
        seq,
        head_dim,
        scale,
    } = dims;
    let mut scores = vec![0f32; len];
    for (q_row, out_row) in q.chunks_exact(head_dim).zip(out.chunks_exact_mut(head_dim)) {
        scores.fill(0.0);
        for (&q_d, k_row) in q_row.iter().zip(k_t.chunks_exact(seq)) {
            let q_d = q_d * scale;
            for (score, &k) in scores.iter_mut().zip(&k_row[..len]) {
                *score += q_d * k;
            }
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        let inv = 1.0 / sum;
        for (&p, v_row) in scores.iter().zip(v.chunks_exact(head_dim)) {
            let p = p * inv;
            for (o, &v) in out_row.iter_mut().zip(v_row) {
                *o += p * v;
            }
        }
    }
}
