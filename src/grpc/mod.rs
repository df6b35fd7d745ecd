//! The gRPC surface: generated code, handlers, the error table, caller
//! identification (see [`crate::access`] for the rules) and the management
//! budget.

pub mod auth_api;
pub mod budget;
pub mod caller;
pub mod console_api;
pub mod convert;
pub mod envoy;
pub mod operator;
pub mod ratelimit;
pub mod revocation_api;
pub mod status;
pub mod tenant_api;

/// Generated `tollgate.v1` messages, clients and servers.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("tollgate.v1");

    /// Encoded descriptors of `tollgate.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));

    /// Encoded descriptors of Envoy's `envoy.service.auth.v3` and
    /// `envoy.service.ratelimit.v3` and their imports (from `proto/third_party/`), for server reflection.
    pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));
}
