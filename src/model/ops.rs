//! The device operations every architecture is built from, one module per op, each owning its device dispatch
//! (CUDA kernel, else CPU kernel, else candle's composed ops) and returning `Result`: `linear` (GEMMs and their
//! fused epilogues), `norm` (LayerNorm, RMSNorm), `activation` (bias + activation, GLU), `embedding`,
//! `attention` (bidirectional, windowed, causal; `sequences` the packed layout and padded form), `disentangled`
//! (DeBERTa), `rotary`; `weights` makes the load-time device and precision choices. Architectures call only these.
//!
//! Precision: GEMM weights and activations are in the model dtype (fp16 on GPUs), while LayerNorm parameters and
//! outputs (the residual stream) and the classification head stay fp32. Rounding the residual stream to fp16
//! after every sublayer is what moves half-precision scores furthest from an fp32 reference.

use candle_core::{DType, Result, Tensor};

/// The hidden state between sublayers: the fp32 residual stream, and the same values in the model dtype as the
/// input of the next GEMM (one tensor twice when the model is fp32).
#[derive(Debug, Clone)]
pub struct Hidden {
    pub residual: Tensor,
    pub input: Tensor,
}

impl Hidden {
    pub fn from_residual(residual: Tensor, dtype: DType) -> Result<Self> {
        let input = residual.to_dtype(dtype)?;
        Ok(Self { residual, input })
    }

    /// The rows of each sequence's first token, from a packed [tokens, hidden] state.
    pub fn first_tokens(&self, sequences: &Sequences) -> Result<Self> {
        Ok(Self {
            residual: self.residual.index_select(&sequences.first_rows, 0)?,
            input: self.input.index_select(&sequences.first_rows, 0)?,
        })
    }
}

mod activation;
mod attention;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod disentangled;
mod embedding;
mod linear;
mod norm;
mod rotary;
mod sequences;
mod weights;
pub use activation::{bias_activation, gated_activation, ActivatedHalf, FeedForwardActivation};
pub use attention::{causal_attention, projected_self_attention, windowed_attention};
pub use disentangled::{
    disentangled_attention, PositionProjections, RelativeDistances, RelativeRows,
};
pub use embedding::{embed, EmbeddingTables};
pub use linear::{
    cpu_has_bf16_tiles, dense_tanh, linear, linear_activation, linear_residual_norm, GemmPrecision,
    Linear,
};
pub use norm::{add_bias_layer_norm, LayerNorm, RmsNorm};
pub use rotary::{inverse_frequencies, rotary_tables, rotary_tables_from, rotate, rotate_qk};
pub use sequences::{self_attention, Sequences};
pub use weights::{residual, Bias, Target, Weights};

/// The instruction set the CPU kernels run with on this machine ("avx512", "avx2+fma" or "baseline").
pub fn cpu_simd_level() -> &'static str {
    cpu::vector::simd_level().name()
}

