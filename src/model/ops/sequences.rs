//! Packed sequences (offsets, first rows, the padded form for padded kernels) and self-attention over them.

use candle_core::{DType, Device, Result, Tensor, D};

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;

/// Where each sequence of a packed batch lies: sequence i is tokens cu_seqlens[i]..cu_seqlens[i + 1] of the
/// [tokens, hidden] activations. Dense layers run over the packed tokens; attention runs per sequence.
#[derive(Debug, Clone)]
pub struct Sequences {
    pub(super) cu_seqlens: Vec<usize>,
    pub(super) max_len: usize,
    device: Device,
    /// Each sequence's first token (its row in the packed activations), [sequences] u32 on the device.
    pub(super) first_rows: Tensor,
    /// The right-padded form, built once per batch on devices whose attention kernels read padded input.
    padded: Option<PaddedForm>,
}

impl Sequences {
    /// From the sequences' offsets (starting at 0, non-decreasing, one more than the sequences).
    pub fn new(cu_seqlens: &[usize], device: &Device) -> Result<Self> {
        if cu_seqlens.first() != Some(&0) || cu_seqlens.windows(2).any(|w| w[0] > w[1]) {
            candle_core::bail!(
                "sequence offsets must start at 0 and never decrease: {cu_seqlens:?}"
            );
        }
        let max_len = cu_seqlens
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        let starts: Vec<u32> = cu_seqlens[..cu_seqlens.len() - 1]
            .iter()
            .map(|&s| s as u32)
            .collect();
        let count = starts.len();
        let mut sequences = Self {
            cu_seqlens: cu_seqlens.to_vec(),
            max_len,
            device: device.clone(),
            first_rows: Tensor::from_vec(starts, count, device)?,
            padded: None,
        };
        if !device.is_cpu() {
            sequences.padded = Some(sequences.padded_form()?);
        }
        Ok(sequences)
    }

    pub fn count(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    pub fn tokens(&self) -> usize {
        self.cu_seqlens[self.cu_seqlens.len() - 1]
    }

    fn lengths(&self) -> Vec<usize> {
        self.cu_seqlens.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Index maps between the packed rows and a right-padded [sequences * max_len] layout, and its mask.
    pub(super) fn padded_form(&self) -> Result<PaddedForm> {
        let (count, max_len) = (self.count(), self.max_len);
        let mut gather = Vec::with_capacity(count * max_len);
        let mut scatter = Vec::with_capacity(self.tokens());
        for (seq, window) in self.cu_seqlens.windows(2).enumerate() {
            let (start, end) = (window[0], window[1]);
            // Padding slots repeat the sequence's first token: masked as keys, dropped as queries.
            gather.extend(
                (0..max_len).map(|i| if start + i < end { start + i } else { start } as u32),
            );
            scatter.extend((0..end - start).map(|i| (seq * max_len + i) as u32));
        }
        let tokens = scatter.len();
        Ok(PaddedForm {
            gather: Tensor::from_vec(gather, count * max_len, &self.device)?,
            scatter: Tensor::from_vec(scatter, tokens, &self.device)?,
            mask: PaddingMask::new(&self.lengths(), max_len, &self.device)?,
        })
    }
}

/// A packed batch seen as right-padded, for attention kernels that read padded batches.
#[derive(Debug, Clone)]
pub(super) struct PaddedForm {
    /// [sequences * max_len]: the packed row each padded slot reads.
    pub(super) gather: Tensor,
    /// [tokens]: the padded slot of each packed row.
    pub(super) scatter: Tensor,
    pub(super) mask: PaddingMask,
}

/// Which keys of a right-padded batch are real: each sequence's first `lengths[i]` tokens.
#[derive(Debug, Clone)]
pub(super) struct PaddingMask {
    lengths: Vec<usize>,
    seq_len: usize,
    device: Device,
    /// The lengths as u32 on a GPU, uploaded once per batch for the attention kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device_lengths: Option<Tensor>,
}

impl PaddingMask {
    pub(super) fn new(lengths: &[usize], seq_len: usize, device: &Device) -> Result<Self> {
        let device_lengths = if device.is_cpu() {
            None
        } else {
            let lengths: Vec<u32> = lengths.iter().map(|&l| l as u32).collect();
            let count = lengths.len();
            Some(Tensor::from_vec(lengths, count, device)?)
        };
        Ok(Self {
            lengths: lengths.to_vec(),
            seq_len,
            device: device.clone(),
            device_lengths,
        })
    }

    fn batch_size(&self) -> usize {
        self.lengths.len()
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
pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &PaddingMask) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    #[cfg(feature = "cuda")]
    if let Some(lengths) = &mask.device_lengths {
        return cuda::attention(q, k, v, scale as f32, lengths);
    }
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let scores = (f32(q)?.matmul(&f32(k)?.t()?)? * scale)?.broadcast_add(&mask.bias()?)?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&f32(v)?)?
        .to_dtype(q.dtype())
}

/// Multi-head self-attention over packed sequences, from the fused QKV projection. qkv: [tokens, 3 * hidden]
/// without its bias (Q | K | V, `heads` heads each); bias: [3 * hidden]. Returns [tokens, hidden], or with
/// `first_only` the context of each sequence's first token, [sequences, hidden].
///
/// The CPU computes the packed form directly. Other devices and dtypes gather the rows into a right-padded
/// batch, run padded attention (the CUDA kernels) and scatter the real rows back.
pub fn self_attention(
    qkv: &Tensor,
    bias: &Tensor,
    sequences: &Sequences,
    heads: usize,
    first_only: bool,
) -> Result<Tensor> {
    if let Some(context) = cpu::self_attention(qkv, bias, &sequences.cu_seqlens, heads, first_only)
    {
        return context;
    }
    let built;
    let padded = match &sequences.padded {
        Some(padded) => padded,
        None => {
            built = sequences.padded_form()?;
            &built
        }
    };
    let q_rows = if first_only { 1 } else { sequences.max_len };
    let context = padded_self_attention(
        &qkv.index_select(&padded.gather, 0)?,
        bias,
        &padded.mask,
        heads,
        q_rows,
    )?;
    if first_only {
        Ok(context)
    } else {
        context.index_select(&padded.scatter, 0)
    }
}

/// Self-attention of a right-padded batch: qkv [batch * seq, 3 * hidden] without bias; returns the context of
/// each sequence's first `q_rows` rows, [batch * q_rows, hidden].
pub(super) fn padded_self_attention(
    qkv: &Tensor,
    bias: &Tensor,
    mask: &PaddingMask,
    heads: usize,
    q_rows: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(lengths) = &mask.device_lengths {
        if let Some(context) = cuda::self_attention(qkv, bias, lengths, mask.seq_len, heads, q_rows)
        {
            return context;
        }
    }
    let (batch, seq) = (mask.batch_size(), mask.seq_len);
    let hidden = qkv.dim(D::Minus1)? / 3;
    let head_dim = hidden / heads;
    let qkv = qkv
        .broadcast_add(bias)?
        .reshape((batch, seq, 3, heads, head_dim))?;
    let part = |i: usize, rows: usize| {
        qkv.narrow(2, i, 1)?
            .squeeze(2)?
            .narrow(1, 0, rows)?
            .transpose(1, 2)?
            .contiguous()
    };
    let context = attention(&part(0, q_rows)?, &part(1, seq)?, &part(2, seq)?, mask)?;
    context
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch * q_rows, hidden))
}
