//! Soak under faults: three `tollgate serve` replicas on a PostgreSQL
//! server this run owns, driven at a fraction (default half) of their
//! measured peak for 60 s while Postgres is stopped and started twice and
//! one replica is SIGKILLed and started again on the same port. Keys are
//! revoked all along. Reports
//! - wrong decisions (must be 0): a key allowed although its RevokeKey had
//!   returned more than the staleness bound before the request was sent,
//!   or a live key refused;
//! - errors by gRPC code, and the revocations that failed;
//! - p50/p99 before, during and after the faults, and a 5-second timeline.
//!
//! The driver is tonic (it paces and tracks thousands of keys, which h2load
//! cannot); its CPU share at peak is printed next to the servers'.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use hdrhistogram::Histogram;
use tokio::time::MissedTickBehavior;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

use crate::fixture::{limit, op, seed, Fixture, Proc};
use crate::h2load::process_cpu_seconds;
use crate::load::connect;
use crate::pg::LocalPg;
use crate::scenario::authenticate_request;

#[derive(Debug, clap::Args)]
pub struct SoakOpts {
    /// The `tollgate` binary [default: next to this one].
    #[arg(long)]
    pub tollgate: Option<std::path::PathBuf>,
    /// Keys authenticated in turn (each warmed into every replica first).
    #[arg(long, default_value_t = 2000)]
    pub keys: usize,
    /// Fraction of the measured peak driven during the soak.
    #[arg(long, default_value_t = 0.5)]
    pub load: f64,
    /// Requests in flight (spread over the three replicas).
    #[arg(long, default_value_t = 96)]
    pub concurrency: usize,
    /// The replicas' `cache.max_staleness_seconds`: an allow later than
    /// this after a revocation returned is a wrong decision.
    #[arg(long, default_value_t = 10)]
    pub staleness: u64,
    /// Seconds between revocations.
    #[arg(long, default_value_t = 0.25)]
    pub revoke_every: f64,
}

const SOAK_SECS: u64 = 60;
const WINDOW_SECS: u64 = 5;
/// Postgres down (`pg_ctl stop -m fast`) → up again, seconds into the soak.
const PG_DOWN: [(u64, u64); 2] = [(10, 15), (35, 40)];
/// replica-2 SIGKILLed → started again on the same port.
const REPLICA_KILL: (u64, u64) = (22, 27);
/// Before = [0, 10), during = [10, 45), after = [45, 60).
const DURING: (u64, u64) = (10, 45);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

const LIVE: u64 = u64::MAX;
/// RevokeKey sent and not answered yet, or failed: it may or may not have
/// committed, so neither an allow nor a refusal is wrong.
const UNCERTAIN: u64 = u64::MAX - 1;

/// What happened in one window of time.
#[derive(Clone)]
struct Window {
    latency: Histogram<u64>,
    allowed: u64,
    refused_revoked: u64,
    errors: BTreeMap<String, u64>,
    wrong_allowed: u64,
    wrong_refused: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds"),
            allowed: 0,
            refused_revoked: 0,
            errors: BTreeMap::new(),
            wrong_allowed: 0,
            wrong_refused: 0,
        }
    }

    fn add(&mut self, o: &Window) {
        self.latency.add(&o.latency).expect("same bounds");
        self.allowed += o.allowed;
        self.refused_revoked += o.refused_revoked;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.wrong_allowed += o.wrong_allowed;
        self.wrong_refused += o.wrong_refused;
    }

    fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    fn us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1_000.0
    }
}

/// Shared by the senders and the revoker.
struct Keys {
    keys: Vec<String>,
    ids: Vec<String>,
    /// Per key: LIVE, UNCERTAIN, or ms after the soak's start at which its
    /// RevokeKey returned.
    state: Vec<AtomicU64>,
    /// Longest time (ms) from a RevokeKey's return to the sending of a
    /// request for that key that was still allowed.
    lag_ms: AtomicU64,
    /// One example of a wrong decision, for the report.
    first_wrong: Mutex<Option<String>>,
}

