//! Tollgate: a gRPC authorization service. API keys and JWTs in;
//! decisions, principals and limits out. See README.md and ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod access;
pub mod app;
pub mod authz;
pub mod cache;
pub mod clock;
pub mod config;
pub mod console;
pub mod crypto;
pub mod dashboard;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod limits;
pub mod manage;
pub mod profile;
pub mod readiness;
pub mod remote;
pub mod store;
pub mod telemetry;
pub mod tls;
