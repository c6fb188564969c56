//! The kernel checks: each CUDA kernel against candle's reference op (fp32 on the CPU) on random inputs, in
//! fp16, bf16 and fp32, at the shapes real models use.

use candle_core::{DType, Device, Tensor};
use rerank_server::model::ops::{
    self, EmbeddingTables, FeedForwardActivation, LayerNorm, Sequences,
};

use super::{relative_error, report, Check};

pub fn kernels(bound: f32) -> Check {
    let gpu = Device::new_cuda_with_stream(0)?;
    let mut ok = true;
    for (dtype, bound) in [
        (DType::F16, bound),
        (DType::BF16, bound * 4.0),
        (DType::F32, 1e-5),
    ] {
        let at = Precision {
            gpu: &gpu,
            dtype,
            bound,
        };
        for (rows, cols) in [
            (7usize, 384usize),
            (2048, 384),
            (33, 768),
            (4096, 1536),
            (5, 1024),
            (9, 200),
        ] {
            ok &= check_rows(rows, cols, &at)?;
        }
        for (tokens, hidden, vocab, positions) in [
            (300usize, 384usize, 30522usize, 512usize),
            (4096, 768, 250_002, 514),
        ] {
            ok &= check_embedding(tokens, hidden, vocab, positions, &at)?;
        }
        for (lengths, heads, head_dim) in [
            (vec![77usize, 5, 40], 12usize, 32usize),
            (vec![512, 300, 17, 1, 512, 64, 128, 200], 12, 64),
            (vec![130, 64, 65, 3], 6, 64),
            (vec![100, 37], 4, 128),
        ] {
            ok &= check_attention(&lengths, heads, head_dim, dtype, bound, &gpu)?;
        }
    }
    println!("kernels: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

/// Where and in what precision a check runs, and its error bound.
struct Precision<'a> {
    gpu: &'a Device,
    dtype: DType,
    bound: f32,
}

impl Precision<'_> {
    fn on_gpu(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_device(self.gpu).and_then(|t| t.to_dtype(self.dtype))
    }

    /// Reference inputs are the low-precision values themselves, so only the kernel's arithmetic is measured.
    fn rounded(&self, t: Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(self.dtype).and_then(|t| t.to_dtype(DType::F32))
    }
}

/// The row kernels on a [rows, cols] input: bias + activation, bias + residual + LayerNorm, the fp32 head.
fn check_rows(rows: usize, cols: usize, at: &Precision<'_>) -> Check {
    let (gpu, dtype, bound, cpu) = (at.gpu, at.dtype, at.bound, Device::Cpu);
    let on_gpu = |t: &Tensor| at.on_gpu(t);
    let rounded = |t: Tensor| at.rounded(t);
    let mut ok = true;
    let x = rounded(Tensor::randn(0f32, 2.0, (rows, cols), &cpu)?)?;
    let b = rounded(Tensor::randn(0f32, 1.0, cols, &cpu)?)?;
    let shape = format!("{rows}x{cols}");
    for (name, activation, reference) in [
        (
            "bias_gelu_erf",
            FeedForwardActivation::GeluErf,
            x.broadcast_add(&b)?.gelu_erf()?,
        ),
        (
            "bias_gelu_tanh",
            FeedForwardActivation::GeluTanh,
            x.broadcast_add(&b)?.gelu()?,
        ),
        (
            "bias_relu",
            FeedForwardActivation::Relu,
            x.broadcast_add(&b)?.relu()?,
        ),
        (
            "bias_silu",
            FeedForwardActivation::Silu,
            candle_nn::ops::silu(&x.broadcast_add(&b)?)?,
        ),
    ] {
        let got = ops::bias_activation(&on_gpu(&x)?, &on_gpu(&b)?, activation)?;
        let (e, nan) = relative_error(&got, &reference)?;
        ok &= report(name, dtype, &shape, e, nan, bound);
    }
    let gamma = Tensor::randn(1f32, 0.1, cols, &cpu)?;
    let beta = Tensor::randn(0f32, 0.1, cols, &cpu)?;
    let residual = Tensor::randn(0f32, 1.0, (rows, cols), &cpu)?;
    let reference =
        candle_nn::ops::layer_norm(&x.broadcast_add(&b)?.add(&residual)?, &gamma, &beta, 1e-12)?;
    let norm = LayerNorm::new(gamma.to_device(gpu)?, beta.to_device(gpu)?, 1e-12);
    let got =
        ops::add_bias_layer_norm(&on_gpu(&x)?, &on_gpu(&b)?, &residual.to_device(gpu)?, &norm)?;
    // The fp32 residual output is exact up to fp32 arithmetic; the GEMM input is rounded to the dtype.
    let (e, nan) = relative_error(&got.residual, &reference)?;
    ok &= report("add_bias_layer_norm", dtype, &shape, e, nan, 1e-5);
    let (e, nan) = relative_error(&got.input, &reference)?;
    ok &= report("add_bias_layer_norm_in", dtype, &shape, e, nan, bound);

    // The head runs in fp32 whatever the model dtype.
    let head = ops::Linear::from_parts(Tensor::randn(0f32, 0.05, (cols, cols), &cpu)?, b.clone());
    let reference = head.forward(&x)?.tanh()?;
    let head_gpu = ops::Linear::from_parts(head.weight().to_device(gpu)?, b.to_device(gpu)?);
    let got = ops::dense_tanh(&head_gpu, &x.to_device(gpu)?)?;
    let (e, nan) = relative_error(&got, &reference)?;
    // An fp32 GEMM: cuBLAS sums in another order than the CPU, about 1e-5 relative over 1,536 terms.
    ok &= report("cls_head_dense_tanh", DType::F32, &shape, e, nan, 1e-4);
    Ok(ok)
}

