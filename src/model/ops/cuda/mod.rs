//! CUDA implementations of the encoder operations: our kernels (kernels/ops.cu, compiled to PTX by build.rs)
//! launched on the stream of the tensors' device; the model dtype (fp16, bf16 or fp32) in memory for GEMM
//! operands, fp32 for the residual stream, fp32 arithmetic inside.

use std::ops::Deref;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use half::{bf16, f16};

use super::{EmbeddingTables, FeedForwardActivation, Hidden, LayerNorm};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
const MODULE: &str = "rerank_ops";
/// The compute capability the PTX was built for (build.rs, CUDA_COMPUTE_CAP).
const COMPUTE_CAP: &str = env!("RERANK_CUDA_COMPUTE_CAP");
/// Threads per block for one-row-per-block kernels.
const ROW_THREADS: u32 = 256;
/// Rows per block (one warp each) for the LayerNorm kernels; rows up to WARP_ROW_MAX values.
const WARP_ROWS: u32 = 4;
const WARP_ROW_MAX: usize = 1024;
/// Query rows per block of the fused attention kernel.
const ATTENTION_Q_TILE: usize = 64;

/// The PTX function of a kernel for a dtype, e.g. `bias_act_f16`.
fn kernel_name(name: &str, dtype: DType) -> Result<String> {
    Ok(format!("{name}_{}", dtype_suffix(dtype)?))
}

fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        DType::F32 => Ok("f32"),
        other => bail!("our CUDA kernels take f16, bf16 or f32, not {other:?}"),
    }
}

/// A tensor's storage, held (read-locked) for the duration of a launch.
struct Held<'a, G: Deref<Target = Storage>> {
    storage: G,
    layout: &'a Layout,
}

fn held(t: &Tensor) -> Held<'_, impl Deref<Target = Storage> + '_> {
    let (storage, layout) = t.storage_and_layout();
    Held { storage, layout }
}

impl<G: Deref<Target = Storage>> Held<'_, G> {
    fn cuda(&self) -> Result<&CudaStorage> {
        match &*self.storage {
            Storage::Cuda(storage) => Ok(storage),
            _ => bail!("tensor is not on the CUDA device"),
        }
    }

    /// Whether the tensor starts at a multiple of `elements` in its storage (allocations are 256-byte aligned).
    fn starts_aligned(&self, elements: usize) -> bool {
        self.layout
            .contiguous_offsets()
            .is_some_and(|(start, _)| start.is_multiple_of(elements))
    }

    /// The contiguous region of the storage this tensor covers.
    fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        let Some((start, end)) = self.layout.contiguous_offsets() else {
            bail!("our CUDA kernels need contiguous inputs")
        };
        Ok(self.cuda()?.as_cuda_slice::<T>()?.slice(start..end))
    }
}

fn tensor_of<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn rows_and_cols(t: &Tensor) -> Result<(usize, usize)> {
    let cols = t.dims().last().copied().unwrap_or(0);
    if cols == 0 {
        bail!("empty last dimension");
    }
    Ok((t.elem_count() / cols, cols))
}

/// One warp per row, WARP_ROWS rows per block.
fn warp_rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(WARP_ROWS), 1, 1),
        block_dim: (WARP_ROWS * 32, 1, 1),
        shared_mem_bytes: 0,
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

/// The half-precision output of a LayerNorm kernel, or None for an fp32 model (whose GEMMs read the fp32 output).
fn gemm_output<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    len: usize,
) -> Result<Option<CudaSlice<T>>> {
    if T::DTYPE == DType::F32 {
        return Ok(None);
    }
    // SAFETY: every element is written by the LayerNorm kernel that receives it.
    Ok(Some(unsafe { dev.alloc::<T>(len)? }))
}

/// The pair of LayerNorm outputs as a Hidden state.
fn hidden_of<T: CudaDType>(
    dev: &CudaDevice,
    residual: CudaSlice<f32>,
    input: Option<CudaSlice<T>>,
    shape: Shape,
) -> Hidden {
    let residual = tensor_of(residual, dev, shape.clone());
    let input = match input {
        Some(input) => tensor_of(input, dev, shape),
        None => residual.clone(),
    };
    Hidden { residual, input }
}

// ---------------------------------------------------------------------------------------------------------
// act(x + bias)

fn activation_code(activation: FeedForwardActivation) -> i32 {
    match activation {
        FeedForwardActivation::GeluErf => 0,
        FeedForwardActivation::GeluTanh => 1,
        FeedForwardActivation::Relu => 2,
        FeedForwardActivation::Silu => 4,
    }
}

/// Activation code of the kernel's tanh epilogue (the pooler / RoBERTa head).
const TANH: i32 = 3;

