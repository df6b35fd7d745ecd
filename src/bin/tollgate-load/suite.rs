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
    // both runtimes; the faster one counts.
    let noops = [
        ("multi", spawn_noop("multi", &canned_file)?),
        ("current", spawn_noop("current", &canned_file)?),
    ];
    let mut rows: Vec<(Report, Option<Kind>)> = Vec::new();
    let mut baselines: Vec<(Kind, Report, &Proc)> = Vec::new();
    for kind in [Kind::Authenticate, Kind::CheckQuota, Kind::ExtAuthz] {
        for (shape, noop) in &noops {
            let r = measure(
                &format!("noop {} ({shape})", kind.label()),
                &noop.target(),
                kind,
                &keys,
                &o.load,
            )
            .await?;
            match baselines.iter_mut().find(|b| b.0 == kind) {
                Some(b) if b.1.rps >= r.rps => {}
                Some(b) => *b = (kind, r.clone(), noop),
                None => baselines.push((kind, r.clone(), noop)),
            }
            rows.push((r, None));
        }
    }
    let baseline = |kind: Kind| {
        baselines
            .iter()
            .find(|b| b.0 == kind)
            .map(|b| b.1.clone())
            .expect("every kind has a baseline")
    };

    let runs = [
        ("authenticate cached", &cached, Kind::Authenticate),
        ("check_quota", &cached, Kind::CheckQuota),
        ("ext_authz check", &cached, Kind::ExtAuthz),
        ("authenticate uncached", &uncached, Kind::Authenticate),
    ];
    let mut peaks = Vec::new();
    for (name, proc, kind) in runs {
        let r = measure(name, &proc.target(), kind, &keys, &o.load).await?;
        peaks.push((name.to_owned(), proc, kind, r.rps));
        rows.push((r, Some(kind)));
    }
    // Latency at half of each peak, baselines included.
    let half = |rps: f64| LoadOpts {
        rate: Some((rps / 2.0) as u64),
        ..o.load.clone()
    };
    for (kind, b, noop) in &baselines {
        let name = format!("{} @ half peak", b.name);
        rows.push((
            measure(&name, &noop.target(), *kind, &keys, &half(b.rps)).await?,
            None,
        ));
    }
    for (name, proc, kind, rps) in peaks {
        let name = format!("{name} @ half peak");
        rows.push((
            measure(&name, &proc.target(), kind, &keys, &half(rps)).await?,
            Some(kind),
        ));
    }

    println!("\nratio = throughput / the same call's no-op baseline (faster runtime)");
    println!(
        "{:<36} {:>9} {:>6} {:>9} {:>9} {:>9} {:>7}",
        "run", "req/s", "ratio", "p50 µs", "p99 µs", "p99.9 µs", "errors"
    );
    let mut out = Vec::new();
    for (r, kind) in rows {
        let ratio = kind.map(|k| r.rps / baseline(k).rps);
        println!(
            "{:<36} {:>9.0} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>7}",
            r.name,
            r.rps,
            ratio.map(|x| format!("{x:.2}")).unwrap_or_default(),
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.errors
        );
        if r.errors > 0 || r.denied > 0 {
            eprintln!(
                "warning: {}: {} denied, {} errors (first: {:?})",
                r.name, r.denied, r.errors, r.first_error
            );
        }
        out.push(Row { report: r, ratio });
    }
    if let Some(path) = o.out {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    let _ = std::fs::remove_file(&canned_file);
    drop((cached, uncached));
    Ok(())
}
