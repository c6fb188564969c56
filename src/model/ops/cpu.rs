//! The CPU's f32 kernels behind the ops layer: tensor glue around the vectorised row kernels (`vector`) and the
//! packed attention (`attention`), parallel over rows on the engine's thread pool. Each returns None when its
//! inputs are not contiguous-able f32 CPU tensors, and the caller falls back to composed candle operations.

mod attention;
pub mod vector;

use candle_core::{CpuStorage, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::{FeedForwardActivation, LayerNorm};

/// About this many values per parallel task of a row kernel: enough to amortise scheduling, small enough to
/// spread a few hundred rows over every core.
const VALUES_PER_TASK: usize = 16 * 1024;

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

/// Rows of `width` values per parallel task.
fn rows_per_task(width: usize) -> usize {
    (VALUES_PER_TASK / width.max(1)).max(1)
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
    if b.is_empty() || !xs.len().is_multiple_of(b.len()) {
        return None;
    }
    let chunk = rows_per_task(b.len()) * b.len();
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(chunk)
        .zip(xs.par_chunks(chunk))
        .for_each(|(o, rows)| vector::bias_activation(rows, b, activation, o));
    Some(Tensor::from_vec(out, x.shape(), x.device()))
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
    let (xs, b, rs) = (xs.data(), b.data(), rs.data());
    let params = vector::NormParams {
        gain: g.data(),
        shift: be.data(),
        eps: norm.eps,
    };
    let n = b.len();
    if n == 0 || params.gain.len() != n || params.shift.len() != n || !xs.len().is_multiple_of(n) {
        return None;
    }
    let chunk = rows_per_task(n) * n;
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(chunk)
        .zip(xs.par_chunks(chunk).zip(rs.par_chunks(chunk)))
        .for_each(|(o, (x, r))| vector::add_bias_layer_norm(x, b, r, params, o));
    Some(Tensor::from_vec(out, x.shape(), x.device()))
}

/// Self-attention of packed sequences from the fused projection without its bias. qkv: [tokens, 3·hidden];
/// bias: [3·hidden]. Returns [tokens, hidden], or [sequences, hidden] with `first_only`.
pub fn self_attention(
    qkv: &Tensor,
    bias: &Tensor,
    cu_seqlens: &[usize],
    heads: usize,
    first_only: bool,
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[qkv, bias]) {
        return None;
    }
    let (qkv, bias) = (qkv.contiguous().ok()?, bias.contiguous().ok()?);
    let (values, b) = (F32View::of(&qkv)?, F32View::of(&bias)?);
    let (values, b) = (values.data(), b.data());
    let width = b.len();
    if width == 0 || !width.is_multiple_of(3) || !values.len().is_multiple_of(width) {
        return None;
    }
    let chunk = rows_per_task(width) * width;
    let mut biased = vec![0f32; values.len()];
    biased
        .par_chunks_mut(chunk)
        .zip(values.par_chunks(chunk))
        .for_each(|(o, rows)| vector::add_bias(rows, b, o));
    let hidden = width / 3;
    let rows = if first_only {
        cu_seqlens.len().saturating_sub(1)
    } else {
        values.len() / width
    };
    let mut out = vec![0f32; rows * hidden];
    let shape = attention::AttentionShape {
        cu_seqlens,
        hidden,
        heads,
        first_only,
    };
    Some(
        attention::attention(&biased, shape, &mut out)
            .and_then(|()| Tensor::from_vec(out, (rows, hidden), qkv.device())),
    )
}