fn bias_act_launch<T: CudaDType + DeviceRepr + WithDType>(
    x: &Tensor,
    bias: &Tensor,
    act: i32,
) -> Result<Tensor> {
    let (rows, cols) = rows_and_cols(x)?;
    let (xh, bh) = (held(x), held(bias));
    let dev = xh.cuda()?.device();
    let (xs, bs) = (xh.view::<T>()?, bh.view::<T>()?);
    if bs.len() != cols {
        bail!("bias has {} values for rows of {cols}", bs.len());
    }
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * cols)? };
    // 16-byte vectors where rows and both inputs are aligned to them.
    let vec = 16 / std::mem::size_of::<T>();
    let vectorized = cols.is_multiple_of(vec) && xh.starts_aligned(vec) && bh.starts_aligned(vec);
    let (name, per_thread) = if vectorized {
        ("bias_act_vec", vec)
    } else {
        ("bias_act", 1)
    };
    let func = dev.get_or_load_custom_func(&kernel_name(name, T::DTYPE)?, MODULE, PTX)?;
    let threads_per_row = cols.div_ceil(per_thread) as u32;
    let config = LaunchConfig {
        grid_dim: (rows as u32, threads_per_row.div_ceil(ROW_THREADS), 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = func.builder();
    let cols_arg = cols as i32;
    launch.arg(&xs).arg(&bs).arg(&out).arg(&cols_arg).arg(&act);
    // SAFETY: argument types and count match bias_act(_vec)_* in kernels/ops.cu; the vector form reads whole
    // 16-byte vectors, which the alignment check above guarantees.
    unsafe { launch.launch(config) }.w()?;
    Ok(tensor_of(out, dev, x.shape().clone()))
}

fn bias_act(x: &Tensor, bias: &Tensor, act: i32) -> Result<Tensor> {
    let (x, bias) = (x.contiguous()?, bias.contiguous()?);
    if bias.dtype() != x.dtype() {
        bail!("bias is {:?} for an input of {:?}", bias.dtype(), x.dtype());
    }
    by_dtype!(x.dtype(), bias_act_launch(&x, &bias, act))
}

pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: FeedForwardActivation,
) -> Result<Tensor> {
    bias_act(x, bias, activation_code(activation))
}

pub fn bias_tanh(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    bias_act(x, bias, TANH)
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm(x + bias + residual)

fn add_bias_layer_norm_launch<T: CudaDType + DeviceRepr + WithDType>(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Result<Hidden> {
    let (rows, cols) = rows_and_cols(x)?;
    let inputs = [x, bias, residual, &norm.weight, &norm.bias].map(held);
    let [xh, bh, rh, gh, beh] = &inputs;
    let dev = xh.cuda()?.device();
    let (xs, bs, rs) = (xh.view::<T>()?, bh.view::<T>()?, rh.view::<f32>()?);
    let (gamma, beta) = (gh.view::<f32>()?, beh.view::<f32>()?);
    if bs.len() != cols || rs.len() != rows * cols || gamma.len() != cols || beta.len() != cols {
        bail!(
            "add_bias_layer_norm: bias, residual or LayerNorm parameters do not fit rows of {cols}"
        );
    }
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(rows * cols)? };
    let gemm_out = gemm_output::<T>(dev, rows * cols)?;
    let null = 0u64;
    let (rows_arg, cols_arg) = (rows as i32, cols as i32);
    let wide = cols > WARP_ROW_MAX;
    // Four values per access where rows are multiples of 128 and every input starts on four elements.
    let vectorized =
        !wide && cols.is_multiple_of(128) && inputs.iter().all(|input| input.starts_aligned(4));
    let name = match (wide, vectorized) {
        (true, _) => "add_bias_layer_norm_wide",
        (false, true) => "add_bias_layer_norm_vec",
        (false, false) => "add_bias_layer_norm",
    };
    let func = dev.get_or_load_custom_func(&kernel_name(name, T::DTYPE)?, MODULE, PTX)?;
    let mut launch = func.builder();
    launch
        .arg(&xs)
        .arg(&bs)
        .arg(&rs)
        .arg(&gamma)
        .arg(&beta)
        .arg(&out);
    match &gemm_out {
        Some(gemm_out) => launch.arg(gemm_out),
        None => launch.arg(&null),
    };
    let config = if wide {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (cols * std::mem::size_of::<f32>()) as u32,
        }
    } else {
        launch.arg(&rows_arg);
        warp_rows_config(rows)
    };
    launch.arg(&cols_arg).arg(&norm.eps);
    // SAFETY: argument types and count match add_bias_layer_norm(_vec|_wide)_* in kernels/ops.cu; the output
    // pointer for the model dtype may be null (fp32 models); the vector form's alignment was checked above.
    unsafe { launch.launch(config) }.w()?;
    Ok(hidden_of(dev, out, gemm_out, x.shape().clone()))
}

