//! GPU checks for the CUDA build: our kernels against candle's reference ops, and score parity of a running
//! server against reference scores. Run by scripts/checks/gpu-check.sh on a GPU machine.

use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use rerank_server::proto::reranker_service_client::RerankerServiceClient;
use rerank_server::proto::RerankRequest;
use serde::Deserialize;

mod kernels;

use kernels::kernels;

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

pub(crate) type Check = Result<bool, Box<dyn std::error::Error>>;

/// max |got - want| / max |want|, and whether `got` has a NaN or infinity.
pub(crate) fn relative_error(got: &Tensor, want: &Tensor) -> candle_core::Result<(f32, bool)> {
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

pub(crate) fn report(
    name: &str,
    dtype: DType,
    shape: &str,
    error: f32,
    non_finite: bool,
    bound: f32,
) -> bool {
    let ok = !non_finite && error <= bound;
    println!(
        "kernel {name:<22} {dtype:<5?} {shape:<22} rel_err {error:.2e} (bound {bound:.0e}) {}",
        if ok { "ok" } else { "FAIL" }
    );
    ok
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
