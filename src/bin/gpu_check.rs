//! GPU checks for the CUDA build: our kernels against candle's reference ops, and score parity of a running
//! server against reference scores. Run by scripts/checks/gpu-check.sh on a GPU machine.

use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use rerank_server::model::ops::{
    self, EmbeddingTables, FeedForwardActivation, LayerNorm, Sequences,
};
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::proto::RerankRequest;
use serde::Deserialize;

#[derive(Parser)]
#[command(about = "GPU checks for rerank-server's CUDA engine")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Each CUDA kernel against the candle reference op (fp32 on the CPU) on random inputs.
    Kernels {
        /// Largest relative error allowed in fp16 (bf16 gets 4x, fp32 1e-5).
        #[arg(long, default_value_t = 2e-3)]
        bound: f32,
    },
    /// Model-only forward throughput on the GPU: random ids, fixed batch shape, fp16.
    Bench {
        #[arg(long)]
        model: std::path::PathBuf,
        #[arg(long, default_value_t = 128)]
        rows: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 30)]
        iterations: usize,
    },
    /// Scores of a running server (raw scores) against reference logits in the fixtures' JSON format.
    Parity {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        expected: std::path::PathBuf,
        #[arg(long, default_value_t = 2e-3)]
        tolerance: f32,
        /// Read the tolerance as a fraction of the largest reference |logit| (for models whose logits are not
        /// of unit size).
        #[arg(long)]
        relative: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Args::parse().command {
        Command::Kernels { bound } => kernels(bound),
        Command::Parity {
            addr,
            expected,
            tolerance,
            relative,
        } => parity(&addr, &expected, tolerance, relative).await,
        Command::Bench {
            model,
            rows,
            seq,
            iterations,
        } => bench(&model, rows, seq, iterations),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Check = Result<bool, Box<dyn std::error::Error>>;

/// max |got - want| / max |want|, and whether `got` has a NaN or infinity.
fn relative_error(got: &Tensor, want: &Tensor) -> candle_core::Result<(f32, bool)> {
    let got: Vec<f32> = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let want: Vec<f32> = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    Ok((diff / scale, got.iter().any(|v| !v.is_finite())))
}

fn report(name: &str, dtype: DType, shape: &str, error: f32, non_finite: bool, bound: f32) -> bool {
    let ok = !non_finite && error <= bound;
    println!(
        "kernel {name:<22} {dtype:<5?} {shape:<22} rel_err {error:.2e} (bound {bound:.0e}) {}",
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

fn kernels(bound: f32) -> Check {
    let gpu = Device::new_cuda_with_stream(0)?;
    let cpu = Device::Cpu;
    let mut ok = true;
    for (dtype, bound) in [
        (DType::F16, bound),
        (DType::BF16, bound * 4.0),
        (DType::F32, 1e-5),
    ] {
        let on_gpu = |t: &Tensor| t.to_device(&gpu).and_then(|t| t.to_dtype(dtype));
        // Reference inputs are the low-precision values themselves, so only the kernel's arithmetic is measured.
        let rounded = |t: Tensor| t.to_dtype(dtype).and_then(|t| t.to_dtype(DType::F32));
        for (rows, cols) in [
            (7usize, 384usize),
            (2048, 384),
            (33, 768),
            (4096, 1536),
            (5, 1024),
            (9, 200),
        ] {
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
            let reference = candle_nn::ops::layer_norm(
                &x.broadcast_add(&b)?.add(&residual)?,
                &gamma,
                &beta,
                1e-12,
            )?;
            let norm = LayerNorm::new(gamma.to_device(&gpu)?, beta.to_device(&gpu)?, 1e-12);
            let got = ops::add_bias_layer_norm(
                &on_gpu(&x)?,
                &on_gpu(&b)?,
                &residual.to_device(&gpu)?,
                &norm,
            )?;
            // The fp32 residual output is exact up to fp32 arithmetic; the GEMM input is rounded to the dtype.
            let (e, nan) = relative_error(&got.residual, &reference)?;
            ok &= report("add_bias_layer_norm", dtype, &shape, e, nan, 1e-5);
            let (e, nan) = relative_error(&got.input, &reference)?;
            ok &= report("add_bias_layer_norm_in", dtype, &shape, e, nan, bound);

            // The head runs in fp32 whatever the model dtype.
            let head =
                ops::Linear::from_parts(Tensor::randn(0f32, 0.05, (cols, cols), &cpu)?, b.clone());
            let reference = head.forward(&x)?.tanh()?;
            let head_gpu =
                ops::Linear::from_parts(head.weight().to_device(&gpu)?, b.to_device(&gpu)?);
            let got = ops::dense_tanh(&head_gpu, &x.to_device(&gpu)?)?;
            let (e, nan) = relative_error(&got, &reference)?;
            // An fp32 GEMM: cuBLAS sums in another order than the CPU, about 1e-5 relative over 1,536 terms.
            ok &= report("cls_head_dense_tanh", DType::F32, &shape, e, nan, 1e-4);
        }
        for (tokens, hidden, vocab, positions) in [
            (300usize, 384usize, 30522usize, 512usize),
            (4096, 768, 250_002, 514),
        ] {
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
            let norm = LayerNorm::new(gamma.to_device(&gpu)?, beta.to_device(&gpu)?, 1e-12);
            let got = ops::embed(
                &tables,
                &ids.to_device(&gpu)?,
                &pos.to_device(&gpu)?,
                Some(&types.to_device(&gpu)?),
                &norm,
            )?;
            let shape = format!("{tokens}x{hidden}");
            let (e, nan) = relative_error(&got.residual, &reference)?;
            ok &= report("embed_layer_norm", dtype, &shape, e, nan, 1e-5);
            let (e, nan) = relative_error(&got.input, &reference)?;
            ok &= report("embed_layer_norm_in", dtype, &shape, e, nan, bound);
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

fn bench(dir: &std::path::Path, rows: usize, seq: usize, iterations: usize) -> Check {
    let target = rerank_server::engine::compute_target("cuda:0", "f16")?;
    let model = rerank_server::model::load(dir, &target.device, target.dtype)?;
    let ids: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..seq)
                .map(|t| (5 + (r * 131 + t * 17) % 3000) as u32)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = (0..rows).map(|_| vec![0; seq]).collect();
    let batch = rerank_server::model::PackedBatch::from_sequences(
        ids.iter().zip(&types).map(|(i, t)| (&i[..], &t[..])),
    );
    for _ in 0..3 {
        model.logits(&batch)?;
    }
    let started = std::time::Instant::now();
    for _ in 0..iterations {
        model.logits(&batch)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "bench {} {rows}x{seq} fp16 model-only: {:.2} ms/batch, {:.0} pairs/s",
        dir.display(),
        seconds * 1e3 / iterations as f64,
        (rows * iterations) as f64 / seconds
    );
    Ok(true)
}

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    query: String,
    documents: Vec<String>,
    /// A decoder reranker's case may carry its own instruction.
    #[serde(default)]
    instruction: Option<String>,
    logits: Vec<Vec<f32>>,
}

async fn parity(addr: &str, path: &std::path::Path, tolerance: f32, relative: bool) -> Check {
    let expected: Expected = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut client = RerankerServiceClient::connect(addr.to_string())
        .await?
        .max_decoding_message_size(64 << 20);
    let (mut worst, mut same_order, mut spread) = (0f32, 0usize, 0f32);
    for case in &expected.cases {
        let request = RerankRequest {
            query: case.query.clone(),
            documents: case.documents.clone(),
            instruction: case.instruction.clone(),
            raw_scores: true,
            ..Default::default()
        };
        let response = client.rerank(request).await?.into_inner();
        let reference: Vec<f32> = case
            .logits
            .iter()
            .map(|l| if l.len() == 2 { l[1] - l[0] } else { l[0] })
            .collect();
        spread = reference.iter().fold(spread, |m, v| m.max(v.abs()));
        for r in &response.results {
            worst = worst.max((r.score - reference[r.index as usize]).abs());
        }
        let ours: Vec<u32> = response.results.iter().map(|r| r.index).collect();
        let mut theirs: Vec<u32> = (0..reference.len() as u32).collect();
        theirs.sort_by(|a, b| {
            reference[*b as usize]
                .total_cmp(&reference[*a as usize])
                .then(a.cmp(b))
        });
        if ours == theirs {
            same_order += 1;
        } else {
            println!("parity: order differs in case {}", case.name);
        }
    }
    let tolerance = if relative {
        tolerance * spread
    } else {
        tolerance
    };
    let ok = worst <= tolerance;
    println!(
        "parity {}: {} queries, max |logit diff| {worst:.2e} (tolerance {tolerance:.1e}, logits up to {spread:.2}), identical order {same_order}/{} {}",
        path.display(),
        expected.cases.len(),
        expected.cases.len(),
        if ok { "PASS" } else { "FAIL" }
    );
    Ok(ok)
}
