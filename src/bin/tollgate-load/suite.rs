//! `tollgate-load suite`: in one go, the no-op baselines (multi-thread and
//! current-thread), cached Authenticate over 10k keys, uncached
//! Authenticate (Postgres on every call), CheckQuota and ext_authz Check,
//! each as a ratio of the faster baseline; then latency at half of each
//! peak.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use prost::Message;
use serde::Serialize;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;

use crate::fixture::{free_port, limit, seed, FixtureOpts, Proc};
use crate::load::{self, LoadOpts, Report};
use crate::noop::Canned;
use crate::scenario::{self, Kind, Scenario};

#[derive(Debug, clap::Args)]
pub struct SuiteOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// Distinct keys (spread over 10 tenants).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    #[command(flatten)]
    pub load: LoadOpts,
    /// Rounds: every baseline and Tollgate run, alternating, this many times.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokio worker threads of the Tollgate processes (`TOKIO_WORKER_THREADS`;
    /// default: one per core).
    #[arg(long)]
    pub tollgate_threads: Option<usize>,
    /// Write the reports as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    round: usize,
    #[serde(flatten)]
    report: Report,
    /// Throughput over the same call's baseline; `None` for baselines.
    ratio: Option<f64>,
}

/// Starts this binary's `noop` server and waits for its address.
pub fn spawn_noop(shape: &str, canned: &std::path::Path) -> anyhow::Result<Proc> {
    let addr = free_port()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "noop",
            "--listen",
            &addr.to_string(),
            "--runtime",
            shape,
            "--canned",
        ])
        .arg(canned)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("listening on") {
        bail!("noop server ({shape}) did not start: {line:?}");
    }
    Ok(Proc::new(&format!("noop-{shape}"), child, addr, None))
}

/// Captures one real response of each benchmarked call, for the baseline.
pub async fn capture(target: &str, key: &str) -> anyhow::Result<Canned> {
    let ch = tonic::transport::Channel::from_shared(target.to_owned())?
        .connect()
        .await?;
    let mut auth = AuthServiceClient::new(ch.clone());
    let a = auth
        .authenticate(scenario::authenticate_request(key))
        .await?
        .into_inner();
    let q = auth
        .check_quota(scenario::check_quota_request(key))
        .await?
        .into_inner();
    let c = AuthorizationClient::new(ch)
        .check(scenario::check_request(key, 0))
        .await?
        .into_inner();
    if !a.allowed || !q.allowed || c.status.as_ref().is_some_and(|s| s.code != 0) {
        bail!("the seeded key is not allowed: {a:?}");
    }
    Ok(Canned {
        authenticate: hex::encode(a.encode_to_vec()),
        check_quota: hex::encode(q.encode_to_vec()),
        check: hex::encode(c.encode_to_vec()),
    })
}

async fn measure(
    name: &str,
    target: &str,
    kind: Kind,
    keys: &Arc<Vec<String>>,
    opts: &LoadOpts,
) -> anyhow::Result<Report> {
    let report = load::run(name, target, Scenario::new(kind, keys.clone()), opts).await?;
    println!("{}", report.line());
    Ok(report)
}

