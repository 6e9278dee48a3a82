//! Compiles the vendored gRPC protocol files (`proto/`, see `proto/README.md`) into Rust: the
//! Open Inference Protocol (`inference.GRPCInferenceService`, Triton's superset of KServe v2)
//! `grpc.health.v1`, and streamserve's own `streamserve.speech.v1.Speech`. The protobuf compiler is protox, in pure Rust, so a build needs no
//! `protoc` and downloads nothing; the compiled descriptors also feed server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `grpc_service.proto` imports "model_config.proto" from its own directory.
    let files = protox::compile(
        [
            "grpc_service.proto",
            "grpc/health/v1/health.proto",
            "streamserve/speech.proto",
        ],
        ["proto/inference", "proto"],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptors.bin"), files.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Triton's comments are reStructuredText, which rustdoc would read as Markdown (and
        // its indented blocks as doctests).
        .disable_comments(["."])
        .compile_fds(files)?;
    Ok(())
}
