//! The device operations every encoder architecture is built from (GEMM, fused bias/activation, residual LayerNorm,
//! masked attention, embeddings). Architectures call only these, so a device backend can replace each one.

use candle_core::{Device, Result, Tensor, D};
use candle_nn::VarBuilder;

/// A dense layer y = x·Wᵀ (+ b), W stored [out, in] as in the checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: vb.get(out_dim, "bias")?,
        })
    }

    /// Stacks layers that read the same input into one wider layer (e.g. Q, K and V into one GEMM).
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|p| &p.bias).collect();
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
        })
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

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

/// The feed-forward activation named by `hidden_act` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// Exact GELU, 0.5·x·(1 + erf(x/√2)): transformers' "gelu".
    GeluErf,
    /// The tanh approximation: "gelu_new", "gelu_pytorch_tanh".
    GeluTanh,
    Relu,
}

impl FeedForwardActivation {
    pub fn from_config(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// act(x + bias), the first feed-forward projection's epilogue. x: [rows, n], bias: [n].
pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: FeedForwardActivation,
) -> Result<Tensor> {
    if let Some(result) = cpu::bias_activation(x, bias, activation) {
        return result;
    }
    let x = x.broadcast_add(bias)?;
    match activation {
        FeedForwardActivation::GeluErf => x.gelu_erf(),
        FeedForwardActivation::GeluTanh => x.gelu(),
        FeedForwardActivation::Relu => x.relu(),
    }
}

/// LayerNorm(x + bias + residual): a sublayer's output projection epilogue in post-LN encoders. x, residual:
/// [rows, n]; bias: [n].
pub fn add_bias_layer_norm(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    norm: &LayerNorm,
) -> Result<Tensor> {
    if let Some(result) = cpu::add_bias_layer_norm(x, bias, residual, norm) {
        return result;
    }
    norm.forward(&x.broadcast_add(bias)?.add(residual)?)
}

/// Sum of the word, position and token-type embeddings of each token, then LayerNorm. All id tensors: [tokens].
pub fn embed(
    tables: &EmbeddingTables,
    input_ids: &Tensor,
    position_ids: &Tensor,
    type_ids: Option<&Tensor>,
    norm: &LayerNorm,
) -> Result<Tensor> {
    let mut sum = tables
        .word
        .index_select(input_ids, 0)?
        .add(&tables.position.index_select(position_ids, 0)?)?;
    if let (Some(table), Some(ids)) = (&tables.token_type, type_ids) {
        sum = sum.add(&table.index_select(ids, 0)?)?;
    }
    norm.forward(&sum)
}

/// The embedding matrices of an encoder, [rows, hidden] each.
#[derive(Debug, Clone)]
pub struct EmbeddingTables {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Option<Tensor>,
}

/// Which keys of a right-padded batch are real: each sequence's first `lengths[i]` tokens.
#[derive(Debug, Clone)]
pub struct PaddingMask {
    lengths: Vec<usize>,
    seq_len: usize,
    device: Device,
}

impl PaddingMask {
    pub fn new(lengths: &[usize], seq_len: usize, device: &Device) -> Self {
        Self {
            lengths: lengths.to_vec(),
            seq_len,
            device: device.clone(),
        }
    }

    /// Additive bias, 0 on real keys and the most negative float on padding keys, shaped
    /// [batch, 1, 1, seq] to broadcast over heads and query rows.
    fn bias(&self) -> Result<Tensor> {
        let bias: Vec<f32> = self
            .lengths
            .iter()
            .flat_map(|&len| {
                (0..self.seq_len).map(move |pos| if pos < len { 0.0 } else { f32::MIN })
            })
            .collect();
        Tensor::from_vec(bias, (self.lengths.len(), 1, 1, self.seq_len), &self.device)
    }
}

/// Scaled dot-product attention with padding keys excluded. q: [batch, heads, q_rows, head_dim]; k, v:
/// [batch, heads, seq, head_dim]. Padded query rows stay finite because every sequence has a real key.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &PaddingMask) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if let Some(context) = cpu::attention(q, k, v, scale as f32, &mask.lengths) {
        return context;
    }
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask.bias()?)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

