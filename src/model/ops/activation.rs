//! Feed-forward activations: act(x + bias) after the first projection, and the gated form act(gate) · up of GLU
//! MLPs.

use candle_core::{Result, Tensor};

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;

/// The feed-forward activation named by `hidden_act` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// Exact GELU, 0.5·x·(1 + erf(x/√2)): transformers' "gelu".
    GeluErf,
    /// The tanh approximation: "gelu_new", "gelu_pytorch_tanh".
    GeluTanh,
    Relu,
    /// x·sigmoid(x): "silu" / "swish" (the gate of SwiGLU).
    Silu,
}

impl FeedForwardActivation {
    pub fn from_config(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// act(x) elementwise, in candle's device-generic ops.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => candle_nn::ops::silu(x),
        }
    }
}

/// act(x + bias), the first feed-forward projection's epilogue. x: [rows, n], bias: [n].
pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: FeedForwardActivation,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::bias_activation(x, bias, activation);
    }
    if let Some(result) = cpu::bias_activation(x, bias, activation) {
        return result;
    }
    let x = x.broadcast_add(bias)?;
    match activation {
        FeedForwardActivation::GeluErf => x.gelu_erf(),
        FeedForwardActivation::GeluTanh => x.gelu(),
        FeedForwardActivation::Relu => x.relu(),
        FeedForwardActivation::Silu => candle_nn::ops::silu(&x),
    }
}

/// Which half of a GLU projection's output goes through the activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivatedHalf {
    /// act(first) · second (ModernBERT's input | gate).
    First,
    /// act(second) · first (GTE's up | gate).
    Second,
}

/// The GLU product of x [rows, 2·n]: act(one half) · the other, [rows, n], in the dtype of x.
pub fn gated_activation(
    x: &Tensor,
    half: ActivatedHalf,
    activation: super::FeedForwardActivation,
) -> Result<Tensor> {
    let activated_first = half == ActivatedHalf::First;
    if let Some(result) = super::cpu::gated_activation(x, activated_first, activation) {
        return result;
    }
    let n = x.dim(1)? / 2;
    let (first, second) = (x.narrow(1, 0, n)?, x.narrow(1, n, n)?);
    let (activated, other) = if activated_first {
        (first, second)
    } else {
        (second, first)
    };
    activation.apply(&activated)? * other
}
