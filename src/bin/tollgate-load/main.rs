//! `tollgate-load`: the load driver and no-op baseline behind BENCHMARKS.md.
//!
//! - `suite`: baselines, cached/uncached Authenticate, CheckQuota and
//!   ext_authz Check against real `tollgate serve` processes on Postgres,
//!   each as a ratio of the faster no-op baseline.
//! - `replicas`: three instances on one Postgres: revocation lag and quota
//!   accuracy with one instance killed mid-run.
//! - `envoy`: HTTP through Envoy without and with ext_authz (wrk).
//! - `gateways`: HTTP through NGINX alone, with a no-op `auth_request`
//!   server, and with Tollgate's forward-auth (wrk).
//! - `abuse`: a flood of random well-formed keys beside legitimate traffic.
//! - `skew`: one key's traffic through one connection to one of three
//!   replicas: admitted rate against the documented one, and the fleet's
//!   total against rate plus burst.
//! - `memory`: resident bytes per cached key.
//! - `soak`: three replicas at half of peak for 60 s while Postgres restarts
//!   twice and one replica is killed and started again: wrong decisions,
//!   errors by kind, p99 before/during/after.
//! - `known`: the known-digest filter with 1M and 10M stored keys (seeded
//!   with SQL): replica RSS against a baseline build, statements per 1000
//!   unknown keys, the filter's false-positive rate.
//! - `fleet`: ten small replicas on one Postgres under load: statements
//!   per second per 1000 decisions/s, heartbeat and lease writes.
//! - `rls`: Envoy's rate-limit service (`ShouldRateLimit`) against a no-op
//!   RLS server (h2load).
//! - `h2drive`: the suite's client for many distinct keys (h2 crate,
//!   reads gRPC trailers); `crate::h2drive`.
//! - `run`, `noop`: the pieces, for ad-hoc runs.
//!
//! `scripts/bench` runs them all; see BENCHMARKS.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod abuse;
mod envoy;
mod fixture;
mod gateways;
mod h2drive;
mod h2load;
mod load;
mod memory;
mod noop;
mod pg;
mod replicas;
mod rls;
mod scenario;
mod skew;
mod soak;
mod suite;
// Issue 14, scale: the known-digest filter and many replicas.
mod fleet;
mod known;
mod pgstat;

#[derive(Parser)]
#[command(
    name = "tollgate-load",
    about = "Load driver and no-op baseline for Tollgate"
)]
struct Cli {
    /// Worker threads of the driver's own runtime (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the no-op baseline until killed.
    Noop {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "current")]
        runtime: noop::RuntimeShape,
        /// Canned responses (JSON) captured from a real Tollgate; default: empty messages.
        #[arg(long)]
        canned: Option<PathBuf>,
        /// A canned ShouldRateLimit response (hex of the encoded message).
        #[arg(long)]
        canned_rls: Option<PathBuf>,
    },
    /// Drive one scenario against a running server.
    Run {
        /// e.g. http://127.0.0.1:50051
        #[arg(long)]
        target: String,
        #[arg(long, value_enum)]
        scenario: scenario::Kind,
        /// File with one API key per line.
        #[arg(long)]
        keys: PathBuf,
        #[command(flatten)]
        load: load::LoadOpts,
    },
    /// Baselines and every decision path, as ratios of the baseline.
    Suite(suite::SuiteOpts),
    /// Three replicas: revocation lag and quota accuracy with a kill.
    Replicas(replicas::ReplicaOpts),
    /// Half of peak for 60 s through Postgres restarts and a replica kill.
    Soak(soak::SoakOpts),
    /// HTTP through Envoy without and with Tollgate's ext_authz (wrk).
    Envoy(envoy::EnvoyOpts),
    /// Random well-formed keys flooding beside legitimate ones.
    Abuse(abuse::AbuseOpts),
    /// One key skewed onto one of three replicas: fair rate shares.
    Skew(skew::SkewOpts),
    /// HTTP through NGINX alone, with a no-op auth_request server, and with
    /// Tollgate's forward-auth (wrk).
    Gateways(gateways::GatewayOpts),
    /// Serve the no-op forward-auth baseline until killed.
    NoopHttp {
        #[arg(long)]
        listen: SocketAddr,
        /// Headers to answer with, as JSON `[["name", "value"], …]`.
        #[arg(long, default_value = "[]")]
        header: String,
    },
    /// Envoy's ShouldRateLimit against a no-op RLS server (h2load).
    Rls(rls::RlsOpts),
    /// A lean HTTP/2 gRPC client (h2 crate, one current-thread runtime):
    /// cycles over many framed bodies, reads trailers, prints one JSON line.
    H2drive(h2drive::DriveOpts),
    /// Resident memory per cached key.
    Memory {
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
    },
    /// The known-digest filter at 1M and 10M stored keys.
    Known(known::KnownOpts),
    /// Ten small replicas on one Postgres: statements per decision.
    Fleet(fleet::FleetOpts),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = || {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = cli.threads {
            b.worker_threads(n);
        }
        b.enable_all().build()
    };
    match cli.command {
        Cmd::Noop {
            listen,
            runtime,
            canned,
            canned_rls,
        } => {
            let canned = match canned {
                Some(path) => noop::Canned::load(&path)?,
                None => noop::Canned::default(),
            };
            let rls = match canned_rls {
                Some(path) => std::fs::read_to_string(path)?,
                None => String::new(),
            };
            noop::serve(listen, runtime, canned, &rls)
        }
        Cmd::Memory { keys } => memory::run(keys),
        Cmd::NoopHttp { listen, header } => {
            gateways::serve_noop(listen, serde_json::from_str(&header)?)
        }
        Cmd::Gateways(o) => runtime()?.block_on(gateways::run(o)),
        Cmd::Run {
            target,
            scenario,
            keys,
            load,
        } => runtime()?.block_on(async move {
            let keys: Vec<String> = std::fs::read_to_string(keys)?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            let s = scenario::Scenario::new(scenario, Arc::new(keys));
            let report = load::run(&format!("{scenario:?}"), &target, s, &load).await?;
            println!("{}", report.line());
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }),
        Cmd::Suite(o) => runtime()?.block_on(suite::run(o)),
        Cmd::Replicas(o) => runtime()?.block_on(replicas::run(o)),
        Cmd::Abuse(o) => runtime()?.block_on(abuse::run(o)),
        Cmd::Skew(o) => runtime()?.block_on(skew::run(o)),
        Cmd::Envoy(o) => runtime()?.block_on(envoy::run(o)),
        Cmd::Soak(o) => runtime()?.block_on(soak::run(o)),
        Cmd::Known(o) => runtime()?.block_on(known::run(o)),
        Cmd::Fleet(o) => runtime()?.block_on(fleet::run(o)),
        Cmd::Rls(o) => runtime()?.block_on(rls::run(o)),
        Cmd::H2drive(o) => h2drive::main(&o),
    }
}
