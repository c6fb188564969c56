//! Dense layers: y = x·Wᵀ (+ b) and its fused epilogues (activation, residual LayerNorm, tanh), each on the
//! device's own kernel where there is one (AMX tiles or the CPU's GEMM into unzeroed buffers; CUDA), else candle's.

use candle_core::{DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{add_bias_layer_norm, bias_activation, FeedForwardActivation};
use super::{cpu, Hidden, LayerNorm};

/// A dense layer y = x·Wᵀ (+ b), W stored [out, in] as in the checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(in crate::model::ops) weight: Tensor,
    pub(in crate::model::ops) bias: Tensor,
    /// The weight as bf16 AMX tile panels, when the CPU runs this layer's GEMM in bf16 (`GemmPrecision`).
    pub(in crate::model::ops) bf16_tiles: Option<std::sync::Arc<cpu::amx::PackedWeight>>,
}

/// How the CPU computes the GEMMs of the encoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPrecision {
    /// In the weights' dtype (fp32 on the CPU unless configured otherwise).
    Weights,
    /// bf16 products with fp32 sums on AMX tiles; everything else stays fp32.
    Bf16Tiles,
}

/// Whether this CPU can run GEMMs in bf16 on AMX tiles.
pub fn cpu_has_bf16_tiles() -> bool {
    cpu::amx::available()
}

impl Linear {
    pub fn from_parts(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight,
            bias,
            bf16_tiles: None,
        }
    }

    /// The layer with its GEMM in `precision`: for `Bf16Tiles`, an f32 CPU weight is packed into AMX tile
    /// panels (left as it is where the CPU lacks AMX).
    pub fn with_precision(mut self, precision: GemmPrecision) -> Result<Self> {
        if precision == GemmPrecision::Bf16Tiles && cpu::amx::available() {
            let (n, k) = self.weight.dims2()?;
            let values: Vec<f32> = self.weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            self.bf16_tiles = cpu::amx::PackedWeight::pack(&values, n, k).map(std::sync::Arc::new);
        }
        Ok(self)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Stacks layers that read the same input into one wider layer (e.g. Q, K and V into one GEMM).
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|p| &p.bias).collect();
        Ok(Self::from_parts(
            Tensor::cat(&weights, 0)?,
            Tensor::cat(&biases, 0)?,
        ))
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// x·Wᵀ without the bias, for callers that fuse the bias into the next operation. x: [rows, in].
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)
    }

    /// x·Wᵀ + b. x: [rows, in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul(x)?.broadcast_add(&self.bias)
    }
}

/// x·Wᵀ + b: the CPU's own GEMM (on AMX tiles where the layer is packed for them), else candle's.
pub fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    if let Some(result) = super::cpu::linear(layer, x) {
        return result;
    }
    layer.forward(x)
}

/// act(x·Wᵀ + b): a feed-forward block's first projection. x: [rows, in] in the model dtype.
pub fn linear_activation(
    layer: &Linear,
    x: &Tensor,
    activation: FeedForwardActivation,
) -> Result<Tensor> {
    if let Some(result) = cpu::linear_activation(layer, x, activation) {
        return result;
    }
    bias_activation(&layer.matmul(x)?, layer.bias(), activation)
}

/// LayerNorm(x·Wᵀ + b + residual): a sublayer's output projection in post-LN encoders, with the fp32 residual.
pub fn linear_residual_norm(
    layer: &Linear,
    x: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Result<Hidden> {
    if let Some(result) = cpu::linear_residual_norm(layer, x, residual, norm) {
        return Hidden::from_residual(result?, x.dtype());
    }
    add_bias_layer_norm(&layer.matmul(x)?, layer.bias(), residual, norm)
}

/// tanh(x·Wᵀ + b): the pooler and RoBERTa head's dense layer.
pub fn dense_tanh(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::bias_tanh(&layer.matmul(x)?, layer.bias());
    }
    layer.forward(x)?.tanh()
}