/// tanh(x·Wᵀ + b): the pooler and RoBERTa head's dense layer.
pub fn dense_tanh(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    layer.forward(x)?.tanh()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, IndexOp};

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
        let out = attention(&q, &k, &v, &PaddingMask::new(&lengths, seq, &dev))?;
        // The second sequence computed alone on its 3 real keys must give the same first 3 rows.
        let alone = attention(
            &q.i(1..2)?.narrow(2, 0, 3)?,
            &k.i(1..2)?.narrow(2, 0, 3)?,
            &v.i(1..2)?.narrow(2, 0, 3)?,
            &PaddingMask::new(&[3], 3, &dev),
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
        let y = add_bias_layer_norm(&x, &b, &r, &norm)?;
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
        assert!(max_abs_diff(&add_bias_layer_norm(&x, &b, &r, &norm)?, &composed) < 1e-5);

        let mask = PaddingMask::new(&[5, 2], 5, &dev);
        let (q, k, v) = (
            Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?,
            Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?,
            Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?,
        );
        let fused = cpu::attention(&q, &k, &v, 0.25, &mask.lengths).expect("cpu path")?;
        let probs = candle_nn::ops::softmax_last_dim(
            &(q.matmul(&k.t()?)? * 0.25)?.broadcast_add(&mask.bias()?)?,
        )?;
        assert!(max_abs_diff(&fused, &probs.matmul(&v)?) < 1e-5);

        Ok(())
    }

    #[test]
    fn concatenated_linear_equals_its_parts() -> Result<()> {
        let dev = Device::Cpu;
        let part = |seed: f32| -> Result<Linear> {
            Ok(Linear {
                weight: (Tensor::randn(0f32, 1.0, (4, 6), &dev)? + seed as f64)?,
                bias: Tensor::randn(0f32, 1.0, 4, &dev)?,
            })
        };
        let (a, b) = (part(0.0)?, part(1.0)?);
        let x = Tensor::randn(0f32, 1.0, (5, 6), &dev)?;
        let joint = Linear::concat(&[a.clone(), b.clone()])?.forward(&x)?;
        let separate = Tensor::cat(&[a.forward(&x)?, b.forward(&x)?], 1)?;
        assert!(max_abs_diff(&joint, &separate) < 1e-5);
        Ok(())
    }
}

/// Fused f32 CPU kernels, parallel over rows. Each returns None when its inputs are not f32 tensors on the
/// CPU, and the caller falls back to composed candle operations.
mod cpu {
    use candle_core::{CpuStorage, Result, Storage, StorageRef, Tensor};
    use rayon::prelude::*;

