//! The CPU's f32 kernels behind the ops layer: linear layers as one GEMM with their epilogue applied in place
//! (f32 through the `gemm` library, or bf16 on AMX tiles, `amx`), the vectorised row kernels (`vector`) and the
//! packed attention (`attention`), all parallel on the engine's thread pool. Each returns None when its inputs
//! are not f32 CPU tensors, and the caller falls back to composed candle operations.

pub mod amx;
mod attention;
pub mod causal;
mod rows;
pub mod vector;

use candle_core::{CpuStorage, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::{FeedForwardActivation, LayerNorm, Linear};

/// An output buffer that parallel tasks share, each writing only its own disjoint block of it (the users say
/// which blocks).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every user gives each task a block of the buffer no other task writes, and nothing reads the buffer
// until all tasks have finished.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so closures capture the whole (Sync) wrapper rather than its raw pointer field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

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

/// x·Wᵀ for x [rows, k] and W [n, k] (row-major, as checkpoints store it), into a fresh [rows, n] buffer that
/// is not zeroed first: the GEMM writes every element without reading it.
fn matmul(x: &[f32], rows: usize, weight: &[f32], n: usize) -> Option<Vec<f32>> {
    let k = weight.len().checked_div(n)?;
    if x.len() != rows * k || weight.len() != n * k {
        return None;
    }
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    // SAFETY: dst is rows × n row-major inside `out`'s capacity, lhs is rows × k row-major in `x`, rhs = Wᵀ is
    // read from W [n, k] with row stride 1 and column stride k; all sizes were checked above. With read_dst
    // false the GEMM writes every dst element (alpha is ignored), so after it the first rows × n are initialised.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
        out.set_len(rows * n);
    }
    Some(out)
}

/// A linear layer's GEMM on an f32 CPU input: (output buffer, rows, bias). Layers packed for AMX run there
/// in bf16 with fp32 sums; the others through the f32 GEMM.
fn linear_gemm<'a>(layer: &'a Linear, x: &Tensor) -> Option<(Vec<f32>, usize, F32View<'a>)> {
    if !is_cpu_f32(&[x, &layer.weight, &layer.bias]) {
        return None;
    }
    let x = x.contiguous().ok()?;
    let (rows, _) = x.dims2().ok()?;
    let (n, _) = layer.weight.dims2().ok()?;
    let (xs, b) = (F32View::of(&x)?, F32View::of(&layer.bias)?);
    if b.data().len() != n {
        return None;
    }
    if let Some(packed) = &layer.bf16_tiles {
        if let Some(out) = amx::matmul(xs.data(), rows, packed) {
            return Some((out, rows, b));
        }
    }
    let w = F32View::of(&layer.weight)?;
    Some((matmul(xs.data(), rows, w.data(), n)?, rows, b))
}

/// x·Wᵀ + b, the bias added in place on the GEMM's output.
pub fn linear(layer: &Linear, x: &Tensor) -> Option<Result<Tensor>> {
    let (mut out, rows, bias) = linear_gemm(layer, x)?;
    let bias = bias.data();
    out.par_chunks_mut(rows_per_task(bias.len()) * bias.len())
        .for_each(|o| vector::add_bias(o, bias));
    Some(Tensor::from_vec(out, (rows, bias.len()), x.device()))
}

/// act(x·Wᵀ + b), the epilogue applied in place on the GEMM's output.
pub fn linear_activation(
    layer: &Linear,
    x: &Tensor,
    activation: FeedForwardActivation,
) -> Option<Result<Tensor>> {
    let (mut out, rows, bias) = linear_gemm(layer, x)?;
    let bias = bias.data();
    out.par_chunks_mut(rows_per_task(bias.len()) * bias.len())
        .for_each(|o| vector::bias_activation(o, bias, activation));
    Some(Tensor::from_vec(out, (rows, bias.len()), x.device()))
}

/// LayerNorm(x·Wᵀ + b + residual), in place on the GEMM's output. residual: [rows, n] f32.
pub fn linear_residual_norm(
    layer: &Linear,
    x: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[residual, &norm.weight, &norm.bias]) {
        return None;
    }
    let residual = residual.contiguous().ok()?;
    let views = [&residual, &norm.weight, &norm.bias].map(F32View::of);
    let [Some(r), Some(g), Some(s)] = &views else {
        return None;
    };
    let (mut out, rows, bias) = linear_gemm(layer, x)?;
    let (bias, r) = (bias.data(), r.data());
    let params = vector::NormParams {
        gain: g.data(),
        shift: s.data(),
        eps: norm.eps,
    };
    let n = bias.len();
    if r.len() != out.len() || params.gain.len() != n || params.shift.len() != n {
        return None;
    }
    let chunk = rows_per_task(n) * n;
    out.par_chunks_mut(chunk)
        .zip(r.par_chunks(chunk))
        .for_each(|(o, r)| vector::add_bias_layer_norm(o, bias, r, params));
    Some(Tensor::from_vec(out, (rows, n), x.device()))
}

