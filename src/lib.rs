//! Tollgate: a gRPC authorization service. API keys and JWTs in;
//! decisions, principals and limits out. See README.md and ARCHITECTURE.md.
//!
//! Imports point one way, down this list (a module imports only from
//! modules on its own line or above):
//!
//! - `clock`, `telemetry` (metric names, log and trace setup, and their
//!   settings types), `webhook` (the signed-webhook sender the console's
//!   delivery and revocation events share): leaves, they import nothing
//!   from the crate;
//! - `domain`, `crypto`, `profile`: the rules, no I/O;
//! - `store`: persistence behind the `Store` trait; `error`: the
//!   operations' error enum (wraps `StoreError`);
//! - `limits`, `cache`, `readiness`: counters, caches, the invalidation
//!   follower;
//! - `access`, `authz`, `manage`, `console`, `dashboard`: the operations;
//! - `grpc`: transport, the one mapping to `tonic::Status`; `forward_auth`:
//!   HTTP forward-auth for NGINX and Traefik, over `grpc::envoy`'s decision;
//! - `grpc`: transport, the one mapping to `tonic::Status`; `leak_reports`:
//!   the GitHub secret-scanning HTTP endpoint (a transport of its own);
//! - `app`: wiring and background tasks; `remote`, `tls`: clients;
//! - `config`: the one settings parser; it imports each layer's settings
//!   type (each layer owns its settings) and no layer imports it (only
//!   unit tests that parse a layer's settings through it);
//! - `main.rs`, `src/bin`: processes.
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
pub mod forward_auth;
pub mod grpc;
pub mod leak_reports;
pub mod limits;
pub mod manage;
pub mod memory;
pub mod net;
pub mod profile;
pub mod ratelimit;
pub mod readiness;
pub mod remote;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhook;
