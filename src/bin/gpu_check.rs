//! GPU checks for the CUDA build: our kernels against candle's reference ops, and score parity of a running
//! server against reference scores. Run by scripts/gpu-check.sh on a GPU machine.

use std::process::ExitCode;

use candle_core::{DType, Device, IndexOp, Tensor};
use clap::{Parser, Subcommand};
use rerank_server::model::ops::{
    self, EmbeddingTables, FeedForwardActivation, LayerNorm, PaddingMask,
};
use rerank_server::proto::reranker_client::RerankerClient;
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
        } => parity(&addr, &expected, tolerance).await,
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
        ] {
            let x = rounded(Tensor::randn(0f32, 2.0, (rows, cols), &cpu)?)?;
            let b = rounded(Tensor::randn(0f32, 1.0, cols, &cpu)?)?;
            let r = rounded(Tensor::randn(0f32, 1.0, (rows, cols), &cpu)?)?;
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
            ] {
                let got = ops::bias_activation(&on_gpu(&x)?, &on_gpu(&b)?, activation)?;
                let (e, nan) = relative_error(&got, &reference)?;
                ok &= report(name, dtype, &shape, e, nan, bound);
            }
            let gamma = rounded(Tensor::randn(1f32, 0.1, cols, &cpu)?)?;
            let beta = rounded(Tensor::randn(0f32, 0.1, cols, &cpu)?)?;
            let reference =
                candle_nn::ops::layer_norm(&x.broadcast_add(&b)?.add(&r)?, &gamma, &beta, 1e-12)?;
            let norm = LayerNorm::new(on_gpu(&gamma)?, on_gpu(&beta)?, 1e-12);
            let got = ops::add_bias_layer_norm(&on_gpu(&x)?, &on_gpu(&b)?, &on_gpu(&r)?, &norm)?;
            let (e, nan) = relative_error(&got, &reference)?;
            ok &= report("add_bias_layer_norm", dtype, &shape, e, nan, bound);

            let head = ops::Linear::from_parts(
                rounded(Tensor::randn(0f32, 0.05, (cols, cols), &cpu)?)?,
                b.clone(),
            );
            let reference = head.forward(&x)?.tanh()?;
            let head_gpu = ops::Linear::from_parts(on_gpu(head.weight())?, on_gpu(&b)?);
            let got = ops::dense_tanh(&head_gpu, &on_gpu(&x)?)?;
            let (e, nan) = relative_error(&got, &reference)?;
            ok &= report("cls_head_dense_tanh", dtype, &shape, e, nan, bound * 4.0);
        }
        for (tokens, hidden, vocab, positions) in [
            (300usize, 384usize, 30522usize, 512usize),
            (4096, 768, 250_002, 514),
        ] {
            let word = rounded(Tensor::randn(0f32, 1.0, (vocab, hidden), &cpu)?)?;
            let position = rounded(Tensor::randn(0f32, 1.0, (positions, hidden), &cpu)?)?;
            let token_type = rounded(Tensor::randn(0f32, 1.0, (2, hidden), &cpu)?)?;
            let gamma = rounded(Tensor::randn(1f32, 0.1, hidden, &cpu)?)?;
            let beta = rounded(Tensor::randn(0f32, 0.1, hidden, &cpu)?)?;
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
            let norm = LayerNorm::new(on_gpu(&gamma)?, on_gpu(&beta)?, 1e-12);
            let got = ops::embed(
                &tables,
                &ids.to_device(&gpu)?,
                &pos.to_device(&gpu)?,
                Some(&types.to_device(&gpu)?),
                &norm,
            )?;
            let (e, nan) = relative_error(&got, &reference)?;
            ok &= report(
                "embed_layer_norm",
                dtype,
                &format!("{tokens}x{hidden}"),
                e,
                nan,
                bound,
            );
        }
        for (lengths, heads, head_dim) in [
            (vec![77usize, 5, 40], 12usize, 32usize),
            (vec![512, 300, 17, 1, 512, 64, 128, 200], 12, 64),
        ] {
            let (batch, seq) = (lengths.len(), *lengths.iter().max().unwrap_or(&1));
            let q = rounded(Tensor::randn(
                0f32,
                1.0,
                (batch, heads, seq, head_dim),
                &cpu,
            )?)?;
            let k = rounded(Tensor::randn(
                0f32,
                1.0,
                (batch, heads, seq, head_dim),
                &cpu,
            )?)?;
            let v = rounded(Tensor::randn(
                0f32,
                1.0,
                (batch, heads, seq, head_dim),
                &cpu,
            )?)?;
            let bias: Vec<f32> = lengths
                .iter()
                .flat_map(|&l| (0..seq).map(move |p| if p < l { 0.0 } else { f32::MIN }))
                .collect();
            let bias = Tensor::from_vec(bias, (batch, 1, 1, seq), &cpu)?;
            let scale = 1.0 / (head_dim as f64).sqrt();
            let probs = candle_nn::ops::softmax_last_dim(
                &(q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?,
            )?;
            let reference = probs.matmul(&v)?;
            let mask = PaddingMask::new(&lengths, seq, &gpu);
            let got = ops::attention(&on_gpu(&q)?, &on_gpu(&k)?, &on_gpu(&v)?, &mask)?;
            let (e, nan) = relative_error(&got, &reference)?;
            ok &= report(
                "masked_attention",
                dtype,
                &format!("{batch}x{heads}x{seq}x{head_dim}"),
                e,
                nan,
                bound * 2.0,
            );
            // The last layer's single query row per sequence takes the same path.
            let first = ops::attention(
                &on_gpu(&q)?.narrow(2, 0, 1)?.contiguous()?,
                &on_gpu(&k)?,
                &on_gpu(&v)?,
                &mask,
            )?;
            let (e, nan) = relative_error(&first, &reference.i((.., .., 0..1))?)?;
            ok &= report(
                "masked_attention_cls",
                dtype,
                &format!("{batch}x{heads}x1x{head_dim}"),
                e,
                nan,
                bound * 2.0,
            );
        }
    }
    println!("kernels: {}", if ok { "PASS" } else { "FAIL" });
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
    let batch = rerank_server::model::PaddedBatch::from_sequences(
        ids.iter().zip(&types).map(|(i, t)| (&i[..], &t[..])),
        0,
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
    logits: Vec<Vec<f32>>,
}

async fn parity(addr: &str, path: &std::path::Path, tolerance: f32) -> Check {
    let expected: Expected = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut client = RerankerClient::connect(addr.to_string())
        .await?
        .max_decoding_message_size(64 << 20);
    let (mut worst, mut same_order, mut spread) = (0f32, 0usize, 0f32);
    for case in &expected.cases {
        let request = RerankRequest {
            query: case.query.clone(),
            documents: case.documents.clone(),
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
    let ok = worst <= tolerance;
    println!(
        "parity {}: {} queries, max |logit diff| {worst:.2e} (tolerance {tolerance:.0e}, logits up to {spread:.2}), identical order {same_order}/{} {}",
        path.display(),
        expected.cases.len(),
        expected.cases.len(),
        if ok { "PASS" } else { "FAIL" }
    );
    Ok(ok)
}