/// Word + position + token-type embeddings with LayerNorm, at a vocabulary's real size.
fn check_embedding(
    tokens: usize,
    hidden: usize,
    vocab: usize,
    positions: usize,
    at: &Precision<'_>,
) -> Check {
    let (gpu, dtype, bound, cpu) = (at.gpu, at.dtype, at.bound, Device::Cpu);
    let on_gpu = |t: &Tensor| at.on_gpu(t);
    let rounded = |t: Tensor| at.rounded(t);
    let mut ok = true;
    let word = rounded(Tensor::randn(0f32, 1.0, (vocab, hidden), &cpu)?)?;
    let position = rounded(Tensor::randn(0f32, 1.0, (positions, hidden), &cpu)?)?;
    let token_type = rounded(Tensor::randn(0f32, 1.0, (2, hidden), &cpu)?)?;
    let gamma = Tensor::randn(1f32, 0.1, hidden, &cpu)?;
    let beta = Tensor::randn(0f32, 0.1, hidden, &cpu)?;
    let ids: Vec<u32> = (0..tokens).map(|i| ((i * 7919) % vocab) as u32).collect();
    let pos: Vec<u32> = (0..tokens).map(|i| (i % positions) as u32).collect();
    let types: Vec<u32> = (0..tokens).map(|i| (i % 2) as u32).collect();
    let (ids, pos, types) = (
        Tensor::from_vec(ids, tokens, &cpu)?,
        Tensor::from_vec(pos, tokens, &cpu)?,
        Tensor::from_vec(types, tokens, &cpu)?,
    );
    let sum = word
        .index_select(&ids, 0)?
        .add(&position.index_select(&pos, 0)?)?
        .add(&token_type.index_select(&types, 0)?)?;
    let reference = candle_nn::ops::layer_norm(&sum, &gamma, &beta, 1e-12)?;
    let tables = EmbeddingTables {
        word: on_gpu(&word)?,
        position: on_gpu(&position)?,
        token_type: Some(on_gpu(&token_type)?),
    };
    let norm = LayerNorm::new(gamma.to_device(gpu)?, beta.to_device(gpu)?, 1e-12);
    let got = ops::embed(
        &tables,
        &ids.to_device(gpu)?,
        &pos.to_device(gpu)?,
        Some(&types.to_device(gpu)?),
        &norm,
    )?;
    let shape = format!("{tokens}x{hidden}");
    let (e, nan) = relative_error(&got.residual, &reference)?;
    ok &= report("embed_layer_norm", dtype, &shape, e, nan, 1e-5);
    let (e, nan) = relative_error(&got.input, &reference)?;
    ok &= report("embed_layer_norm_in", dtype, &shape, e, nan, bound);
    Ok(ok)
}

/// Self-attention from a fused QKV projection: the fused kernel (or the composed path for other head sizes and
/// fp32) against the CPU fp32 path, for full layers and the first-row-only form.
fn check_attention(
    lengths: &[usize],
    heads: usize,
    head_dim: usize,
    dtype: DType,
    bound: f32,
    gpu: &Device,
) -> Result<bool, Box<dyn std::error::Error>> {
    let cpu = Device::Cpu;
    let batch = lengths.len();
    let tokens: usize = lengths.iter().sum();
    let hidden = heads * head_dim;
    let rounded = |t: Tensor| t.to_dtype(dtype).and_then(|t| t.to_dtype(DType::F32));
    let qkv = rounded(Tensor::randn(0f32, 1.0, (tokens, 3 * hidden), &cpu)?)?;
    let bias = rounded(Tensor::randn(0f32, 0.5, 3 * hidden, &cpu)?)?;
    let cu_seqlens: Vec<usize> = std::iter::once(0)
        .chain(lengths.iter().scan(0, |end, &len| {
            *end += len;
            Some(*end)
        }))
        .collect();
    let cpu_sequences = Sequences::new(&cu_seqlens, &cpu)?;
    let gpu_sequences = Sequences::new(&cu_seqlens, gpu)?;
    let on_gpu = |t: &Tensor| t.to_device(gpu).and_then(|t| t.to_dtype(dtype));
    let mut ok = true;
    for first_only in [false, true] {
        let reference = ops::self_attention(&qkv, &bias, &cpu_sequences, heads, first_only)?;
        let got = ops::self_attention(
            &on_gpu(&qkv)?,
            &on_gpu(&bias)?,
            &gpu_sequences,
            heads,
            first_only,
        )?
        .to_device(&cpu)?
        .to_dtype(DType::F32)?;
        let (e, nan) = relative_error(&got, &reference)?;
        let name = if first_only {
            "self_attention_cls"
        } else {
            "self_attention"
        };
        let longest = lengths.iter().max().copied().unwrap_or(0);
        ok &= report(
            name,
            dtype,
            &format!("{batch}x{heads}x{longest}x{head_dim}"),
            e,
            nan,
            bound * 2.0,
        );
    }
    Ok(ok)
}
