//! Normalisation over the last dimension, always in fp32: LayerNorm (and the post-LN sublayer epilogue
//! LayerNorm(x + bias + residual)) and RMSNorm.

use candle_core::{DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{cpu, Hidden};

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(in crate::model::ops) weight: Tensor,
    pub(in crate::model::ops) bias: Tensor,
    pub(in crate::model::ops) eps: f32,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f32) -> Self {
        Self { weight, bias, eps }
    }

    /// LayerNorm in fp32, whatever the dtype of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight.to_dtype(DType::F32)?,
            &self.bias.to_dtype(DType::F32)?,
            self.eps,
        )
    }
}

/// LayerNorm(x + bias + residual): a sublayer's output projection epilogue in post-LN encoders. x: [rows, n] and
/// bias: [n] in the model dtype (a GEMM's output and bias); residual: [rows, n] fp32. The result's `input` has
/// the dtype of x.
pub fn add_bias_layer_norm(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Result<Hidden> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        if let Some(hidden) = cuda::add_bias_layer_norm(x, bias, residual, norm) {
            return hidden;
        }
    }
    let residual = match cpu::add_bias_layer_norm(x, bias, residual, norm) {
        Some(result) => result?,
        None => norm.forward(
            &x.to_dtype(DType::F32)?
                .broadcast_add(&bias.to_dtype(DType::F32)?)?
                .add(&residual.to_dtype(DType::F32)?)?,
        )?,
    };
    Hidden::from_residual(residual, x.dtype())
}

/// RMSNorm over the last dimension, computed in fp32 whatever the input dtype (as transformers' Qwen/Llama norms).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(in crate::model::ops) weight: Tensor,
    pub(in crate::model::ops) eps: f32,
}

impl RmsNorm {
    /// `weight` in fp32 (see `Weights::rms_norm`).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    /// fp32 out.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight,
            self.eps,
        )
    }
}
