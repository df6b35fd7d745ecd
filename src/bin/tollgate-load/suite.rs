//! `tollgate-load suite`: the decision paths against no-op servers, in
//! the same rounds, driven by h2load (`crate::h2load`), a client cheaper
//! than the servers it drives. Each round runs, call by call and
//! alternating: the no-op tonic server on the current-thread runtime, the
//! multi-thread runtime and per-core connection workers (Tollgate's
//! default shape, `tollgate::app::workers`), Tollgate (and, with
//! `--before`, an older Tollgate binary on the same database), then
//! uncached Authenticate. Each Tollgate run is checked against Tollgate's
//! own decision counters: the allowed count must equal the client's
//! successes, or the suite fails. Reported per run: req/s, server CPU µs
//! per request, Postgres CPU µs per request (every `postgres` process on
//! the machine), the client's CPU, and the ratio to the fastest no-op
//! shape of the same call in the same round.
//!
//! h2load sends one body, so one API key, per run. Every round ends with
//! Authenticate over all `--keys` distinct keys, driven by h2drive
//! (`crate::h2drive`, same `-n`/`-c`/`-m`, one framed body per key cycled
//! over): the no-op (current-thread and per-core), uncached Tollgate,
//! cached Tollgate; the two Tollgate rows' ratio is to the faster of those
//! no-op runs of the same round. Those ratios compare h2drive runs only:
//! h2drive costs about 1.5–2× h2load's CPU per request (h2's per-stream
//! work), so on shared cores its no-op run reaches fewer req/s than
//! h2load's and its ratios are not interchangeable with the h2load rows'.
//! Compare req/s and server µs.
//!
//! The tonic driver (`crate::load`) is used only for latency at a paced
//! rate over many distinct keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use prost::Message;
use serde::Serialize;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;

use crate::fixture::{limit, seed, spawn_self, FixtureOpts, Proc};
use crate::h2drive;
use crate::h2load::{self, H2Opts, H2Run};
use crate::load::{self, LoadOpts, Report};
use crate::noop::Canned;
use crate::scenario::{self, Kind, Scenario};

#[derive(Debug, clap::Args)]
pub struct SuiteOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// Distinct keys (spread over 10 tenants) for the h2drive rows and the
    /// paced latency runs (tonic driver); h2load sends one key per call.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    #[command(flatten)]
    pub h2: H2Opts,
    /// The paced latency runs (tonic driver): duration, warm-up, connections, concurrency.
    #[command(flatten)]
    pub load: LoadOpts,
    /// Requests per second of the latency runs (tonic driver); 0 skips them.
    #[arg(long, default_value_t = 20_000)]
    pub latency_rate: u64,
    /// Rounds: every no-op and Tollgate run, alternating, this many times.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokio worker threads of the Tollgate processes (`TOLLGATE_WORKER_THREADS`;
    /// default: Tollgate's own default).
    #[arg(long)]
    pub tollgate_threads: Option<usize>,
    /// An older `tollgate` binary ("before") to run in the same rounds, next
    /// to this one on every call, on the same database: after it in odd
    /// rounds, before it in even ones (whichever runs second tends to gain).
    #[arg(long)]
    pub before: Option<PathBuf>,
    /// Write every run and the summary as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only the runs whose name contains this (and the no-op runs they are
    /// compared to), for measuring one path again.
    #[arg(long)]
    pub only: Option<String>,
}

/// The targets: (run name, ratio required of it); `{n}` is the number of
/// distinct keys.
const TARGETS: [(&str, f64); 5] = [
    ("tollgate authenticate cached", 0.85),
    ("tollgate check_quota", 0.80),
    ("tollgate ext_authz check", 0.80),
    ("tollgate authenticate uncached", 0.30),
    (
        "tollgate authenticate uncached, {n} distinct keys (h2drive)",
        0.30,
    ),
];

/// The ratio required of run `name` (with `n` distinct keys), if any.
fn target_of(name: &str, n: usize) -> Option<f64> {
    TARGETS
        .iter()
        .find(|(t, _)| t.replace("{n}", &n.to_string()) == name)
        .map(|(_, r)| *r)
}

/// Which client drives a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    /// h2load, one framed body (one key).
    H2load,
    /// `tollgate-load h2drive`, one framed body per distinct key.
    H2drive,
}

impl Driver {
    fn label(self) -> &'static str {
        match self {
            Driver::H2load => "h2load",
            Driver::H2drive => "h2drive",
        }
    }
}