#[cfg(test)]
mod tests {
    use super::sequences::{attention, padded_self_attention, PaddingMask};
    use super::*;
    use candle_core::{DType, Device, IndexOp};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar())
            .expect("diff")
    }

    #[test]
    fn attention_ignores_padding_keys_and_keeps_padded_rows_finite() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, seq, hd) = (2, 5, 4);
        let q = Tensor::randn(0f32, 1.0, (2, heads, seq, hd), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, heads, seq, hd), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, heads, seq, hd), &dev)?;
        let lengths = [5, 3];
        let out = attention(&q, &k, &v, &PaddingMask::new(&lengths, seq, &dev)?)?;
        // The second sequence computed alone on its 3 real keys must give the same first 3 rows.
        let alone = attention(
            &q.i(1..2)?.narrow(2, 0, 3)?,
            &k.i(1..2)?.narrow(2, 0, 3)?,
            &v.i(1..2)?.narrow(2, 0, 3)?,
            &PaddingMask::new(&[3], 3, &dev)?,
        )?;
        assert!(max_abs_diff(&out.i(1..2)?.narrow(2, 0, 3)?, &alone) < 1e-6);
        let all: Vec<f32> = out.flatten_all()?.to_vec1()?;
        assert!(all.iter().all(|x| x.is_finite()));
        Ok(())
    }

    #[test]
    fn fused_epilogues_match_their_definitions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let r = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let gelu = bias_activation(&x, &b, FeedForwardActivation::GeluErf)?;
        let xb: Vec<f32> = x.broadcast_add(&b)?.flatten_all()?.to_vec1()?;
        let expected: Vec<f32> = xb
            .iter()
            .map(|v| 0.5 * v * (1.0 + libm_erf(v / std::f32::consts::SQRT_2)))
            .collect();
        let got: Vec<f32> = gelu.flatten_all()?.to_vec1()?;
        assert!(
            got.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-5),
            "{got:?} vs {expected:?}"
        );

        let norm = LayerNorm {
            weight: Tensor::ones(8, DType::F32, &dev)?,
            bias: Tensor::zeros(8, DType::F32, &dev)?,
            eps: 1e-12,
        };
        let y = add_bias_layer_norm(&x, &b, &r, &norm)?.residual;
        let mean = y
            .mean_keepdim(1)?
            .abs()?
            .max_keepdim(0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(mean[0] < 1e-5);
        let var: Vec<f32> = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1()?;
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-4), "{var:?}");
        Ok(())
    }

    /// erf by Abramowitz–Stegun 7.1.26 is too coarse; use a series that is exact to f32 for |x| < 4.
    fn libm_erf(x: f32) -> f32 {
        let x = x as f64;
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while n < 60.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        (sum * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }

    #[test]
    fn cpu_kernels_match_composed_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (6, 16), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 16, &dev)?;
        for (activation, composed) in [
            (
                FeedForwardActivation::GeluErf,
                x.broadcast_add(&b)?.gelu_erf()?,
            ),
            (
                FeedForwardActivation::GeluTanh,
                x.broadcast_add(&b)?.gelu()?,
            ),
            (FeedForwardActivation::Relu, x.broadcast_add(&b)?.relu()?),
        ] {
            assert!(
                max_abs_diff(&bias_activation(&x, &b, activation)?, &composed) < 1e-5,
                "{activation:?}"
            );
        }
        let r = Tensor::randn(0f32, 1.0, (6, 16), &dev)?;
        let norm = LayerNorm {
            weight: Tensor::randn(1f32, 0.1, 16, &dev)?,
            bias: Tensor::randn(0f32, 0.1, 16, &dev)?,
            eps: 1e-12,
        };
        let composed = norm.forward(&x.broadcast_add(&b)?.add(&r)?)?;
        assert!(max_abs_diff(&add_bias_layer_norm(&x, &b, &r, &norm)?.residual, &composed) < 1e-5);

        Ok(())
    }

    #[test]
    fn self_attention_matches_per_head_attention() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, head_dim) = (3, 4);
        let hidden = heads * head_dim;
        let sequences = Sequences::new(&[0, 6, 10], &dev)?;
        let qkv = Tensor::randn(0f32, 1.0, (10, 3 * hidden), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 3 * hidden, &dev)?;
        let context = self_attention(&qkv, &bias, &sequences, heads, false)?;
        assert_eq!(context.dims(), &[10, hidden]);
        // Head 1 of sequence 1 (packed rows 6..10), by hand from its columns.
        let with_bias = qkv.broadcast_add(&bias)?;
        let columns = |offset: usize| -> Result<Tensor> {
            with_bias
                .narrow(0, 6, 4)?
                .narrow(1, offset + head_dim, head_dim)?
                .unsqueeze(0)?
                .unsqueeze(0)?
                .contiguous()
        };
        let (q, k, v) = (columns(0)?, columns(hidden)?, columns(2 * hidden)?);
        let expected = attention(&q, &k, &v, &PaddingMask::new(&[4], 4, &dev)?)?
            .squeeze(0)?
            .squeeze(0)?;
        let got = context.narrow(0, 6, 4)?.narrow(1, head_dim, head_dim)?;
        assert!(max_abs_diff(&got, &expected) < 1e-5);
        // The first-row-only form is the first row of each sequence.
        let first = self_attention(&qkv, &bias, &sequences, heads, true)?;
        let full_first = context.index_select(&Tensor::new(&[0u32, 6], &dev)?, 0)?;
        assert!(max_abs_diff(&first, &full_first) < 1e-6);
        Ok(())
    }

    /// The route other devices and dtypes take (gather into a padded batch, padded attention, scatter back) gives
    /// the packed kernel's result: checked here in f32 and through f16 inputs, which the CPU kernel declines.
    #[test]
    fn padded_route_equals_the_packed_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let heads = 2;
        let sequences = Sequences::new(&[0, 7, 9, 9 + 13], &dev)?;
        let qkv = Tensor::randn(0f32, 1.0, (22, 3 * 16), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 3 * 16, &dev)?;
        let padded = sequences.padded_form()?;
        for first_only in [false, true] {
            let packed = self_attention(&qkv, &bias, &sequences, heads, first_only)?;
            let q_rows = if first_only { 1 } else { sequences.max_len };
            let mut via_padding = padded_self_attention(
                &qkv.index_select(&padded.gather, 0)?,
                &bias,
                &padded.mask,
                heads,
                q_rows,
            )?;
            if !first_only {
                via_padding = via_padding.index_select(&padded.scatter, 0)?;
            }
            assert!(
                max_abs_diff(&packed, &via_padding) < 1e-5,
                "first_only {first_only}"
            );
            let half = self_attention(
                &qkv.to_dtype(DType::F16)?,
                &bias.to_dtype(DType::F16)?,
                &sequences,
                heads,
                first_only,
            )?;
            assert_eq!(half.dtype(), DType::F16);
            assert!(max_abs_diff(&packed, &half.to_dtype(DType::F32)?) < 2e-2);
        }
        Ok(())
    }

    #[test]
    fn fused_linear_ops_equal_their_composition() -> Result<()> {
        let dev = Device::Cpu;
        let layer = Linear::from_parts(
            Tensor::randn(0f32, 0.3, (24, 16), &dev)?,
            Tensor::randn(0f32, 0.5, 24, &dev)?,
        );
        let x = Tensor::randn(0f32, 1.0, (9, 16), &dev)?;
        let composed = layer.forward(&x)?;
        for activation in [
            FeedForwardActivation::GeluErf,
            FeedForwardActivation::Relu,
            FeedForwardActivation::Silu,
        ] {
            let fused = linear_activation(&layer, &x, activation)?;
            let reference = match activation {
                FeedForwardActivation::Relu => composed.relu()?,
                FeedForwardActivation::Silu => candle_nn::ops::silu(&composed)?,
                _ => composed.gelu_erf()?,
            };
            assert!(max_abs_diff(&fused, &reference) < 1e-5, "{activation:?}");
        }
        let residual = Tensor::randn(0f32, 1.0, (9, 24), &dev)?;
        let norm = LayerNorm::new(
            Tensor::randn(1f32, 0.1, 24, &dev)?,
            Tensor::randn(0f32, 0.1, 24, &dev)?,
            1e-12,
        );
        let fused = linear_residual_norm(&layer, &x, &residual, &norm)?.residual;
        let reference = norm.forward(&composed.add(&residual)?)?;
        assert!(max_abs_diff(&fused, &reference) < 1e-5);

        let qkv = Linear::from_parts(
            Tensor::randn(0f32, 0.3, (3 * 16, 16), &dev)?,
            Tensor::randn(0f32, 0.5, 3 * 16, &dev)?,
        );
        let x = Tensor::randn(0f32, 1.0, (11, 16), &dev)?;
        let sequences = Sequences::new(&[0, 4, 11], &dev)?;
        for first_only in [false, true] {
            let fused = projected_self_attention(&qkv, &x, &sequences, 4, first_only)?;
            let composed = self_attention(&qkv.matmul(&x)?, qkv.bias(), &sequences, 4, first_only)?;
            assert!(max_abs_diff(&fused, &composed) < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn half_precision_inputs_keep_an_fp32_residual_stream() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev)?.to_dtype(DType::F16)?;
        let b = Tensor::randn(0f32, 1.0, 8, &dev)?.to_dtype(DType::F16)?;
        let r = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let norm = LayerNorm::new(
            Tensor::ones(8, DType::F32, &dev)?,
            Tensor::zeros(8, DType::F32, &dev)?,
            1e-12,
        );
        let hidden = add_bias_layer_norm(&x, &b, &r, &norm)?;
        assert_eq!(hidden.residual.dtype(), DType::F32);
        assert_eq!(hidden.input.dtype(), DType::F16);
        let expected = norm.forward(
            &x.to_dtype(DType::F32)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?
                .add(&r)?,
        )?;
        assert!(max_abs_diff(&hidden.residual, &expected) < 1e-6);
        Ok(())
    }

    #[test]
    fn concatenated_linear_equals_its_parts() -> Result<()> {
        let dev = Device::Cpu;
        let part = |seed: f32| -> Result<Linear> {
            Ok(Linear::from_parts(
                (Tensor::randn(0f32, 1.0, (4, 6), &dev)? + seed as f64)?,
                Tensor::randn(0f32, 1.0, 4, &dev)?,
            ))
        };
        let (a, b) = (part(0.0)?, part(1.0)?);
        let x = Tensor::randn(0f32, 1.0, (5, 6), &dev)?;
        let joint = Linear::concat(&[a.clone(), b.clone()])?.forward(&x)?;
        let separate = Tensor::cat(&[a.forward(&x)?, b.forward(&x)?], 1)?;
        assert!(max_abs_diff(&joint, &separate) < 1e-5);
        Ok(())
    }
}
