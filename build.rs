//! Generates the gRPC code and the reflection descriptor set from `proto/`,
//! with `protox` so no system `protoc` is needed.
use std::{error::Error, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/tollgate/v1/tollgate.proto",
        "proto/tollgate/v1/console.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tollgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