/// Baseline groups: one per call under h2load, and Authenticate over
/// distinct keys under h2drive.
const GROUPS: usize = 4;
const DISTINCT_GROUP: usize = 3;

/// Metric names Tollgate counts allowed answers under.
const DECISIONS: &str = "tollgate_decisions_total";
const QUOTA_CHECKS: &str = "tollgate_quota_checks_total";

/// One server to drive with one call.
struct Target<'a> {
    name: String,
    kind: Kind,
    proc: &'a Proc,
    /// The counter whose `outcome="allow"` samples must grow by the
    /// client's successes (`None`: a no-op server, which counts nothing).
    verify: Option<&'static str>,
    baseline: bool,
    driver: Driver,
}

impl Target<'_> {
    /// The baseline group whose fastest no-op run this run is compared to.
    fn group(&self) -> usize {
        match self.driver {
            Driver::H2load => kind_index(self.kind),
            Driver::H2drive => DISTINCT_GROUP,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Measured {
    round: usize,
    name: String,
    call: &'static str,
    /// The client: h2load or h2drive.
    driver: &'static str,
    #[serde(flatten)]
    run: H2Run,
    server_cpu_seconds: f64,
    server_us_per_request: f64,
    /// CPU of every `postgres` process on this machine over the run, per
    /// request (the uncached rows' other cost; about 0 for the rest).
    postgres_us_per_request: f64,
    client_us_per_request: f64,
    /// The client's CPU time over the run's wall time (1.0 = one core).
    client_cores: f64,
    /// Allowed answers counted by Tollgate (`None`: no-op server).
    allowed_counted: Option<u64>,
    /// req/s over the fastest no-op shape of the same call, same round.
    ratio: Option<f64>,
}

/// Starts this binary's `noop` server answering the gRPC calls with the
/// responses in `canned`, and waits for its address.
pub fn spawn_noop(shape: &str, canned: &std::path::Path) -> anyhow::Result<Proc> {
    spawn_noop_with(shape, "--canned", canned)
}

/// Starts this binary's `noop` server on `shape` with `flag canned` (the
/// gRPC calls' responses, or `--canned-rls` for ShouldRateLimit).
pub fn spawn_noop_with(shape: &str, flag: &str, canned: &std::path::Path) -> anyhow::Result<Proc> {
    let args: [&std::ffi::OsStr; 4] = [
        "--runtime".as_ref(),
        shape.as_ref(),
        flag.as_ref(),
        canned.as_os_str(),
    ];
    spawn_self(&format!("noop-{shape}"), "noop", &args)
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

/// Tollgate's count of allowed answers under `metric` (every
/// `outcome="allow"` sample summed).
async fn allowed(proc: &Proc, metric: &str) -> anyhow::Result<u64> {
    let addr = proc.metrics.context("no metrics port")?;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(allowed_in(&text, metric) as u64)
}

/// Sums `metric`'s samples labelled `outcome="allow"` in a Prometheus scrape.
fn allowed_in(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains("outcome=\"allow\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One run against `t` (h2load or h2drive, by `t.driver`; `body` is its
/// body or bodies file), with the server's CPU read around it and the
/// allowed answers checked against Tollgate's counters.
async fn measure(
    t: &Target<'_>,
    body: &Path,
    h2: &H2Opts,
    requests: u64,
    round: usize,
) -> anyhow::Result<Measured> {
    let url = format!("{}{}", t.proc.target(), path_of(t.kind));
    let counted_before = match t.verify {
        Some(metric) => Some(allowed(t.proc, metric).await?),
        None => None,
    };
    let pid = t.proc.pid();
    let cpu_before = h2load::process_cpu_seconds(pid)?;
    let postgres_before = postgres_cpu_seconds();
    let run = {
        let (h2, body, driver) = (h2.clone(), body.to_owned(), t.driver);
        tokio::task::spawn_blocking(move || match driver {
            Driver::H2load => h2load::run(&h2, &url, &body, requests),
            Driver::H2drive => h2drive::run(&h2, &url, &body, requests),
        })
        .await??
    };
    let server_cpu_seconds = h2load::process_cpu_seconds(pid)? - cpu_before;
    let postgres_cpu = (postgres_cpu_seconds() - postgres_before).max(0.0);
    if run.failed > 0 || run.errored > 0 || run.succeeded != run.requests {
        bail!(
            "{}: {}: {} of {} succeeded ({} failed, {} errored)",
            t.name,
            t.driver.label(),
            run.succeeded,
            run.requests,
            run.failed,
            run.errored
        );
    }
    let allowed_counted = match (t.verify, counted_before) {
        (Some(metric), Some(before)) => {
            let counted = allowed(t.proc, metric).await? - before;
            if counted != run.succeeded {
                bail!(
                    "{}: Tollgate counted {counted} allowed answers ({metric}) but {} {} successes: \
                     some answers were denials or gRPC errors (h2load ignores trailers)",
                    t.name,
                    t.driver.label(),
                    run.succeeded
                );
            }
            Some(counted)
        }
        _ => None,
    };
    let n = run.succeeded.max(1) as f64;
    Ok(Measured {
        round,
        name: t.name.clone(),
        call: t.kind.label(),
        driver: t.driver.label(),
        server_cpu_seconds,
        server_us_per_request: server_cpu_seconds * 1e6 / n,
        postgres_us_per_request: postgres_cpu * 1e6 / n,
        client_us_per_request: run.client_cpu_seconds * 1e6 / n,
        client_cores: run.client_cpu_seconds / run.seconds.max(1e-9),
        allowed_counted,
        ratio: None,
        run,
    })
}

/// CPU seconds used so far by every process named `postgres` on this
/// machine (the server and its backends). Pool connections live through a
/// run, so the difference around it is Postgres's share of the run.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .filter_map(|pid| h2load::process_cpu_seconds(pid).ok())
        .sum()
}

fn path_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Authenticate => "/tollgate.v1.AuthService/Authenticate",
        Kind::CheckQuota => "/tollgate.v1.AuthService/CheckQuota",
        Kind::ExtAuthz => "/envoy.service.auth.v3.Authorization/Check",
    }
}

fn line(m: &Measured) -> String {
    format!(
        "{:<62} {:>9.0} req/s  server {:>6.2} µs/req  postgres {:>5.2}  {:<7} {:>5.2} µs/req ({:>3.0}% of a core){}",
        m.name,
        m.run.rps,
        m.server_us_per_request,
        m.postgres_us_per_request,
        m.driver,
        m.client_us_per_request,
        m.client_cores * 100.0,
        m.ratio
            .map(|r| format!("  ratio {r:.2}"))
            .unwrap_or_default()
    )
}

pub async fn run(o: SuiteOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let threads = o.tollgate_threads.map(|n| n.to_string());
    let mut env = vec![];
    if let Some(n) = &threads {
        env.push(("TOLLGATE_WORKER_THREADS", n.as_str()));
    }
    let cached = fixture.spawn("tollgate", &env).await?;
    eprintln!("seeding {} keys…", o.keys);
    let seeded = seed(
        &cached.target(),
        "bench",
        10,
        o.keys.max(1).div_ceil(10),
        vec![
            limit("key", "second", 1_000_000),
            limit("tenant", "month", 1_000_000_000_000),
        ],
    )
    .await?;
    let keys: Arc<Vec<String>> = Arc::new(seeded.into_iter().map(|s| s.key).collect());
    // Every call misses the key cache: the benchmark-only setting
    // (README.md, `cache.benchmark_bypass_key_cache`).
    let uncached = fixture
        .spawn(
            "tollgate-uncached",
            &[
                env.as_slice(),
                &[("TOLLGATE_CACHE__BENCHMARK_BYPASS_KEY_CACHE", "true")],
            ]
            .concat(),
        )
        .await?;
    let before = match &o.before {
        Some(bin) => Some(
            fixture
                .with_binary(bin.clone())
                .spawn("tollgate-before", &env)
                .await?,
        ),
        None => None,
    };
    let before_uncached = match &o.before {
        Some(bin) => Some(
            fixture
                .with_binary(bin.clone())
                .spawn(
                    "tollgate-before-uncached",
                    &[
                        env.as_slice(),
                        &[("TOLLGATE_CACHE__BENCHMARK_BYPASS_KEY_CACHE", "true")],
                    ]
                    .concat(),
                )
                .await?,
        ),
        None => None,
    };
    let canned = capture(&cached.target(), &keys[0]).await?;
    let dir = std::env::temp_dir().join(format!("tollgate-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let canned_file = dir.join("canned.json");
    std::fs::write(&canned_file, serde_json::to_string(&canned)?)?;
    let (a, q, c) = canned.sizes();
    println!(
        "response sizes (bytes): Authenticate {a}, CheckQuota {q}, Check {c}; keys seeded {}",
        keys.len()
    );
    // One framed request body per call, all with the first key.
    let kinds = [Kind::Authenticate, Kind::CheckQuota, Kind::ExtAuthz];
    let mut bodies = Vec::new();
    for kind in kinds {
        let key = &keys[0];
        let framed = match kind {
            Kind::Authenticate => h2load::grpc_frame(&scenario::authenticate_request(key)),
            Kind::CheckQuota => h2load::grpc_frame(&scenario::check_quota_request(key)),
            Kind::ExtAuthz => h2load::grpc_frame(&scenario::check_request(key, 0)),
        };
        let file = dir.join(format!("{}.bin", kind.label().replace(' ', "_")));
        std::fs::write(&file, framed)?;
        bodies.push(file);
    }
    // Every seeded key's Authenticate request, for h2drive.
    let distinct_file = dir.join("authenticate_distinct.bin");
    h2drive::write_bodies(
        &distinct_file,
        keys.iter()
            .map(|k| h2load::grpc_frame(&scenario::authenticate_request(k))),
    )?;
    let body = |t: &Target| match t.driver {
        Driver::H2load => bodies[kind_index(t.kind)].as_path(),
        Driver::H2drive => distinct_file.as_path(),
    };

    let noops = [
        ("current", spawn_noop("current", &canned_file)?),
        ("multi", spawn_noop("multi", &canned_file)?),
        ("per-core", spawn_noop("per-core", &canned_file)?),
    ];
    // The order of one round: per call, the no-op shapes, then Tollgate
    // (then "before"); uncached Authenticate last.
    let mut targets: Vec<Target> = Vec::new();
    for kind in kinds {
        for (shape, noop) in &noops {
            targets.push(Target {
                name: format!("noop {} ({shape}-thread)", kind.label()),
                kind,
                proc: noop,
                verify: None,
                baseline: true,
                driver: Driver::H2load,
            });
        }
        let metric = if kind == Kind::CheckQuota {
            QUOTA_CHECKS
        } else {
            DECISIONS
        };
        let label = if kind == Kind::Authenticate {
            "authenticate cached"
        } else {
            kind.label()
        };
        targets.push(Target {
            name: format!("tollgate {label}"),
            kind,
            proc: &cached,
            verify: Some(metric),
            baseline: false,
            driver: Driver::H2load,
        });
        if let Some(b) = &before {
            // An older binary may not count CheckQuota answers: it is then
            // checked by h2load's status codes only (said in the output).
            targets.push(Target {
                name: format!("before: tollgate {label}"),
                kind,
                proc: b,
                verify: Some(metric),
                baseline: false,
                driver: Driver::H2load,
            });
        }
    }
    targets.push(Target {
        name: "tollgate authenticate uncached".into(),
        kind: Kind::Authenticate,
        proc: &uncached,
        verify: Some(DECISIONS),
        baseline: false,
        driver: Driver::H2load,
    });
    // Authenticate over every distinct key (h2drive): the no-op on the
    // current-thread runtime and on per-core connection workers (the two
    // faster shapes for Authenticate), then uncached and cached Tollgate,
    // compared to the faster of those no-op runs.
    let n = keys.len();
    for (name, proc, verify, baseline) in [
        (
            format!("noop authenticate, {n} distinct keys (h2drive, current-thread)"),
            &noops[0].1,
            None,
            true,
        ),
        (
            format!("noop authenticate, {n} distinct keys (h2drive, per-core)"),
            &noops[2].1,
            None,
            true,
        ),
        (
            format!("tollgate authenticate uncached, {n} distinct keys (h2drive)"),
            &uncached,
            Some(DECISIONS),
            false,
        ),
        (
            format!("tollgate authenticate cached, {n} distinct keys (h2drive)"),
            &cached,
            Some(DECISIONS),
            false,
        ),
    ] {
        targets.push(Target {
            name,
            kind: Kind::Authenticate,
            proc,
            verify,
            baseline,
            driver: Driver::H2drive,
        });
        // The same run against the "before" binary, right after this one.
        let before_proc = if std::ptr::eq(proc, &uncached) {
            before_uncached.as_ref()
        } else if std::ptr::eq(proc, &cached) {
            before.as_ref()
        } else {
            None
        };
        if let Some(b) = before_proc {
            let name = format!("before: {}", targets.last().map_or("", |t| t.name.as_str()));
            targets.push(Target {
                name,
                kind: Kind::Authenticate,
                proc: b,
                verify,
                baseline: false,
                driver: Driver::H2drive,
            });
        }
    }

    if let Some(only) = &o.only {
        keep_only(&mut targets, only);
        if !targets.iter().any(|t| !t.baseline) {
            bail!("--only {only:?} matches no Tollgate run");
        }
    }
    println!(
        "driver: h2load -n {} -c {} -m {} -t {} (one framed body per call); {} round(s), runs alternating (\"before\" first in even rounds)",
        o.h2.requests, o.h2.clients, o.h2.streams, o.h2.threads, o.rounds.max(1)
    );
    println!(
        "distinct-key rows: tollgate-load h2drive -n {} -c {} -m {} (one current-thread runtime, \
         {n} framed bodies, one per key, cycled over; success = grpc-status 0)",
        o.h2.requests, o.h2.clients, o.h2.streams
    );
    // Warm-up: a tenth of a run against every target, unmeasured but checked;
    // over distinct keys at least one pass over all of them (fills the cache).
    for t in &mut targets {
        let mut warm = (o.h2.requests / 10).max(1000);
        if t.driver == Driver::H2drive {
            warm = warm.max(n as u64);
        }
        if let Err(e) = measure(t, body(t), &o.h2, warm, 0).await {
            if t.name.starts_with("before:") && t.kind == Kind::CheckQuota {
                eprintln!("{}: {e:#}; checked by h2load's counts only", t.name);
                t.verify = None;
            } else {
                return Err(e);
            }
        }
    }
    let mut all: Vec<Measured> = Vec::new();
    for round in 1..=o.rounds.max(1) {
        println!("-- round {round}");
        let mut best = [0f64; GROUPS];
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        for i in round_order(&names, round) {
            let t = &targets[i];
            let mut m = measure(t, body(t), &o.h2, o.h2.requests, round).await?;
            if t.baseline {
                let b = &mut best[t.group()];
                *b = b.max(m.run.rps);
            } else {
                m.ratio = Some(m.run.rps / best[t.group()]);
            }
            println!("{}", line(&m));
            all.push(m);
        }
    }

    println!(
        "\nmedians over {} round(s); ratio = req/s over the fastest no-op shape of the same call in the same round",
        o.rounds.max(1)
    );
    println!(
        "{:<62} {:>9} {:>11} {:>11} {:>11} {:>7} {:>11}  target",
        "run", "req/s", "server µs", "postgres µs", "client µs", "ratio", "ratio range"
    );
    let mut summary = Vec::new();
    for t in &targets {
        let runs: Vec<&Measured> = all.iter().filter(|m| m.name == t.name).collect();
        let get =
            |f: &dyn Fn(&Measured) -> f64| median(&runs.iter().map(|m| f(m)).collect::<Vec<_>>());
        let rps = get(&|m| m.run.rps);
        let server = get(&|m| m.server_us_per_request);
        let postgres = get(&|m| m.postgres_us_per_request);
        let client = get(&|m| m.client_us_per_request);
        let ratios: Vec<f64> = runs.iter().filter_map(|m| m.ratio).collect();
        let ratio = (!ratios.is_empty()).then(|| median(&ratios));
        let (lo, hi) = min_max(&ratios);
        let target = target_of(&t.name, n);
        println!(
            "{:<62} {:>9.0} {:>11.2} {:>11.2} {:>11.2} {:>7} {:>11}  {}",
            t.name,
            rps,
            server,
            postgres,
            client,
            ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
            ratio
                .map(|_| format!("{lo:.2}–{hi:.2}"))
                .unwrap_or_default(),
            match (target, ratio) {
                (Some(want), Some(r)) if r >= want => format!("≥ {want:.2}: met"),
                (Some(want), Some(r)) => format!("≥ {want:.2}: NOT met (short by {:.2})", want - r),
                _ => String::new(),
            }
        );
        summary.push(serde_json::json!({
            "name": t.name, "median_rps": rps, "median_server_us_per_request": server,
            "median_postgres_us_per_request": postgres,
            "median_client_us_per_request": client, "median_ratio": ratio, "target": target,
            "verified_by": t.verify, "driver": t.driver.label(),
        }));
    }

    // Latency at a paced rate over many distinct keys: the tonic driver.
    let mut latency: Vec<Report> = Vec::new();
    if o.latency_rate > 0 {
        let paced = LoadOpts {
            rate: Some(o.latency_rate),
            ..o.load.clone()
        };
        println!(
            "\nlatency at {} req/s over {} distinct keys (driver: tollgate-load's tonic client)",
            o.latency_rate,
            keys.len()
        );
        let (shape, noop) = &noops[0];
        let mut runs: Vec<(String, &Proc, Kind)> = kinds
            .iter()
            .map(|k| (format!("noop {} ({shape}-thread)", k.label()), noop, *k))
            .collect();
        runs.push((
            "tollgate authenticate cached".into(),
            &cached,
            Kind::Authenticate,
        ));
        runs.push(("tollgate check_quota".into(), &cached, Kind::CheckQuota));
        runs.push(("tollgate ext_authz check".into(), &cached, Kind::ExtAuthz));
        runs.push((
            "tollgate authenticate uncached".into(),
            &uncached,
            Kind::Authenticate,
        ));
        for (name, proc, kind) in runs {
            let r = load::run(
                &name,
                &proc.target(),
                Scenario::new(kind, keys.clone()),
                &paced,
            )
            .await?;
            println!("{}", r.line());
            if !name.starts_with("noop") && (r.errors > 0 || r.denied > 0) {
                bail!(
                    "{name}: {} denied, {} errors (first: {:?})",
                    r.denied,
                    r.errors,
                    r.first_error
                );
            }
            latency.push(r);
        }
    }
    if let Some(path) = o.out {
        let out =
            serde_json::json!({ "runs": all, "summary": summary, "latency_tonic_driver": latency });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop((cached, uncached, before, noops));
    Ok(())
}

/// Keeps the Tollgate runs whose name contains `only` and the no-op runs
/// of the groups they are compared with.
fn keep_only(targets: &mut Vec<Target<'_>>, only: &str) {
    let groups: Vec<usize> = targets
        .iter()
        .filter(|t| !t.baseline && t.name.contains(only))
        .map(Target::group)
        .collect();
    targets.retain(|t| {
        if t.baseline {
            groups.contains(&t.group())
        } else {
            t.name.contains(only)
        }
    });
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Authenticate => 0,
        Kind::CheckQuota => 1,
        Kind::ExtAuthz => 2,
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

/// The order of one round's runs: as listed, except that in even rounds
/// each run and its "before" run right after it trade places.
fn round_order(names: &[&str], round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..names.len()).collect();
    if round.is_multiple_of(2) {
        let mut i = 0;
        while i + 1 < names.len() {
            if names[i + 1].strip_prefix("before: ") == Some(names[i]) {
                order.swap(i, i + 1);
                i += 2;
            } else {
                i += 1;
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distinct_key_uncached_row_has_the_uncached_target() {
        let n = 10_000;
        assert_eq!(
            target_of(
                "tollgate authenticate uncached, 10000 distinct keys (h2drive)",
                n
            ),
            Some(0.30)
        );
        assert_eq!(target_of("tollgate authenticate uncached", n), Some(0.30));
        assert_eq!(
            target_of(
                "tollgate authenticate cached, 10000 distinct keys (h2drive)",
                n
            ),
            None
        );
        assert_eq!(
            target_of(
                "tollgate authenticate uncached, 5000 distinct keys (h2drive)",
                n
            ),
            None
        );
    }

    #[test]
    fn before_runs_second_in_odd_rounds_and_first_in_even_ones() {
        let names = [
            "noop authenticate (current-thread)",
            "tollgate authenticate cached",
            "before: tollgate authenticate cached",
            "noop check_quota (current-thread)",
            "tollgate check_quota",
            "before: tollgate check_quota",
            "tollgate authenticate uncached",
        ];
        assert_eq!(round_order(&names, 1), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(round_order(&names, 2), [0, 2, 1, 3, 5, 4, 6]);
        assert_eq!(round_order(&names, 3), [0, 1, 2, 3, 4, 5, 6]);
        // No "before": nothing moves.
        assert_eq!(round_order(&names[..2], 2), [0, 1]);
    }

    #[test]
    fn allowed_answers_sum_only_allow_samples_of_the_metric() {
        let scrape = "# TYPE tollgate_decisions_total counter\n\
            tollgate_decisions_total{call=\"authenticate\",outcome=\"allow\"} 7\n\
            tollgate_decisions_total{call=\"check\",outcome=\"allow\"} 5\n\
            tollgate_decisions_total{call=\"authenticate\",outcome=\"deny\"} 3\n\
            tollgate_decisions_total_other{outcome=\"allow\"} 100\n";
        assert_eq!(allowed_in(scrape, DECISIONS), 12.0);
    }
}