/// Sends `concurrency` paced (or, without `rate`, closed-loop) streams of
/// Authenticate over `channels`, and records what was sent from `t0` on,
/// in `windows` windows of WINDOW_SECS.
async fn drive(
    channels: &[Channel],
    keys: Arc<Keys>,
    concurrency: usize,
    rate: Option<f64>,
    t0: Instant,
    windows: u64,
    staleness_ms: u64,
) -> anyhow::Result<Vec<Window>> {
    let period = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r.max(1.0)));
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let mut client = AuthServiceClient::new(channels[t % channels.len()].clone());
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = vec![Window::new(); windows as usize];
            let mut ticker = period.map(|p| {
                let mut i = tokio::time::interval_at(
                    tokio::time::Instant::now() + p.mul_f64(t as f64 / concurrency as f64),
                    p,
                );
                i.set_missed_tick_behavior(MissedTickBehavior::Delay);
                i
            });
            let n = keys.keys.len();
            let mut i = t;
            loop {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let idx = i % n;
                i = i.wrapping_add(concurrency);
                let sent = Instant::now();
                let outcome = tokio::time::timeout(
                    CALL_TIMEOUT,
                    client.authenticate(authenticate_request(&keys.keys[idx])),
                )
                .await;
                let took = sent.elapsed();
                let Some(since) = sent.checked_duration_since(t0) else {
                    continue; // warm-up
                };
                let w = since.as_secs() / WINDOW_SECS;
                if w >= windows {
                    return out;
                }
                let sent_ms = since.as_millis() as u64;
                let win = &mut out[w as usize];
                let _ = win
                    .latency
                    .record((took.as_nanos() as u64).clamp(1_000, 60_000_000_000));
                let state = keys.state[idx].load(Ordering::Acquire);
                let revoked_before_send = state < UNCERTAIN && sent_ms > state;
                // A revoked key is no longer cached: its errors are the
                // uncached path's.
                let path = if state == LIVE { "" } else { ", uncached" };
                match outcome {
                    Err(_) => {
                        *win.errors
                            .entry(format!("timeout (2 s){path}"))
                            .or_default() += 1
                    }
                    Ok(Err(status)) => {
                        *win.errors
                            .entry(format!("{:?}{path}", status.code()))
                            .or_default() += 1
                    }
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        if r.allowed {
                            win.allowed += 1;
                            if revoked_before_send {
                                keys.lag_ms.fetch_max(sent_ms - state, Ordering::Relaxed);
                                if sent_ms > state + staleness_ms {
                                    win.wrong_allowed += 1;
                                    keys.first_wrong
                                        .lock()
                                        .expect("not poisoned")
                                        .get_or_insert(format!(
                                        "key #{idx} allowed {} ms after its revocation returned",
                                        sent_ms - state
                                    ));
                                }
                            }
                        } else if state == LIVE {
                            win.wrong_refused += 1;
                            let reason = r.denial.map(|d| d.reason).unwrap_or_default();
                            keys.first_wrong
                                .lock()
                                .expect("not poisoned")
                                .get_or_insert(format!(
                                    "live key #{idx} refused at {sent_ms} ms: {reason}"
                                ));
                        } else {
                            win.refused_revoked += 1;
                        }
                    }
                }
            }
        }));
    }
    let mut merged = vec![Window::new(); windows as usize];
    for task in tasks {
        for (m, w) in merged.iter_mut().zip(task.await?) {
            m.add(&w);
        }
    }
    Ok(merged)
}

/// Revokes keys 0, 1, 2… one every `every` through the replicas in turn
/// until `end`; failures by gRPC code.
async fn revoker(
    mut clients: Vec<AuthServiceClient<Channel>>,
    keys: Arc<Keys>,
    t0: Instant,
    every: Duration,
    end: Instant,
) -> (u64, BTreeMap<String, u64>) {
    let mut ticker = tokio::time::interval_at(t0.into(), every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut ok, mut failed) = (0, BTreeMap::new());
    for j in 0..keys.keys.len() {
        ticker.tick().await;
        if Instant::now() >= end {
            break;
        }
        let client = &mut clients[j % 3];
        keys.state[j].store(UNCERTAIN, Ordering::Release);
        let r = tokio::time::timeout(
            CALL_TIMEOUT,
            client.revoke_key(op(tollgate::grpc::pb::RevokeKeyRequest {
                key_id: keys.ids[j].clone(),
                reason: "soak".into(),
                ..Default::default()
            })),
        )
        .await;
        match r {
            Ok(Ok(_)) => {
                let at = t0.elapsed().as_millis() as u64;
                keys.state[j].store(at, Ordering::Release);
                ok += 1;
            }
            Ok(Err(s)) => {
                *failed.entry(format!("{:?}", s.code())).or_default() += 1;
            }
            Err(_) => {
                *failed.entry("timeout (2 s)".into()).or_default() += 1;
            }
        }
    }
    (ok, failed)
}

