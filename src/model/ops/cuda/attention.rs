//! CUDA attention: the fused self-attention kernel over padded batches, and masked softmax attention for the
//! shapes it does not serve.

use super::*;

/// Whether the fused kernel serves this dtype and head size on the compute capability the PTX targets.
fn fused_attention_kernel(dtype: DType, head_dim: usize) -> Option<String> {
    let cap: u32 = COMPUTE_CAP.parse().unwrap_or(0);
    let dtype_ok = match dtype {
        DType::F16 => cap >= 70,
        DType::BF16 => cap >= 80,
        _ => false,
    };
    let suffix = dtype_suffix(dtype).ok()?;
    (dtype_ok && matches!(head_dim, 32 | 64))
        .then(|| format!("attention_fused_d{head_dim}_{suffix}"))
}

fn self_attention_launch<T: CudaDType + DeviceRepr + WithDType>(
    qkv: &Tensor,
    bias: &Tensor,
    lengths: &Tensor,
    dims: AttentionDims,
    kernel: &str,
) -> Result<Tensor> {
    let AttentionDims {
        batch,
        seq,
        heads,
        q_rows,
        head_dim,
    } = dims;
    let hidden = heads * head_dim;
    let inputs = [qkv, bias].map(held);
    let lengths_held = held(lengths);
    let dev = inputs[0].cuda()?.device();
    let (qkv_view, bias_view) = (inputs[0].view::<T>()?, inputs[1].view::<T>()?);
    let lengths_view = lengths_held.view::<u32>()?;
    if qkv_view.len() != batch * seq * 3 * hidden || bias_view.len() != 3 * hidden {
        bail!("self_attention: qkv or bias does not fit {batch}x{seq} with {heads} heads of {head_dim}");
    }
    if lengths_view.len() != batch {
        bail!("{} lengths for a batch of {batch}", lengths_view.len());
    }
    // SAFETY: every element is written by the kernel below (zeros for padding rows).
    let out = unsafe { dev.alloc::<T>(batch * q_rows * hidden)? };
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let config = LaunchConfig {
        grid_dim: (
            q_rows.div_ceil(ATTENTION_Q_TILE) as u32,
            heads as u32,
            batch as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (seq_arg, heads_arg, q_rows_arg) = (seq as i32, heads as i32, q_rows as i32);
    let mut launch = func.builder();
    launch
        .arg(&qkv_view)
        .arg(&bias_view)
        .arg(&lengths_view)
        .arg(&out);
    launch
        .arg(&seq_arg)
        .arg(&heads_arg)
        .arg(&q_rows_arg)
        .arg(&scale);
    // SAFETY: argument types and count match attention_fused_d*_* in kernels/ops.cu; the sizes were checked above.
    unsafe { launch.launch(config) }.w()?;
    Ok(tensor_of(out, dev, Shape::from((batch * q_rows, hidden))))
}

#[derive(Debug, Clone, Copy)]
struct AttentionDims {
    batch: usize,
    seq: usize,
    heads: usize,
    q_rows: usize,
    head_dim: usize,
}

/// The fused attention kernel, or None where it does not apply (fp32 models, head sizes other than 32 and 64),
/// and the caller composes the operation from GEMMs and the masked softmax below.
pub fn self_attention(
    qkv: &Tensor,
    bias: &Tensor,
    lengths: &Tensor,
    seq: usize,
    heads: usize,
    q_rows: usize,
) -> Option<Result<Tensor>> {
    let hidden = qkv.dims().last()? / 3;
    let head_dim = hidden.checked_div(heads)?;
    let kernel = fused_attention_kernel(qkv.dtype(), head_dim)?;
    if bias.dtype() != qkv.dtype() || q_rows > seq || seq == 0 {
        return None;
    }
    let dims = AttentionDims {
        batch: lengths.elem_count(),
        seq,
        heads,
        q_rows,
        head_dim,
    };
    let run = || -> Result<Tensor> {
        let (qkv, bias) = (qkv.contiguous()?, bias.contiguous()?);
        match qkv.dtype() {
            DType::F16 => self_attention_launch::<f16>(&qkv, &bias, lengths, dims, &kernel),
            DType::BF16 => self_attention_launch::<bf16>(&qkv, &bias, lengths, dims, &kernel),
            other => bail!("no fused attention for {other:?}"),
        }
    };
    Some(run())
}

// ---------------------------------------------------------------------------------------------------------
// Masked softmax between the attention GEMMs (the composed path)

fn masked_softmax_launch<T: CudaDType + DeviceRepr + WithDType>(
    scores: &Tensor,
    lengths: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let [batch, heads, q_rows, seq] = scores.dims() else {
        bail!("scores must be [batch, heads, q_rows, seq]")
    };
    let (batch, heads, q_rows, seq) = (*batch, *heads, *q_rows, *seq);
    let (sh, lh) = (held(scores), held(lengths));
    let dev = sh.cuda()?.device();
    let (scores_view, lengths_view) = (sh.view::<f32>()?, lh.view::<u32>()?);
    if lengths_view.len() != batch {
        bail!("{} lengths for a batch of {batch}", lengths_view.len());
    }
    let rows = batch * heads * q_rows;
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * seq)? };
    let func = dev.get_or_load_custom_func(
        &kernel_name("masked_softmax_from_f32", T::DTYPE)?,
        MODULE,
        PTX,
    )?;
    let (rows_per_sequence, seq_arg) = ((heads * q_rows) as i32, seq as i32);
    let mut launch = func.builder();
    launch
        .arg(&scores_view)
        .arg(&lengths_view)
        .arg(&out)
        .arg(&rows_per_sequence)
        .arg(&seq_arg)
        .arg(&scale);
    let config = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and count match masked_softmax_from_f32_* in kernels/ops.cu.
    unsafe { launch.launch(config) }.w()?;
    Ok(tensor_of(out, dev, scores.shape().clone()))
}

/// Attention for a padded batch from separate heads: fp32 cuBLAS GEMMs around our masked softmax kernel.
/// q: [batch, heads, q_rows, head_dim]; k, v: [batch, heads, seq, head_dim]; lengths: [batch] u32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    lengths: &Tensor,
) -> Result<Tensor> {
    // Scores in fp32: fp16 scores would lose about 3 digits before the softmax.
    let scores = q
        .to_dtype(DType::F32)?
        .matmul(&k.to_dtype(DType::F32)?.t()?)?
        .contiguous()?;
    let probs = by_dtype!(q.dtype(), masked_softmax_launch(&scores, lengths, scale))?;
    probs.matmul(v)
}
