//! Compiles `proto/tensorboard.proto` (TensorBoard's event-file messages) with protox, so a
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tensorboard.proto");
    let descriptors = protox::compile(["tensorboard.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