/// Self-attention of packed sequences straight from the hidden state: the fused QKV GEMM, its bias in place,
/// then attention per (sequence, head). x: [tokens, hidden]. Returns [tokens, hidden], or [sequences, hidden]
/// with `first_only`.
pub fn projected_self_attention(
    qkv: &Linear,
    x: &Tensor,
    cu_seqlens: &[usize],
    heads: usize,
    first_only: bool,
) -> Option<Result<Tensor>> {
    let (mut projected, tokens, bias) = linear_gemm(qkv, x)?;
    let bias = bias.data();
    let width = bias.len();
    if !width.is_multiple_of(3) || cu_seqlens.last() != Some(&tokens) {
        return None;
    }
    projected
        .par_chunks_mut(rows_per_task(width) * width)
        .for_each(|o| vector::add_bias(o, bias));
    Some(attend(
        &projected,
        tokens,
        width / 3,
        cu_seqlens,
        heads,
        first_only,
        x.device(),
    ))
}

/// Runs the packed attention over a biased [tokens, 3·hidden] projection.
fn attend(
    projected: &[f32],
    tokens: usize,
    hidden: usize,
    cu_seqlens: &[usize],
    heads: usize,
    first_only: bool,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let rows = if first_only {
        cu_seqlens.len().saturating_sub(1)
    } else {
        tokens
    };
    // Zeroed: a sequence of no tokens (never sent, but possible in the type) leaves its rows unwritten.
    let mut out = vec![0f32; rows * hidden];
    let shape = attention::AttentionShape {
        cu_seqlens,
        hidden,
        heads,
        first_only,
    };
    attention::attention(projected, shape, &mut out)?;
    Tensor::from_vec(out, (rows, hidden), device)
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
    let mut out = xs.to_vec();
    out.par_chunks_mut(rows_per_task(b.len()) * b.len())
        .for_each(|o| vector::bias_activation(o, b, activation));
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
    let mut out = xs.to_vec();
    out.par_chunks_mut(chunk)
        .zip(rs.par_chunks(chunk))
        .for_each(|(o, r)| vector::add_bias_layer_norm(o, b, r, params));
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
    let mut biased = values.to_vec();
    biased
        .par_chunks_mut(rows_per_task(width) * width)
        .for_each(|o| vector::add_bias(o, b));
    let tokens = values.len() / width;
    Some(attend(
        &biased,
        tokens,
        width / 3,
        cu_seqlens,
        heads,
        first_only,
        qkv.device(),
    ))
}

/// Q and K of a fused [tokens, 3·hidden] projection rotated by [tokens, head_dim/2] cos and sin tables.
pub fn rotate_qk(
    qkv: &Tensor,
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[qkv, cos, sin]) {
        return None;
    }
    let (tokens, width) = qkv.dims2().ok()?;
    let (cos, sin) = (cos.contiguous().ok()?, sin.contiguous().ok()?);
    let qkv = qkv.contiguous().ok()?;
    let views = [&qkv, &cos, &sin].map(F32View::of);
    let [Some(values), Some(c), Some(s)] = &views else {
        return None;
    };
    let (half, hidden) = (head_dim / 2, width / 3);
    let shapes_agree = width.is_multiple_of(3)
        && half > 0
        && head_dim.is_multiple_of(2)
        && hidden.is_multiple_of(head_dim)
        && c.data().len() == tokens * half
        && s.data().len() == tokens * half;
    if !shapes_agree {
        return None;
    }
    let mut rotated = values.data().to_vec();
    rows::rotate_qk(&mut rotated, width / 3, head_dim, c.data(), s.data());
    Some(Tensor::from_vec(rotated, (tokens, width), qkv.device()))
}

/// act(one half) · the other half of each row of x [rows, 2·n].
pub fn gated_activation(
    x: &Tensor,
    activated_first: bool,
    activation: FeedForwardActivation,
) -> Option<Result<Tensor>> {
    if !is_cpu_f32(&[x]) {
        return None;
    }
    let (rows, width) = x.dims2().ok()?;
    let x = x.contiguous().ok()?;
    let values = F32View::of(&x)?;
    let n = width / 2;
    if width != 2 * n || n == 0 {
        return None;
    }
    let out = rows::gated_activation(values.data(), n, activated_first, activation);
    Some(Tensor::from_vec(out, (rows, n), x.device()))
}
