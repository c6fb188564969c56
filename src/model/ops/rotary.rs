//! Rotary position embeddings: cos/sin tables for packed sequences (from theta or precomputed inverse
//! frequencies) and the rotation of queries and keys.

use candle_core::{DType, Result, Tensor};

/// cos and sin of each packed token's position (`spans`: each sequence's positions), [tokens, head_dim / 2] each, fp32, as
/// transformers computes rotary angles (inverse frequencies and products in fp32).
pub fn rotary_tables(
    spans: impl Iterator<Item = std::ops::Range<usize>>,
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    rotary_tables_from(spans, &inverse_frequencies(head_dim, theta), device)
}

/// The unscaled rotary inverse frequencies 1/θ^(2i/d), i < d/2.
pub fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta.powf((2 * i) as f64 / head_dim as f64) as f32))
        .collect()
}

/// Rotary cos and sin tables [tokens, d/2] for the positions in `spans`, from given inverse frequencies (a model
/// that scales its frequencies computes its own).
pub fn rotary_tables_from(
    spans: impl Iterator<Item = std::ops::Range<usize>>,
    inverse: &[f32],
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = inverse.len();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for span in spans {
        for position in span {
            for &frequency in inverse {
                let angle = position as f32 * frequency;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let tokens = cos.len() / half.max(1);
    Ok((
        Tensor::from_vec(cos, (tokens, half), device)?,
        Tensor::from_vec(sin, (tokens, half), device)?,
    ))
}

/// Rotary positions on the Q and K blocks of a fused projection qkv [tokens, 3·hidden] (V passes through), in
/// the dtype of qkv; rotary: cos and sin [tokens, head_dim/2].
pub fn rotate_qk(qkv: &Tensor, heads: usize, rotary: &(Tensor, Tensor)) -> Result<Tensor> {
    let (tokens, width) = qkv.dims2()?;
    let hidden = width / 3;
    let head_dim = hidden / heads.max(1);
    if let Some(rotated) = super::cpu::rotate_qk(qkv, head_dim, &rotary.0, &rotary.1) {
        return rotated;
    }
    let part = |i: usize| qkv.narrow(1, i * hidden, hidden);
    let rotated = |i: usize| {
        rotate(&part(i)?.reshape((tokens, heads, head_dim))?, rotary)?
            .reshape((tokens, hidden))?
            .to_dtype(qkv.dtype())
    };
    Tensor::cat(&[rotated(0)?, rotated(1)?, part(2)?], 1)
}

/// Rotary positions on [tokens, heads, head_dim] (the rotate-half form), computed in fp32.
pub fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    let x = x
        .to_dtype(DType::F32)?
        .transpose(0, 1)?
        .unsqueeze(0)?
        .contiguous()?;
    candle_nn::rotary_emb::rope(&x, cos, sin)?
        .squeeze(0)?
        .transpose(0, 1)?
        .contiguous()
}
