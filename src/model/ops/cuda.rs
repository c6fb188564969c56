//! CUDA implementations of the encoder operations: our kernels (kernels/ops.cu, compiled to PTX by build.rs)
//! launched on the stream of the tensors' device, fp16/bf16/fp32 in memory with fp32 arithmetic inside.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use half::{bf16, f16};

use super::{EmbeddingTables, FeedForwardActivation, LayerNorm};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
const MODULE: &str = "rerank_ops";
/// Threads per block for the row kernels (LayerNorm rows, softmax rows).
const ROW_THREADS: u32 = 256;

/// The PTX function of a kernel for a dtype, e.g. `bias_act_f16`.
fn kernel_name(name: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        other => bail!("our CUDA kernels take f16, bf16 or f32, not {other:?}"),
    };
    Ok(format!("{name}_{suffix}"))
}

/// The contiguous region of a CUDA storage a layout describes.
fn view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("our CUDA kernels need contiguous inputs")
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// Runs `f` with the CUDA storage of a tensor held by an op (a weight, not an op input).
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(storage) => f(storage, layout),
        _ => bail!("weight is not on the CUDA device"),
    }
}

fn rows_and_cols(layout: &Layout) -> Result<(usize, usize)> {
    let cols = layout.shape().dims().last().copied().unwrap_or(0);
    if cols == 0 {
        bail!("empty last dimension");
    }
    Ok((layout.shape().elem_count() / cols, cols))
}

fn row_config(rows: usize, shared_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: (shared_floats * std::mem::size_of::<f32>()) as u32,
    }
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            other => bail!("our CUDA kernels take f16, bf16 or f32, not {other:?}"),
        }
    };
}

fn cpu_unsupported() -> Result<(CpuStorage, Shape)> {
    bail!("CUDA-only operation called on CPU tensors")
}

// ---------------------------------------------------------------------------------------------------------
// act(x + bias)

fn activation_code(activation: FeedForwardActivation) -> i32 {
    match activation {
        FeedForwardActivation::GeluErf => 0,
        FeedForwardActivation::GeluTanh => 1,
        FeedForwardActivation::Relu => 2,
    }
}

/// Activation code of the kernel's tanh epilogue (the pooler / RoBERTa head).
pub const TANH: i32 = 3;

fn bias_act_launch<T: CudaDType + DeviceRepr>(
    x: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    act: i32,
) -> Result<CudaStorage> {
    let dev = x.0.device();
    let (rows, cols) = rows_and_cols(x.1)?;
    let total = rows * cols;
    let (xs, bs) = (view::<T>(x.0, x.1)?, view::<T>(bias.0, bias.1)?);
    if bs.len() != cols {
        bail!("bias has {} values for rows of {cols}", bs.len());
    }
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(total)? };
    let func = dev.get_or_load_custom_func(&kernel_name("bias_act", x.0.dtype())?, MODULE, PTX)?;
    let blocks = total.div_ceil(256).min(65_535 * 8) as u32;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = func.builder();
    let (total, cols) = (total as u64, cols as i32);
    launch
        .arg(&xs)
        .arg(&bs)
        .arg(&out)
        .arg(&total)
        .arg(&cols)
        .arg(&act);
    // SAFETY: argument types and count match bias_act_* in kernels/ops.cu.
    unsafe { launch.launch(config) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

struct BiasActOp(i32);

impl CustomOp2 for BiasActOp {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported()
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(x.dtype(), bias_act_launch((x, xl), (b, bl), self.0))?;
        Ok((out, xl.shape().clone()))
    }
}

pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: FeedForwardActivation,
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &BiasActOp(activation_code(activation)))
}

pub fn bias_tanh(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &BiasActOp(TANH))
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm(x + bias + residual)

struct AddBiasLayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}