pub async fn run(o: SuiteOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let threads = o.tollgate_threads.map(|n| n.to_string());
    let mut env = vec![];
    if let Some(n) = &threads {
        env.push(("TOKIO_WORKER_THREADS", n.as_str()));
    }
    let cached = fixture.spawn("tollgate", &env).await?;
    eprintln!("seeding {} keys…", o.keys);
    let seeded = seed(
        &cached.target(),
        "bench",
        10,
        o.keys.div_ceil(10),
        vec![
            limit("key", "second", 1_000_000),
            limit("tenant", "month", 1_000_000_000_000),
        ],
    )
    .await?;
    let keys: Arc<Vec<String>> = Arc::new(seeded.into_iter().map(|s| s.key).collect());
    let uncached = fixture
        .spawn(
            "tollgate-uncached",
            &[env.as_slice(), &[("TOLLGATE_CACHE__MAX_KEYS", "1")]].concat(),
        )
        .await?;
    let canned = capture(&cached.target(), &keys[0]).await?;
    let canned_file =
        std::env::temp_dir().join(format!("tollgate-canned-{}.json", std::process::id()));
    std::fs::write(&canned_file, serde_json::to_string(&canned)?)?;
    let (a, q, c) = canned.sizes();
    println!(
        "response sizes (bytes): Authenticate {a}, CheckQuota {q}, Check {c}; keys {}",
        keys.len()
    );

    // Each call's baseline: the same messages against the no-op server on
    // both runtimes; the faster one counts. Baselines and Tollgate runs
    // alternate, round after round, and each ratio compares runs of the
    // same round, so drifts of a shared machine cancel out; the summary
    // gives the median over rounds.
    let noops = [
        ("multi", spawn_noop("multi", &canned_file)?),
        ("current", spawn_noop("current", &canned_file)?),
    ];
    let runs = [
        ("authenticate cached", &cached, Kind::Authenticate),
        ("check_quota", &cached, Kind::CheckQuota),
        ("ext_authz check", &cached, Kind::ExtAuthz),
        ("authenticate uncached", &uncached, Kind::Authenticate),
    ];
    let kinds = [Kind::Authenticate, Kind::CheckQuota, Kind::ExtAuthz];
    let mut rows: Vec<Row> = Vec::new();
    let mut series: Vec<Series> = Vec::new();
    let mut wins = [[0usize; 2]; 3];
    for round in 1..=o.rounds.max(1) {
        println!("-- round {round}");
        let mut base = [0f64; 3];
        for (k, kind) in kinds.into_iter().enumerate() {
            let mut best = (0f64, 0usize);
            for (n, (shape, noop)) in noops.iter().enumerate() {
                let name = format!("noop {} ({shape})", kind.label());
                let r = measure(&name, &noop.target(), kind, &keys, &o.load).await?;
                if r.rps > best.0 {
                    best = (r.rps, n);
                }
                rows.push(Row {
                    round,
                    report: r,
                    ratio: None,
                });
            }
            base[k] = best.0;
            wins[k][best.1] += 1;
            push(
                &mut series,
                &format!("baseline {}", kind.label()),
                None,
                best.0,
                1.0,
            );
        }
        for (name, proc, kind) in runs {
            let r = measure(name, &proc.target(), kind, &keys, &o.load).await?;
            let ratio = r.rps / base[kind_index(kind)];
            push(&mut series, name, Some(kind), r.rps, ratio);
            rows.push(Row {
                round,
                report: r,
                ratio: Some(ratio),
            });
        }
    }

    // Latency at half of each (median) peak, on the runtime that won most.
    let half = |rps: f64| LoadOpts {
        rate: Some((rps / 2.0) as u64),
        ..o.load.clone()
    };
    let mut latency = Vec::new();
    for (k, kind) in kinds.into_iter().enumerate() {
        let n = usize::from(wins[k][1] > wins[k][0]);
        let (shape, noop) = &noops[n];
        let peak = median(&series[k].2);
        let name = format!("noop {} ({shape}) @ half peak", kind.label());
        latency.push(measure(&name, &noop.target(), kind, &keys, &half(peak)).await?);
    }
    for (name, proc, kind) in runs {
        let peak = series
            .iter()
            .find(|s| s.0 == name)
            .map(|s| median(&s.2))
            .unwrap_or_default();
        let name = format!("{name} @ half peak");
        latency.push(measure(&name, &proc.target(), kind, &keys, &half(peak)).await?);
    }

    println!(
        "\nover {} round(s): ratio = throughput / the same call's no-op baseline (faster runtime) in the same round",
        o.rounds.max(1)
    );
    println!(
        "{:<30} {:>12} {:>13} {:>13}",
        "run", "median req/s", "median ratio", "min–max"
    );
    let mut summary = Vec::new();
    for (name, kind, rps, ratios) in &series {
        let (lo, hi) = min_max(ratios);
        println!(
            "{:<30} {:>12.0} {:>13} {:>13}",
            name,
            median(rps),
            kind.map(|_| format!("{:.2}", median(ratios)))
                .unwrap_or_default(),
            kind.map(|_| format!("{lo:.2}–{hi:.2}")).unwrap_or_default(),
        );
        summary.push(serde_json::json!({
            "name": name, "median_rps": median(rps), "rps": rps,
            "median_ratio": kind.map(|_| median(ratios)), "ratios": kind.map(|_| ratios),
        }));
    }
    println!(
        "\nlatency at half of the median peak\n{:<44} {:>9} {:>9} {:>9} {:>9}",
        "run", "req/s", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for r in &latency {
        println!(
            "{:<44} {:>9.0} {:>9.1} {:>9.1} {:>9.1}",
            r.name, r.rps, r.p50_us, r.p99_us, r.p999_us
        );
    }
    for r in rows.iter().map(|r| &r.report).chain(&latency) {
        if r.errors > 0 || r.denied > 0 {
            eprintln!(
                "warning: {}: {} denied, {} errors (first: {:?})",
                r.name, r.denied, r.errors, r.first_error
            );
        }
    }
    if let Some(path) = o.out {
        let all = serde_json::json!({ "rounds": rows, "summary": summary, "latency": latency });
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    let _ = std::fs::remove_file(&canned_file);
    drop((cached, uncached, noops));
    Ok(())
}

/// One run's figures over the rounds: name, the call it is a ratio for
/// (`None` for baselines), req/s per round, ratio per round.
type Series = (String, Option<Kind>, Vec<f64>, Vec<f64>);

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Authenticate => 0,
        Kind::CheckQuota => 1,
        Kind::ExtAuthz => 2,
    }
}

fn push(series: &mut Vec<Series>, name: &str, kind: Option<Kind>, rps: f64, ratio: f64) {
    match series.iter_mut().find(|s| s.0 == name) {
        Some(s) => {
            s.2.push(rps);
            s.3.push(ratio);
        }
        None => series.push((name.to_owned(), kind, vec![rps], vec![ratio])),
    }
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

fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
