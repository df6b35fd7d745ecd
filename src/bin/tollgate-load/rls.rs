//! `tollgate-load rls`: Envoy's rate-limit service
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) against
//! a no-op RLS server, driven by h2load (`crate::h2load`). Two requests, as
//! Envoy's ratelimit filter sends them:
//!
//! - `generic`: one profile descriptor (`remote_address`, one client), the
//!   GCRA bucket of an envoyproxy/ratelimit-style `[ratelimit]` descriptor;
//! - `api_key`: one `api_key` descriptor, the key's plan limits (a cached
//!   key, its key rate and tenant quota), as `CheckQuota` counts them.
//!
//! Every limit is far above what a run spends, so every answer is `OK`.
//! Each round runs, per request and alternating: the no-op server on the
//! current-thread and the multi-thread runtime (answering a response
//! captured from Tollgate, so the bytes match), then Tollgate. Each
//! Tollgate run is checked against its own counter
//! (`tollgate_ratelimit_descriptors_total{result="ok"}` must grow by
//! h2load's successes: h2load ignores gRPC trailers). Reported per run:
//! req/s, server CPU µs per request (from `/proc`), h2load's CPU, and the
//! ratio to the faster no-op shape of the same round.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message;
use serde::Serialize;

use crate::fixture::{limit, seed, FixtureOpts, Proc, OPERATOR_TOKEN};
use crate::h2load::{self, H2Opts, H2Run};

#[derive(Debug, clap::Args)]
pub struct RlsOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    #[command(flatten)]
    pub h2: H2Opts,
    /// Rounds: every no-op and Tollgate run, alternating, this many times.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write every run and the summary as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const DOMAIN: &str = "bench";
/// The counter of descriptors answered (`result="ok"` samples).
const DESCRIPTORS: &str = "tollgate_ratelimit_descriptors_total";

/// The default profile plus one descriptor no run can exhaust.
fn profile() -> String {
    format!(
        "{}\n[[ratelimit.domains]]\ndomain = \"{DOMAIN}\"\n\
         [[ratelimit.domains.descriptors]]\nkey = \"remote_address\"\n\
         rate_limit = {{ unit = \"hour\", requests_per_unit = 1000000000 }}\n",
        include_str!("../../../profiles/default.toml")
    )
}