/// The fault schedule; returns its log.
async fn faults(
    pg: Arc<LocalPg>,
    fixture: Arc<Fixture>,
    env: Vec<(String, String)>,
    mut victim: Proc,
    t0: Instant,
) -> anyhow::Result<(Vec<String>, Proc)> {
    let at = |s: u64| tokio::time::sleep_until((t0 + Duration::from_secs(s)).into());
    let stamp = || format!("{:5.1} s", t0.elapsed().as_secs_f64());
    let mut log = Vec::new();
    let pg_down = |pg: Arc<LocalPg>| tokio::task::spawn_blocking(move || pg.down());
    let pg_up = |pg: Arc<LocalPg>| tokio::task::spawn_blocking(move || pg.up());

    at(PG_DOWN[0].0).await;
    pg_down(pg.clone()).await??;
    log.push(format!(
        "{} postgres stopped (pg_ctl stop -m fast)",
        stamp()
    ));
    at(PG_DOWN[0].1).await;
    pg_up(pg.clone()).await??;
    log.push(format!("{} postgres accepting connections again", stamp()));

    at(REPLICA_KILL.0).await;
    victim.kill();
    log.push(format!("{} {} SIGKILLed", stamp(), victim.name));
    at(REPLICA_KILL.1).await;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let metrics = victim.metrics.context("metrics port")?;
    let again = fixture.start_at(&victim.name, &env, victim.addr, metrics)?;
    log.push(format!(
        "{} {} started again on {}",
        stamp(),
        again.name,
        again.addr
    ));
    again.wait_ready().await?;
    log.push(format!("{} {} ready (SERVING)", stamp(), again.name));

    at(PG_DOWN[1].0).await;
    pg_down(pg.clone()).await??;
    log.push(format!(
        "{} postgres stopped (pg_ctl stop -m fast)",
        stamp()
    ));
    at(PG_DOWN[1].1).await;
    pg_up(pg.clone()).await??;
    log.push(format!("{} postgres accepting connections again", stamp()));
    Ok((log, again))
}