/// None when the inputs do not suit the kernel (the caller composes the operation instead).
pub fn add_bias_layer_norm(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Option<Result<Hidden>> {
    let fits = bias.dtype() == x.dtype()
        && residual.dtype() == DType::F32
        && norm.weight.dtype() == DType::F32
        && norm.bias.dtype() == DType::F32
        && residual.shape() == x.shape();
    if !fits {
        return None;
    }
    let run = || -> Result<Hidden> {
        let (x, bias, residual) = (x.contiguous()?, bias.contiguous()?, residual.contiguous()?);
        by_dtype!(
            x.dtype(),
            add_bias_layer_norm_launch(&x, &bias, &residual, norm)
        )
    };
    Some(run())
}

// ---------------------------------------------------------------------------------------------------------
// Embedding gather + LayerNorm

fn embed_launch<T: CudaDType + DeviceRepr + WithDType>(
    tables: &EmbeddingTables,
    type_table: &Tensor,
    ids: [&Tensor; 3],
    norm: &LayerNorm,
) -> Result<Hidden> {
    let tokens = ids[0].elem_count();
    let hidden = tables.word.dim(1)?;
    let id_held = ids.map(held);
    let table_held = [&tables.word, &tables.position, type_table].map(held);
    let norm_held = [&norm.weight, &norm.bias].map(held);
    let dev = id_held[0].cuda()?.device();
    let (id_view, pos_view, type_view) = (
        id_held[0].view::<u32>()?,
        id_held[1].view::<u32>()?,
        id_held[2].view::<u32>()?,
    );
    let (word, position, token_type) = (
        table_held[0].view::<T>()?,
        table_held[1].view::<T>()?,
        table_held[2].view::<T>()?,
    );
    let (gamma, beta) = (norm_held[0].view::<f32>()?, norm_held[1].view::<f32>()?);
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(tokens * hidden)? };
    let gemm_out = gemm_output::<T>(dev, tokens * hidden)?;
    let null = 0u64;
    let func =
        dev.get_or_load_custom_func(&kernel_name("embed_layer_norm", T::DTYPE)?, MODULE, PTX)?;
    let mut launch = func.builder();
    let (tokens_arg, hidden_arg) = (tokens as i32, hidden as i32);
    launch.arg(&id_view).arg(&pos_view).arg(&type_view);
    launch.arg(&word).arg(&position).arg(&token_type);
    launch.arg(&gamma).arg(&beta).arg(&out);
    match &gemm_out {
        Some(gemm_out) => launch.arg(gemm_out),
        None => launch.arg(&null),
    };
    launch.arg(&tokens_arg).arg(&hidden_arg).arg(&norm.eps);
    // SAFETY: argument types and count match embed_layer_norm_* in kernels/ops.cu; ids were checked against the
    // table sizes by the caller.
    unsafe { launch.launch(warp_rows_config(tokens)) }.w()?;
    Ok(hidden_of(dev, out, gemm_out, Shape::from((tokens, hidden))))
}

/// Ids index the tables inside the kernel: callers check them against the table sizes first
/// (`LoadedModel::logits`, the architectures' forward). None when the shapes do not suit the kernel.
pub fn embed(
    tables: &EmbeddingTables,
    input_ids: &Tensor,
    position_ids: &Tensor,
    type_ids: &Tensor,
    norm: &LayerNorm,
) -> Option<Result<Hidden>> {
    let type_table = tables.token_type.as_ref()?;
    let hidden = tables.word.dim(1).ok()?;
    let fits = hidden <= WARP_ROW_MAX
        && norm.weight.dtype() == DType::F32
        && tables.position.dtype() == tables.word.dtype()
        && type_table.dtype() == tables.word.dtype();
    if !fits {
        return None;
    }
    let run = || -> Result<Hidden> {
        let ids = [
            input_ids.contiguous()?,
            position_ids.contiguous()?,
            type_ids.contiguous()?,
        ];
        let tables = EmbeddingTables {
            word: tables.word.contiguous()?,
            position: tables.position.contiguous()?,
            token_type: None,
        };
        let type_table = type_table.contiguous()?;
        let [a, b, c] = &ids;
        by_dtype!(
            tables.word.dtype(),
            embed_launch(&tables, &type_table, [a, b, c], norm)
        )
    };
    Some(run())
}

mod attention;
pub use attention::{attention, self_attention};