fn add_bias_layer_norm_launch<T: CudaDType + DeviceRepr>(
    op: &AddBiasLayerNorm,
    x: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    residual: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = x.0.device();
    let (rows, cols) = rows_and_cols(x.1)?;
    let (xs, bs, rs) = (
        view::<T>(x.0, x.1)?,
        view::<T>(bias.0, bias.1)?,
        view::<T>(residual.0, residual.1)?,
    );
    if bs.len() != cols || rs.len() != rows * cols {
        bail!(
            "add_bias_layer_norm: bias {} and residual {} do not fit rows of {cols}",
            bs.len(),
            rs.len()
        );
    }
    with_cuda(&op.gamma, |g, gl| {
        with_cuda(&op.beta, |b, bl| {
            let (gamma, beta) = (view::<T>(g, gl)?, view::<T>(b, bl)?);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<T>(rows * cols)? };
            let func = dev.get_or_load_custom_func(
                &kernel_name("add_bias_layer_norm", x.0.dtype())?,
                MODULE,
                PTX,
            )?;
            let mut launch = func.builder();
            let cols = cols as i32;
            launch
                .arg(&xs)
                .arg(&bs)
                .arg(&rs)
                .arg(&gamma)
                .arg(&beta)
                .arg(&out)
                .arg(&cols)
                .arg(&op.eps);
            // SAFETY: argument types and count match add_bias_layer_norm_* in kernels/ops.cu.
            unsafe { launch.launch(row_config(rows, cols as usize)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    })
}

impl CustomOp3 for AddBiasLayerNorm {
    fn name(&self) -> &'static str {
        "add-bias-layer-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported()
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(
            x.dtype(),
            add_bias_layer_norm_launch(self, (x, xl), (b, bl), (r, rl))
        )?;
        Ok((out, xl.shape().clone()))
    }
}

pub fn add_bias_layer_norm(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Result<Tensor> {
    let op = AddBiasLayerNorm {
        gamma: norm.weight.contiguous()?,
        beta: norm.bias.contiguous()?,
        eps: norm.eps,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&bias.contiguous()?, &residual.contiguous()?, &op)
}

// ---------------------------------------------------------------------------------------------------------
// Embedding gather + LayerNorm

struct EmbedLayerNorm {
    tables: EmbeddingTables,
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}

fn embed_launch<T: CudaDType + DeviceRepr>(
    op: &EmbedLayerNorm,
    ids: (&CudaStorage, &Layout),
    positions: (&CudaStorage, &Layout),
    types: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = ids.0.device();
    let tokens = ids.1.shape().elem_count();
    let hidden = op.tables.word.dim(1)?;
    let (id_view, pos_view, type_view) = (
        view::<u32>(ids.0, ids.1)?,
        view::<u32>(positions.0, positions.1)?,
        view::<u32>(types.0, types.1)?,
    );
    let Some(type_table) = &op.tables.token_type else {
        bail!("the CUDA embedding kernel needs a token type table")
    };
    with_cuda(&op.tables.word, |w, wl| {
        with_cuda(&op.tables.position, |p, pl| {
            with_cuda(type_table, |t, tl| {
                with_cuda(&op.gamma, |g, gl| {
                    with_cuda(&op.beta, |b, bl| {
                        let (word, position, token_type) =
                            (view::<T>(w, wl)?, view::<T>(p, pl)?, view::<T>(t, tl)?);
                        let (gamma, beta) = (view::<T>(g, gl)?, view::<T>(b, bl)?);
                        // SAFETY: every element is written by the kernel below.
                        let out = unsafe { dev.alloc::<T>(tokens * hidden)? };
                        let func = dev.get_or_load_custom_func(
                            &kernel_name("embed_layer_norm", w.dtype())?,
                            MODULE,
                            PTX,
                        )?;
                        let mut launch = func.builder();
                        let hidden_arg = hidden as i32;
                        launch.arg(&id_view).arg(&pos_view).arg(&type_view);
                        launch
                            .arg(&word)
                            .arg(&position)
                            .arg(&token_type)
                            .arg(&gamma)
                            .arg(&beta)
                            .arg(&out);
                        launch.arg(&hidden_arg).arg(&op.eps);
                        // SAFETY: argument types and count match embed_layer_norm_* in kernels/ops.cu; ids were
                        // checked against the table sizes by the caller.
                        unsafe { launch.launch(row_config(tokens, hidden)) }.w()?;
                        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
                    })
                })
            })
        })
    })
}

impl CustomOp3 for EmbedLayerNorm {
    fn name(&self) -> &'static str {
        "embed-layer-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported()
    }

    fn cuda_fwd(
        &self,
        ids: &CudaStorage,
        il: &Layout,
        pos: &CudaStorage,
        pl: &Layout,
        types: &CudaStorage,
        tl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(
            self.tables.word.dtype(),
            embed_launch(self, (ids, il), (pos, pl), (types, tl))
        )?;
        Ok((
            out,
            Shape::from((il.shape().elem_count(), self.tables.word.dim(1)?)),
        ))
    }
}

/// Ids index the tables inside the kernel: callers check them against the table sizes first
/// (`LoadedModel::logits`, the architectures' forward).
pub fn embed(
    tables: &EmbeddingTables,
    input_ids: &Tensor,
    position_ids: &Tensor,
    type_ids: &Tensor,
    norm: &LayerNorm,
) -> Result<Tensor> {
    let op = EmbedLayerNorm {
        tables: tables.clone(),
        gamma: norm.weight.clone(),
        beta: norm.bias.clone(),
        eps: norm.eps,
    };
    input_ids.contiguous()?.apply_op3_no_bwd(
        &position_ids.contiguous()?,
        &type_ids.contiguous()?,
        &op,
    )
}

// ---------------------------------------------------------------------------------------------------------
// Masked softmax between the attention GEMMs

struct MaskedSoftmax {
    scale: f32,
    /// dtype of the probabilities; the scores may be f32 for precision.
    out_dtype: DType,
}

fn masked_softmax_launch<T: CudaDType + DeviceRepr>(
    op: &MaskedSoftmax,
    scores: (&CudaStorage, &Layout),
    lengths: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = scores.0.device();
    let dims = scores.1.shape().dims();
    let [batch, heads, q_rows, seq] = dims else {
        bail!("scores must be [batch, heads, q_rows, seq]")
    };
    let lengths_view = view::<u32>(lengths.0, lengths.1)?;
    if lengths_view.len() != *batch {
        bail!("{} lengths for a batch of {batch}", lengths_view.len());
    }
    let rows = batch * heads * q_rows;
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * seq)? };
    let (rows_per_sequence, seq_arg) = ((heads * q_rows) as i32, *seq as i32);
    if scores.0.dtype() == DType::F32 && op.out_dtype != DType::F32 {
        let scores_view = view::<f32>(scores.0, scores.1)?;
        let func = dev.get_or_load_custom_func(
            &kernel_name("masked_softmax_from_f32", op.out_dtype)?,
            MODULE,
            PTX,
        )?;
        let mut launch = func.builder();
        launch
            .arg(&scores_view)
            .arg(&lengths_view)
            .arg(&out)
            .arg(&rows_per_sequence)
            .arg(&seq_arg)
            .arg(&op.scale);
        // SAFETY: argument types and count match masked_softmax_from_f32_* in kernels/ops.cu.
        unsafe { launch.launch(row_config(rows, 0)) }.w()?;
    } else {
        let scores_view = view::<T>(scores.0, scores.1)?;
        let func = dev.get_or_load_custom_func(
            &kernel_name("masked_softmax", op.out_dtype)?,
            MODULE,
            PTX,
        )?;
        let mut launch = func.builder();
        launch
            .arg(&scores_view)
            .arg(&lengths_view)
            .arg(&out)
            .arg(&rows_per_sequence)
            .arg(&seq_arg)
            .arg(&op.scale);
        // SAFETY: argument types and count match masked_softmax_* in kernels/ops.cu.
        unsafe { launch.launch(row_config(rows, 0)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported()
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        sl: &Layout,
        l: &CudaStorage,
        ll: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(
            self.out_dtype,
            masked_softmax_launch(self, (s, sl), (l, ll))
        )?;
        Ok((out, sl.shape().clone()))
    }
}

/// Attention for a padded batch: cuBLAS batched GEMMs around our masked softmax kernel.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    lengths: &[usize],
) -> Result<Tensor> {
    let lengths: Vec<u32> = lengths.iter().map(|&l| l as u32).collect();
    let lengths = Tensor::from_vec(lengths, q.dim(0)?, q.device())?;
    // Scores in fp32 (TF32 tensor cores for half-precision models, see `engine`): fp16 scores would lose
    // about 3 digits before the softmax, where fused attention kernels keep them in fp32 registers.
    let scores = q
        .to_dtype(DType::F32)?
        .matmul(&k.to_dtype(DType::F32)?.t()?)?;
    let probs = scores.apply_op2_no_bwd(
        &lengths,
        &MaskedSoftmax {
            scale,
            out_dtype: q.dtype(),
        },
    )?;
    probs.matmul(v)
}
