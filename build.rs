//! Generates the gRPC code and the reflection descriptor sets from `proto/`,
//! with `protox` so no system `protoc` is needed.
use std::{error::Error, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/tollgate/v1/tollgate.proto",
        "proto/tollgate/v1/console.proto",
        "proto/tollgate/v1/revocation.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tollgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // Envoy's ext_authz and rate-limit services and their imports (copied from the envoy-types
    // crate by scripts/vendor-protos): descriptors for reflection only, the
    // code comes from envoy-types.
    let envoy = protox::compile(
        [
            "envoy/service/auth/v3/external_auth.proto",
            "envoy/service/ratelimit/v3/rls.proto",
        ],
        ["proto/third_party"],
    )?;
    std::fs::write(out.join("envoy_descriptor.bin"), envoy.encode_to_vec())?;
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time: a new migration
    // must rebuild the binary that applies it.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