fn request(key: &str, value: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: key.into(),
                value: value.into(),
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

#[derive(Debug, Clone, Serialize)]
struct Measured {
    round: usize,
    request: &'static str,
    server: String,
    #[serde(flatten)]
    run: H2Run,
    server_cpu_seconds: f64,
    server_us_per_request: f64,
    client_us_per_request: f64,
    /// OK answers Tollgate counted (`None`: a no-op server).
    ok_counted: Option<u64>,
    /// req/s over the faster no-op shape of the same request and round.
    ratio: Option<f64>,
}

/// Sum of the `result="ok"` samples of [`DESCRIPTORS`] in a scrape.
fn ok_answers(scrape: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(DESCRIPTORS) && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn scrape(proc: &Proc) -> anyhow::Result<String> {
    let addr = proc.metrics.context("no metrics port")?;
    Ok(reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?)
}

/// Starts this binary's `noop` server answering `ShouldRateLimit` with `canned`.
fn spawn_noop(shape: &str, canned: &Path) -> anyhow::Result<Proc> {
    crate::suite::spawn_noop_with(shape, "--canned-rls", canned)
}

/// One real answer, which must be OK with a limit applied.
async fn capture(target: &str, req: RateLimitRequest) -> anyhow::Result<RateLimitResponse> {
    let ch = tonic::transport::Channel::from_shared(target.to_owned())?
        .connect()
        .await?;
    let r = RateLimitServiceClient::new(ch)
        .should_rate_limit(crate::fixture::op(req))
        .await?
        .into_inner();
    ensure!(
        r.overall_code == Code::Ok as i32
            && r.statuses
                .first()
                .is_some_and(|s| s.current_limit.is_some()),
        "the benchmark request is not limited-and-allowed: {r:?}"
    );
    Ok(r)
}

async fn measure(
    proc: &Proc,
    tollgate: bool,
    body: &Path,
    h2: &H2Opts,
) -> anyhow::Result<(H2Run, f64, Option<u64>)> {
    let before = if tollgate {
        Some(ok_answers(&scrape(proc).await?))
    } else {
        None
    };
    let pid = proc.pid();
    let cpu_before = h2load::process_cpu_seconds(pid)?;
    let url = format!("{}{PATH}", proc.target());
    let run = {
        let (mut h2, body) = (h2.clone(), body.to_owned());
        // Profile descriptors are the gateway's claims: asked as the
        // operator (who may, like the gateway), the no-op gets it too.
        h2.headers = vec![format!("authorization: Bearer {OPERATOR_TOKEN}")];
        let n = h2.requests;
        tokio::task::spawn_blocking(move || h2load::run(&h2, &url, &body, n)).await??
    };
    let cpu = h2load::process_cpu_seconds(pid)? - cpu_before;
    ensure!(
        run.failed == 0 && run.errored == 0 && run.succeeded == run.requests,
        "{}: h2load: {} of {} succeeded ({} failed, {} errored)",
        proc.name,
        run.succeeded,
        run.requests,
        run.failed,
        run.errored
    );
    let counted = match before {
        Some(before) => {
            let counted = ok_answers(&scrape(proc).await?) - before;
            ensure!(
                counted == run.succeeded,
                "{}: Tollgate answered {counted} descriptors OK but h2load saw {} successes \
                 (h2load ignores gRPC trailers: some calls failed or were over the limit)",
                proc.name,
                run.succeeded
            );
            Some(counted)
        }
        None => None,
    };
    Ok((run, cpu, counted))
}

pub async fn run(o: RlsOpts) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tollgate-rls-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let profile_path = dir.join("profile.toml");
    std::fs::write(&profile_path, profile())?;
    let fixture = o.setup.fixture().await?;
    let profile_env = profile_path.to_string_lossy().into_owned();
    let tollgate = fixture
        .spawn("tollgate", &[("TOLLGATE_PROFILE", profile_env.as_str())])
        .await?;
    let keys = seed(
        &tollgate.target(),
        "rls",
        1,
        1,
        vec![
            limit("key", "second", 1_000_000),
            limit("tenant", "month", 1_000_000_000_000),
        ],
    )
    .await?;
    let key = &keys.first().context("no key seeded")?.key;

    let requests: [(&'static str, RateLimitRequest); 2] = [
        ("generic", request("remote_address", "203.0.113.7")),
        ("api_key", request("api_key", key)),
    ];
    // Per request: the framed body for h2load, and no-op servers answering
    // the response Tollgate gives to it.
    let mut setups = Vec::new();
    for (name, req) in &requests {
        let answer = capture(&tollgate.target(), req.clone()).await?;
        let body = dir.join(format!("{name}.bin"));
        std::fs::write(&body, h2load::grpc_frame(req))?;
        let canned = dir.join(format!("{name}.canned"));
        std::fs::write(&canned, hex::encode(answer.encode_to_vec()))?;
        println!(
            "{name}: request {} bytes, response {} bytes",
            req.encoded_len(),
            answer.encoded_len()
        );
        let noops = [
            ("current", spawn_noop("current", &canned)?),
            ("multi", spawn_noop("multi", &canned)?),
            ("per-core", spawn_noop("per-core", &canned)?),
        ];
        setups.push((*name, body, noops));
    }
    println!(
        "driver: h2load -n {} -c {} -m {} -t {} (one framed body per call); {} round(s), runs alternating",
        o.h2.requests,
        o.h2.clients,
        o.h2.streams,
        o.h2.threads,
        o.rounds.max(1)
    );

    let mut all: Vec<Measured> = Vec::new();
    for round in 1..=o.rounds.max(1) {
        println!("-- round {round}");
        for (name, body, noops) in &setups {
            let mut best = 0f64;
            let mut row = |server: String, m: (H2Run, f64, Option<u64>), ratio| {
                let (run, cpu, ok_counted) = m;
                let n = run.succeeded.max(1) as f64;
                let r = Measured {
                    round,
                    request: name,
                    server,
                    server_cpu_seconds: cpu,
                    server_us_per_request: cpu * 1e6 / n,
                    client_us_per_request: run.client_cpu_seconds * 1e6 / n,
                    ok_counted,
                    ratio,
                    run,
                };
                println!("{}", line(&r));
                all.push(r);
            };
            for (shape, noop) in noops {
                let m = measure(noop, false, body, &o.h2).await?;
                best = best.max(m.0.rps);
                row(format!("noop ({shape})"), m, None);
            }
            let m = measure(&tollgate, true, body, &o.h2).await?;
            let ratio = m.0.rps / best;
            row("tollgate".into(), m, Some(ratio));
        }
    }

    println!(
        "\nover {} round(s), medians; ratio = Tollgate's req/s / the faster no-op's, same round",
        o.rounds.max(1)
    );
    println!(
        "{:<10} {:>14} {:>14} {:>8} {:>11} {:>16} {:>16}",
        "request",
        "noop req/s",
        "tollgate req/s",
        "ratio",
        "ratio range",
        "noop server µs",
        "tollgate srv µs"
    );
    let mut summary = Vec::new();
    for (name, _) in &requests {
        let of = |tollgate: bool, f: fn(&Measured) -> f64| -> Vec<f64> {
            let rows = all
                .iter()
                .filter(|m| m.request == *name && (m.server == "tollgate") == tollgate);
            if tollgate {
                rows.map(f).collect()
            } else {
                // The faster no-op of each round.
                let mut best: Vec<(usize, f64, f64)> = Vec::new();
                for m in rows {
                    match best.iter_mut().find(|b| b.0 == m.round) {
                        Some(b) if b.1 >= m.run.rps => {}
                        Some(b) => *b = (m.round, m.run.rps, f(m)),
                        None => best.push((m.round, m.run.rps, f(m))),
                    }
                }
                best.into_iter().map(|b| b.2).collect()
            }
        };
        let ratios: Vec<f64> = of(true, |m| m.ratio.unwrap_or_default());
        let (lo, hi) = ratios
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        let row = serde_json::json!({
            "request": name,
            "noop_rps": median(&of(false, |m| m.run.rps)),
            "tollgate_rps": median(&of(true, |m| m.run.rps)),
            "ratio": median(&ratios),
            "ratio_min": lo,
            "ratio_max": hi,
            "noop_server_us_per_request": median(&of(false, |m| m.server_us_per_request)),
            "tollgate_server_us_per_request": median(&of(true, |m| m.server_us_per_request)),
        });
        println!(
            "{:<10} {:>14.0} {:>14.0} {:>8.2} {:>11} {:>16.2} {:>16.2}",
            name,
            row["noop_rps"].as_f64().unwrap_or_default(),
            row["tollgate_rps"].as_f64().unwrap_or_default(),
            row["ratio"].as_f64().unwrap_or_default(),
            format!("{lo:.2}–{hi:.2}"),
            row["noop_server_us_per_request"]
                .as_f64()
                .unwrap_or_default(),
            row["tollgate_server_us_per_request"]
                .as_f64()
                .unwrap_or_default(),
        );
        summary.push(row);
    }
    if let Some(path) = o.out {
        let json = serde_json::json!({ "runs": all, "summary": summary });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    drop((tollgate, setups));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn line(m: &Measured) -> String {
    format!(
        "{:<8} {:<16} {:>9.0} req/s  server {:>6.2} µs/req  h2load {:>5.2} µs/req{}",
        m.request,
        m.server,
        m.run.rps,
        m.server_us_per_request,
        m.client_us_per_request,
        m.ratio
            .map(|r| format!("  ratio {r:.2}"))
            .unwrap_or_default()
    )
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ok_samples_of_the_descriptor_counter_are_summed() {
        let scrape = "# TYPE tollgate_ratelimit_descriptors_total counter\n\
            tollgate_ratelimit_descriptors_total{kind=\"generic\",result=\"ok\"} 7\n\
            tollgate_ratelimit_descriptors_total{kind=\"credential\",result=\"ok\"} 5\n\
            tollgate_ratelimit_descriptors_total{kind=\"generic\",result=\"over_limit\"} 3\n\
            tollgate_decisions_total{outcome=\"allow\",result=\"ok\"} 100\n";
        assert_eq!(ok_answers(scrape), 12);
    }

    #[test]
    fn the_bench_profile_loads_with_its_descriptor() {
        let p = tollgate::profile::Profile::from_toml(&profile()).unwrap();
        let target = p
            .ratelimit
            .classify(DOMAIN, &[("remote_address", "203.0.113.7")]);
        assert!(
            matches!(
                target,
                tollgate::domain::ratelimit::Target::Generic(Some(_))
            ),
            "{target:?}"
        );
    }
}
