//! Compiles the gRPC API (proto/) into Rust with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY-free: build scripts are single-threaded; this only affects the prost-build child process.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("rerank_descriptor.bin"))
        .compile_protos(&["proto/rerank/v1/rerank.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
