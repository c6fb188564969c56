//! Compiles the gRPC API (proto/) with a vendored protoc, and, with the `cuda` feature, our CUDA kernels
//! (kernels/ops.cu) to PTX with nvcc for CUDA_COMPUTE_CAP (default 90: H100/H200).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    compile_protos(&out_dir)?;
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels(&out_dir)?;
    }
    Ok(())
}

fn compile_protos(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // Build scripts run single-threaded; this only affects the protoc child process below.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure()
        // Info is also served as JSON at GET /info, and described in /openapi.json.
        .type_attribute(
            ".rerank.v1.InfoResponse",
            "#[derive(serde::Serialize, utoipa::ToSchema)]",
        )
        .type_attribute(
            ".rerank.v1.SchedulerStats",
            "#[derive(serde::Serialize, utoipa::ToSchema)]",
        )
        .type_attribute(
            ".rerank.v1.PromptTemplate",
            "#[derive(serde::Serialize, utoipa::ToSchema)]",
        )
        .type_attribute(
            ".rerank.v1.CutoffLayers",
            "#[derive(serde::Serialize, utoipa::ToSchema)]",
        )
        .file_descriptor_set_path(out_dir.join("rerank_descriptor.bin"))
        .compile_protos(&["proto/rerank/v1/rerank.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

fn compile_kernels(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    println!("cargo:rustc-env=RERANK_CUDA_COMPUTE_CAP={compute_cap}");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let ptx = out_dir.join("ops.ptx");
    let status = std::process::Command::new(&nvcc)
        .args([
            "--ptx",
            &format!("-arch=compute_{compute_cap}"),
            "-O3",
            "-std=c++17",
            "kernels/ops.cu",
            "-o",
        ])
        .arg(&ptx)
        .status()
        .map_err(|e| {
            format!(
                "running {nvcc} for the CUDA kernels: {e} (install the CUDA toolkit or see README)"
            )
        })?;
    if !status.success() {
        return Err(format!("{nvcc} failed to compile kernels/ops.cu ({status})").into());
    }
    Ok(())
}
