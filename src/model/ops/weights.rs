//! Reading a checkpoint into the ops layer's types: the device and precision choices are made here, once, at
//! load (GEMM weights in the model dtype and packed for AMX where the CPU runs them in bf16; norms, heads and the
//! residual stream in fp32), so architecture files name tensors and shapes only.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::{GemmPrecision, LayerNorm, Linear, RmsNorm};

/// Where a loaded model computes: its device and the dtype its GEMM inputs take.
#[derive(Debug, Clone)]
pub struct Target {
    device: Device,
    dtype: DType,
}

impl Target {
    /// Token ids, positions or type ids of a batch as a [n] tensor on the model's device.
    pub fn ids(&self, values: &[u32]) -> Result<Tensor> {
        Tensor::from_slice(values, values.len(), &self.device)
    }

    /// The sequences of a packed batch (`PackedBatch::cu_seqlens`), for attention and pooling.
    pub fn sequences(&self, cu_seqlens: &[usize]) -> Result<super::Sequences> {
        super::Sequences::new(cu_seqlens, &self.device)
    }

    /// [n] zeros in u32 (the token types of tokenizers that give none).
    pub fn zero_ids(&self, n: usize) -> Result<Tensor> {
        Tensor::zeros(n, DType::U32, &self.device)
    }

    /// Rotary cos/sin tables for each token of `spans` (positions), from theta.
    pub fn rotary_tables(
        &self,
        spans: impl Iterator<Item = std::ops::Range<usize>>,
        head_dim: usize,
        theta: f64,
    ) -> Result<(Tensor, Tensor)> {
        super::rotary_tables(spans, head_dim, theta, &self.device)
    }

    /// Rotary cos/sin tables from precomputed inverse frequencies (scaled rotary variants).
    pub fn rotary_tables_from(
        &self,
        spans: impl Iterator<Item = std::ops::Range<usize>>,
        inverse_frequencies: &[f32],
    ) -> Result<(Tensor, Tensor)> {
        super::rotary_tables_from(spans, inverse_frequencies, &self.device)
    }

    /// A zero bias of `n` in the GEMM dtype, for kernels that add one where the architecture has none.
    pub fn zero_bias(&self, n: usize) -> Result<Tensor> {
        Tensor::zeros(n, self.dtype, &self.device)
    }

    /// An fp32 residual-stream value with its GEMM-dtype copy.
    pub fn hidden(&self, residual: Tensor) -> Result<super::Hidden> {
        super::Hidden::from_residual(residual, self.dtype)
    }

    /// The residual-stream (fp32) value `x` as the input of the next GEMM (the model dtype).
    pub fn gemm_input(&self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(self.dtype)
    }

    /// The same position tables and sequence bookkeeping every architecture builds, on this device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A GEMM result (model dtype) or any other value as an fp32 residual-stream value.
pub fn residual(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
}

/// Whether a projection has a bias in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// Stored; missing is an error.
    Stored,
    /// Not stored (a zero bias stands in, so every layer adds one the same way).
    None,
    /// Taken if the checkpoint stores it.
    IfStored,
}

/// A checkpoint's tensors under a name prefix, with the precision the GEMMs run in.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    precision: GemmPrecision,
}

impl<'a> Weights<'a> {
    pub fn new(vb: VarBuilder<'a>, precision: GemmPrecision) -> Self {
        Self { vb, precision }
    }

    /// The tensors under `name.`.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            precision: self.precision,
        }
    }

    /// Whether the checkpoint has the tensor `name` under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn target(&self) -> Target {
        Target {
            device: self.vb.device().clone(),
            dtype: self.vb.dtype(),
        }
    }

    /// A tensor in the model dtype (embedding tables).
    pub fn tensor(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.vb.get(shape, name)
    }

    /// A tensor that meets the residual stream rather than a GEMM (a table added to it, a score row read
    /// against it, a table projected once at load): in the residual stream's precision (fp32).
    pub fn residual_tensor(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.vb.clone().set_dtype(DType::F32).get(shape, name)
    }

    /// A layer-body projection (`weight`, and `bias` as `bias` says) at the model's GEMM precision.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: Bias) -> Result<Linear> {
        self.raw_linear(in_dim, out_dim, bias)?
            .with_precision(self.precision)
    }

    /// Projections that read the same input (Q, K and V; gate and up) fused into one GEMM: (name, out_dim) each.
    pub fn fused_linear(
        &self,
        parts: &[(&str, usize)],
        in_dim: usize,
        bias: Bias,
    ) -> Result<Linear> {
        let layers = parts
            .iter()
            .map(|&(name, out_dim)| self.pp(name).raw_linear(in_dim, out_dim, bias))
            .collect::<Result<Vec<_>>>()?;
        Linear::concat(&layers)?.with_precision(self.precision)
    }

    /// A classification-head layer: tiny and right before the score, so it stays fp32 whatever the model dtype.
    pub fn head_linear(&self, in_dim: usize, out_dim: usize, bias: Bias) -> Result<Linear> {
        let fp32 = Self {
            vb: self.vb.clone().set_dtype(DType::F32),
            precision: GemmPrecision::Weights,
        };
        fp32.raw_linear(in_dim, out_dim, bias)
    }

    /// LayerNorm parameters (fp32); `bias` as stored by the checkpoint.
    pub fn layer_norm(&self, dim: usize, eps: f64, bias: Bias) -> Result<LayerNorm> {
        let vb = self.vb.clone().set_dtype(DType::F32);
        let weight = vb.get(dim, "weight")?;
        let bias = match bias {
            Bias::Stored => vb.get(dim, "bias")?,
            Bias::IfStored if vb.contains_tensor("bias") => vb.get(dim, "bias")?,
            Bias::IfStored | Bias::None => Tensor::zeros(dim, DType::F32, weight.device())?,
        };
        Ok(LayerNorm::new(weight, bias, eps as f32))
    }

    /// RMSNorm (fp32); `plus_one` for Gemma's norm, which scales by 1 + the stored weight.
    pub fn rms_norm(&self, dim: usize, eps: f64, plus_one: bool) -> Result<RmsNorm> {
        let weight = self.residual_tensor(dim, "weight")?;
        let weight = if plus_one { (weight + 1.0)? } else { weight };
        Ok(RmsNorm::new(weight, eps))
    }

    fn raw_linear(&self, in_dim: usize, out_dim: usize, bias: Bias) -> Result<Linear> {
        let weight = self.vb.get((out_dim, in_dim), "weight")?;
        let bias = match bias {
            Bias::Stored => self.vb.get(out_dim, "bias")?,
            Bias::IfStored if self.vb.contains_tensor("bias") => self.vb.get(out_dim, "bias")?,
            Bias::IfStored | Bias::None => Tensor::zeros(out_dim, weight.dtype(), weight.device())?,
        };
        Ok(Linear::from_parts(weight, bias))
    }
}