pub async fn run(o: SoakOpts) -> anyhow::Result<()> {
    ensure!(
        o.load > 0.0 && o.load <= 1.0,
        "--load is a fraction of peak"
    );
    let bin = match &o.tollgate {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("tollgate"),
    };
    let pg = Arc::new(tokio::task::spawn_blocking(LocalPg::start).await??);
    let fixture = Arc::new(Fixture::new(bin, &pg.url()).await?);
    let staleness = o.staleness.to_string();
    let env_owned: Vec<(String, String)> = vec![(
        "TOLLGATE_CACHE__MAX_STALENESS_SECONDS".into(),
        staleness.clone(),
    )];
    let env: Vec<(&str, &str)> = env_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(fixture.spawn(&format!("replica-{i}"), &env).await?);
    }
    let seeded = seed(
        &replicas[0].target(),
        "soak",
        50,
        o.keys.div_ceil(50),
        vec![limit("key", "second", 1_000_000)],
    )
    .await?;
    let keys = Arc::new(Keys {
        keys: seeded.iter().map(|k| k.key.clone()).collect(),
        ids: seeded.iter().map(|k| k.key_id.clone()).collect(),
        state: seeded.iter().map(|_| AtomicU64::new(LIVE)).collect(),
        lag_ms: AtomicU64::new(0),
        first_wrong: Mutex::new(None),
    });
    let mut channels = Vec::new();
    for r in &replicas {
        channels.extend(connect(&r.target(), 2).await?);
    }
    // Every key into every replica's cache.
    for ch in &channels {
        let mut c = AuthServiceClient::new(ch.clone());
        for k in &keys.keys {
            let r = c.authenticate(authenticate_request(k)).await?.into_inner();
            ensure!(r.allowed, "a fresh key is refused: {:?}", r.denial);
        }
    }

    // Peak: closed loop, 3 s unmeasured then 5 s, with CPU shares.
    let pids: Vec<u32> = replicas.iter().map(|r| r.pid()).collect();
    let cpu = |pids: &[u32]| -> anyhow::Result<f64> {
        pids.iter().map(|&p| process_cpu_seconds(p)).sum()
    };
    let me = std::process::id();
    let t_peak = Instant::now() + Duration::from_secs(3);
    let (srv0, me0) = (cpu(&pids)?, process_cpu_seconds(me)?);
    let peak_run = drive(
        &channels,
        keys.clone(),
        o.concurrency,
        None,
        t_peak,
        1,
        o.staleness * 1000,
    );
    let peak_w = peak_run.await?;
    let (srv1, me1) = (cpu(&pids)?, process_cpu_seconds(me)?);
    let peak = peak_w[0].latency.len() as f64 / WINDOW_SECS as f64;
    let rate = peak * o.load;
    println!(
        "peak (closed loop, {} in flight over 3 replicas): {peak:.0} req/s, p99 {:.0} µs, errors {}",
        o.concurrency,
        peak_w[0].us(0.99),
        peak_w[0].errors()
    );
    println!(
        "  CPU over the peak run (8 s with warm-up): servers {:.2} s, this driver {:.2} s ({:.0}% of all)",
        srv1 - srv0,
        me1 - me0,
        100.0 * (me1 - me0) / ((srv1 - srv0) + (me1 - me0)).max(1e-9)
    );

    // The soak.
    let victim = replicas.pop().context("three replicas")?;
    let t0 = Instant::now() + Duration::from_millis(500);
    let end = t0 + Duration::from_secs(SOAK_SECS);
    let revoke_clients: Vec<_> = (0..3)
        .map(|r| AuthServiceClient::new(channels[2 * r].clone()))
        .collect();
    let revocations = tokio::spawn(revoker(
        revoke_clients,
        keys.clone(),
        t0,
        Duration::from_secs_f64(o.revoke_every),
        end,
    ));
    let schedule = tokio::spawn(faults(
        pg.clone(),
        fixture.clone(),
        env_owned.clone(),
        victim,
        t0,
    ));
    let windows = drive(
        &channels,
        keys.clone(),
        o.concurrency,
        Some(rate),
        t0,
        SOAK_SECS / WINDOW_SECS,
        o.staleness * 1000,
    )
    .await?;
    let (revoked, revoke_failed) = revocations.await?;
    let (log, _again) = schedule.await??;

    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "soak: {SOAK_SECS} s at {rate:.0} req/s ({:.0}% of peak), {} keys, a revocation every {} s, staleness bound {} s",
        o.load * 100.0,
        keys.keys.len(),
        o.revoke_every,
        o.staleness
    );
    for l in &log {
        println!("  {l}");
    }
    println!("  window      req/s   p50 µs   p99 µs  allowed  refused(revoked)  errors  wrong");
    for (i, w) in windows.iter().enumerate() {
        let from = i as u64 * WINDOW_SECS;
        println!(
            "  {:>2}–{:<2} s {:>9.0} {:>8.0} {:>8.0} {:>8} {:>17} {:>7} {:>6}  {}",
            from,
            from + WINDOW_SECS,
            w.latency.len() as f64 / WINDOW_SECS as f64,
            w.us(0.5),
            w.us(0.99),
            w.allowed,
            w.refused_revoked,
            w.errors(),
            w.wrong_allowed + w.wrong_refused,
            if w.errors.is_empty() {
                String::new()
            } else {
                format!("{:?}", w.errors)
            }
        );
    }
    let phase = |from: u64, to: u64| {
        let mut p = Window::new();
        for w in &windows[(from / WINDOW_SECS) as usize..(to / WINDOW_SECS) as usize] {
            p.add(w);
        }
        p
    };
    let phases = [
        ("before", phase(0, DURING.0)),
        ("during", phase(DURING.0, DURING.1)),
        ("after", phase(DURING.1, SOAK_SECS)),
    ];
    let mut all = Window::new();
    for (name, p) in &phases {
        all.add(p);
        println!(
            "  {name:<7} p50 {:>6.0} µs  p99 {:>7.0} µs  p99.9 {:>7.0} µs  requests {:>7}  errors {:?}",
            p.us(0.5),
            p.us(0.99),
            p.us(0.999),
            p.latency.len(),
            p.errors
        );
    }
    let wrong = all.wrong_allowed + all.wrong_refused;
    println!(
        "  wrong decisions: {wrong} (revoked key allowed past the bound: {}, live key refused: {}){}",
        all.wrong_allowed,
        all.wrong_refused,
        keys.first_wrong
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|w| format!("; first: {w}"))
            .unwrap_or_default()
    );
    println!(
        "  revocations: {revoked} returned OK, failed {revoke_failed:?}; longest allow after a revocation returned: {} ms",
        keys.lag_ms.load(Ordering::Relaxed)
    );
    println!(
        "{}",
        serde_json::json!({
            "peak_rps": peak,
            "rate": rate,
            "requests": all.latency.len(),
            "wrong_allowed": all.wrong_allowed,
            "wrong_refused": all.wrong_refused,
            "errors": all.errors,
            "revocations_ok": revoked,
            "revocations_failed": revoke_failed,
            "max_allow_after_revocation_ms": keys.lag_ms.load(Ordering::Relaxed),
            "p99_us": {
                "before": phases[0].1.us(0.99),
                "during": phases[1].1.us(0.99),
                "after": phases[2].1.us(0.99),
            },
        })
    );
    ensure!(wrong == 0, "{wrong} WRONG DECISIONS");
    Ok(())
}