    use super::{FeedForwardActivation, LayerNorm};

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
        if b.is_empty() || xs.len() % b.len() != 0 {
            return None;
        }
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(b.len())
            .zip(xs.par_chunks(b.len()))
            .for_each(|(o, row)| {
                for ((o, &v), &b) in o.iter_mut().zip(row).zip(b) {
                    *o = activate(v + b, activation);
                }
            });
        Some(Tensor::from_vec(out, x.shape(), x.device()))
    }

    fn activate(v: f32, activation: FeedForwardActivation) -> f32 {
        match activation {
            FeedForwardActivation::GeluErf => {
                0.5 * v
                    * (1.0 + candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2))
            }
            FeedForwardActivation::GeluTanh => {
                let inner = 0.797_884_6 * (v + 0.044_715 * v * v * v);
                0.5 * v * (1.0 + inner.tanh())
            }
            FeedForwardActivation::Relu => v.max(0.0),
        }
    }

    pub fn add_bias_layer_norm(
        x: &Tensor,
        bias: &Tensor,
        residual: &Tensor,
        norm: &LayerNorm,
    ) -> Option<Result<Tensor>> {
        if !is_cpu_f32(&[x, bias, residual, &norm.weight, &norm.bias])
            || x.shape() != residual.shape()
        {
            return None;
        }
        let (x, residual) = (x.contiguous().ok()?, residual.contiguous().ok()?);
        let views = [&x, bias, &residual, &norm.weight, &norm.bias].map(F32View::of);
        let [Some(xs), Some(b), Some(rs), Some(g), Some(be)] = &views else {
            return None;
        };
        let (xs, b, rs, g, be) = (xs.data(), b.data(), rs.data(), g.data(), be.data());
        let n = b.len();
        if n == 0 || g.len() != n || be.len() != n || xs.len() % n != 0 {
            return None;
        }
        let eps = norm.eps;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(n)
            .zip(xs.par_chunks(n).zip(rs.par_chunks(n)))
            .for_each(|(o, (x, r))| {
                for (((o, x), r), b) in o.iter_mut().zip(x).zip(r).zip(b) {
                    *o = x + b + r;
                }
                let mean = o.iter().sum::<f32>() / n as f32;
                let var = o.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for ((o, g), be) in o.iter_mut().zip(g).zip(be) {
                    *o = (*o - mean) * inv * g + be;
                }
            });
        Some(Tensor::from_vec(out, x.shape(), x.device()))
    }

    /// Fused attention: for each (sequence, head) in parallel and each query row, the scores against the real
    /// keys, their softmax and the weighted sum of values, without materialising the score matrix. Padding
    /// keys are skipped, not masked. q: [batch, heads, q_rows, head_dim]; k, v: [batch, heads, seq, head_dim].
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        lengths: &[usize],
    ) -> Option<Result<Tensor>> {
        if !is_cpu_f32(&[q, k, v]) {
            return None;
        }
        let (batch, heads, q_rows, head_dim) = q.dims4().ok()?;
        let seq = k.dim(2).ok()?;
        if batch != lengths.len()
            || seq == 0
            || k.dims4().ok()? != (batch, heads, seq, head_dim)
            || k.shape() != v.shape()
        {
            return None;
        }
        // Keys transposed to [head_dim, seq] per head, so each score row accumulates over contiguous memory.
        let (q, k_t, v) = (
            q.contiguous().ok()?,
            k.transpose(2, 3).ok()?.contiguous().ok()?,
            v.contiguous().ok()?,
        );
        let (qs, ks, vs) = (F32View::of(&q)?, F32View::of(&k_t)?, F32View::of(&v)?);
        let (qs, ks, vs) = (qs.data(), ks.data(), vs.data());
        let mut out = vec![0f32; batch * heads * q_rows * head_dim];
        let dims = HeadDims {
            seq,
            head_dim,
            scale,
        };
        out.par_chunks_mut(q_rows * head_dim)
            .enumerate()
            .for_each(|(bh, out)| {
                let len = lengths[bh / heads].clamp(1, seq);
                let q = &qs[bh * q_rows * head_dim..][..q_rows * head_dim];
                let k_t = &ks[bh * head_dim * seq..][..head_dim * seq];
                let v = &vs[bh * seq * head_dim..][..seq * head_dim];
                attend_one_head(q, k_t, v, len, dims, out);
            });
        Some(Tensor::from_vec(
            out,
            (batch, heads, q_rows, head_dim),
            q.device(),
        ))
    }

    #[derive(Clone, Copy)]
    struct HeadDims {
        seq: usize,
        head_dim: usize,
        scale: f32,
    }

    /// One head's attention over its first `len` keys, row by row.
    fn attend_one_head(
        q: &[f32],
        k_t: &[f32],
        v: &[f32],
        len: usize,
        dims: HeadDims,
        out: &mut [f32],
    ) {
        let HeadDims {
            seq,
            head_dim,
            scale,
        } = dims;
        let mut scores = vec![0f32; len];
        for (q_row, out_row) in q.chunks_exact(head_dim).zip(out.chunks_exact_mut(head_dim)) {
            scores.fill(0.0);
            for (&q_d, k_row) in q_row.iter().zip(k_t.chunks_exact(seq)) {
                let q_d = q_d * scale;
                for (score, &k) in scores.iter_mut().zip(&k_row[..len]) {
                    *score += q_d * k;
                }
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            let inv = 1.0 / sum;
            for (&p, v_row) in scores.iter().zip(v.chunks_exact(head_dim)) {
                let p = p * inv;
                for (o, &v) in out_row.iter_mut().zip(v_row) {
                    *o += p * v;
                }
            }
        }
    }
}
