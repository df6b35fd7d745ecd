//! Many replicas on one Postgres (BENCHMARKS.md §12): `--replicas` small
//! `tollgate serve` processes (2 runtime workers each, at most 4 pooled
//! connections) share one database holding `--keys` keys (inserted with
//! SQL, digests computed here with the fixture's pepper). Each replica
//! serves its own shard of the keys (a gateway's HTTP/2 connections pin a
//! key's traffic to a pod), warmed once. For each total rate (0 = idle),
//! CheckQuota with cost 1 (a rate limit and a daily quota per tenant, so
//! leases are taken and reported) runs paced on every replica while
//! Postgres counts: statements by kind (`pg_stat_statements`),
//! transactions (`pg_stat_database`) and its own CPU time (`/proc`, when
//! Postgres runs on this machine).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use tokio::task::JoinSet;
use tollgate::crypto::Pepper;
use tollgate::profile::Profile;
use tollgate::telemetry::REPLICAS;

use crate::fixture::{limit, seed, FixtureOpts, Proc, PEPPER};
use crate::load::{self, LoadOpts};
use crate::pgstat::{short, PgStats, Snapshot};
use crate::scenario::{Kind, Scenario};

#[derive(Debug, clap::Args)]
pub struct FleetOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    #[arg(long, default_value_t = 10)]
    pub replicas: usize,
    /// Stored keys (each replica serves an equal shard of them).
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// Total decisions per second to pace, one phase each (0: idle).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,4000")]
    pub rates: Vec<u64>,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 15.0)]
    pub duration: f64,
    /// Unmeasured seconds at each phase's rate before measuring.
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
}

/// What a statement is, by its text.
fn kind(query: &str) -> &'static str {
    let q = query.to_ascii_lowercase();
    if q.contains("into replicas") || q.contains("from replicas") {
        "heartbeat"
    } else if q.contains("quota_leases") || q.contains("quota_usage") {
        "quota leases"
    } else if q.contains("rate_shares") {
        "rate shares"
    } else if q.contains("from api_keys where digest = $1") {
        "key lookup (miss)"
    } else if q.contains("last_used_at =") || q.contains("last_used_at=") {
        "last_used_at batch"
    } else if q.contains("changes") || q.contains("listen") || q.contains("notify") {
        "change feed"
    } else if q.starts_with("begin") || q.starts_with("commit") || q.starts_with("rollback") {
        "transaction control"
    } else if q.contains("from tenants") {
        "tenant lookup"
    } else {
        "other"
    }
}

/// CPU time (user + system) of the Postgres server behind `stats`: its
/// postmaster and every child process, in seconds; `None` when it is not a
/// process of this machine.
async fn pg_cpu(stats: &mut PgStats) -> anyhow::Result<Option<f64>> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(stats.conn())
        .await?;
    let Some(postmaster) = stat_of(backend as u32).map(|s| s.ppid) else {
        return Ok(None);
    };
    let mut ticks = stat_of(postmaster).map_or(0, |s| s.ticks);
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(s) = stat_of(pid).filter(|s| s.ppid == postmaster) {
            ticks += s.ticks;
        }
    }
    Ok(Some(ticks as f64 / 100.0))
}

struct Stat {
    ppid: u32,
    ticks: u64,
}

/// Parent and utime + stime (clock ticks) of `pid`.
fn stat_of(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

fn cpu_of(procs: &[Proc]) -> f64 {
    procs
        .iter()
        .filter_map(|p| stat_of(p.pid()))
        .map(|s| s.ticks as f64 / 100.0)
        .sum()
}

#[derive(Debug, serde::Serialize)]
struct Phase {
    rate: u64,
    seconds: f64,
    decisions_per_s: f64,
    errors: u64,
    statements_per_s: f64,
    transactions_per_s: f64,
    by_kind_per_s: BTreeMap<&'static str, f64>,
    pg_cpu_ms_per_s: Option<f64>,
    replicas_cpu_ms_per_s: f64,
}

pub async fn run(o: FleetOpts) -> anyhow::Result<()> {
    ensure!(
        o.replicas > 0 && o.keys >= o.replicas,
        "need replicas and keys"
    );
    let fixture = o.setup.fixture().await?;
    let mut stats = PgStats::connect(fixture.database_url()).await?;

    // Tenants through the API (their limits as overrides), then keys by SQL.
    {
        let seeder = fixture.spawn("seeder", &[]).await?;
        seed(
            &seeder.target(),
            "fleet",
            o.tenants,
            0,
            vec![
                limit("key", "second", 1_000_000),
                limit("tenant", "day", 1_000_000_000),
            ],
        )
        .await?;
    }
    let t = Instant::now();
    let format = Profile::embedded_default().key_format;
    let pepper = Pepper::new(1, PEPPER.as_bytes().to_vec())?;
    let mut secrets = Vec::with_capacity(o.keys);
    for chunk in (0..o.keys).collect::<Vec<_>>().chunks(10_000) {
        let (mut ids, mut tenants, mut hints, mut digests) = (vec![], vec![], vec![], vec![]);
        for &i in chunk {
            let secret = format.generate("live");
            ids.push(uuid::Uuid::now_v7());
            tenants.push(format!("fleet-{}", i % o.tenants));
            hints.push(secret.hint());
            digests.push(pepper.digest(secret.expose()).as_bytes().to_vec());
            secrets.push(secret.into_exposed());
        }
        sqlx::query(
            "INSERT INTO api_keys (key_id, tenant_id, name, environment, scopes, hint, digest, \
               pepper_version, created_at, lineage_id) \
             SELECT id, t, 'fleet', 'live', '{read,write}', h, d, 1, now(), id \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[]) AS k(id, t, h, d)",
        )
        .bind(&ids)
        .bind(&tenants)
        .bind(&hints)
        .bind(&digests)
        .execute(stats.conn())
        .await?;
    }
    println!(
        "{} keys in {} tenants inserted with SQL in {:.1} s",
        o.keys,
        o.tenants,
        t.elapsed().as_secs_f64()
    );

    let small = [
        ("TOLLGATE_DATABASE__MAX_CONNECTIONS", "4"),
        ("TOLLGATE_DATABASE__MIN_CONNECTIONS", "1"),
    ];
    let mut procs = Vec::with_capacity(o.replicas);
    for i in 0..o.replicas {
        procs.push(fixture.spawn(&format!("replica-{i}"), &small).await?);
    }
    for p in &procs {
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.metric_sum(REPLICAS).await.unwrap_or(0.0) < o.replicas as f64 {
            ensure!(
                Instant::now() < deadline,
                "{} never counted {} replicas",
                p.name,
                o.replicas
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let shards: Vec<Arc<Vec<String>>> = (0..o.replicas)
        .map(|r| {
            Arc::new(
                secrets
                    .iter()
                    .skip(r)
                    .step_by(o.replicas)
                    .cloned()
                    .collect(),
            )
        })
        .collect();

    // Warm every replica's cache with its shard (one miss per key).
    let t = Instant::now();
    let mut set = JoinSet::new();
    for (p, keys) in procs.iter().zip(&shards) {
        let (target, keys) = (p.target(), keys.clone());
        set.spawn(async move {
            let ch = tonic::transport::Channel::from_shared(target)?
                .connect()
                .await?;
            let mut client = Scenario::new(Kind::CheckQuota, keys.clone()).client(ch);
            for i in 0..keys.len() {
                ensure!(client.call(i).await?, "a seeded key was refused");
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    println!(
        "{} replicas up and warmed ({} keys each) in {:.1} s",
        o.replicas,
        shards[0].len(),
        t.elapsed().as_secs_f64()
    );

    let mut phases = Vec::new();
    let mut busiest: Option<(Snapshot, Snapshot)> = None;
    for &rate in &o.rates {
        let per = |seconds: f64| LoadOpts {
            connections: 1,
            concurrency: 4,
            duration: seconds,
            warmup: 0.0,
            rate: Some((rate / o.replicas as u64).max(1)),
        };
        if rate > 0 && o.warmup > 0.0 {
            drive(&procs, &shards, &per(o.warmup)).await?;
        }
        let (before, cpu0, rcpu0) = (
            stats.snapshot().await?,
            pg_cpu(&mut stats).await?,
            cpu_of(&procs),
        );
        let started = Instant::now();
        let (requests, errors) = if rate > 0 {
            drive(&procs, &shards, &per(o.duration)).await?
        } else {
            tokio::time::sleep(Duration::from_secs_f64(o.duration)).await;
            (0, 0)
        };
        let seconds = started.elapsed().as_secs_f64();
        let (after, cpu1, rcpu1) = (
            stats.snapshot().await?,
            pg_cpu(&mut stats).await?,
            cpu_of(&procs),
        );
        let mut by_kind: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (q, n) in after.since(&before) {
            *by_kind.entry(kind(&q)).or_default() += n as f64 / seconds;
        }
        let phase = Phase {
            rate,
            seconds,
            decisions_per_s: requests as f64 / seconds,
            errors,
            statements_per_s: by_kind.values().sum(),
            transactions_per_s: (after.xacts - before.xacts) as f64 / seconds,
            by_kind_per_s: by_kind,
            pg_cpu_ms_per_s: cpu0.zip(cpu1).map(|(a, b)| (b - a) * 1000.0 / seconds),
            replicas_cpu_ms_per_s: (rcpu1 - rcpu0) * 1000.0 / seconds,
        };
        println!("{}", serde_json::to_string(&phase)?);
        phases.push(phase);
        busiest = Some((before, after));
    }
    report(&o, &phases);
    if let Some((before, after)) = busiest {
        println!("\nStatements in the last phase, most called first:");
        for (q, n) in after.since(&before).iter().take(14) {
            println!("  {n:>8}  [{}] {}", kind(q), short(q, 100));
        }
    }
    Ok(())
}

/// Runs every replica's shard at `opts` at once: requests, errors.
async fn drive(
    procs: &[Proc],
    shards: &[Arc<Vec<String>>],
    opts: &LoadOpts,
) -> anyhow::Result<(u64, u64)> {
    let mut set = JoinSet::new();
    for (p, keys) in procs.iter().zip(shards) {
        let (target, keys, opts, name) = (p.target(), keys.clone(), opts.clone(), p.name.clone());
        set.spawn(async move {
            load::run(&name, &target, Scenario::new(Kind::CheckQuota, keys), &opts).await
        });
    }
    let (mut requests, mut errors) = (0, 0);
    while let Some(r) = set.join_next().await {
        let r = r??;
        if let Some(e) = &r.first_error {
            eprintln!("{}: {} errors, e.g. {e}", r.name, r.errors);
        }
        requests += r.requests;
        errors += r.errors;
    }
    Ok((requests, errors))
}

fn report(o: &FleetOpts, phases: &[Phase]) {
    let kinds: Vec<&str> = {
        let mut k: Vec<&str> = phases
            .iter()
            .flat_map(|p| p.by_kind_per_s.keys().copied())
            .collect();
        k.sort_unstable();
        k.dedup();
        k
    };
    println!(
        "\n{} replicas, {} keys: per second over each phase",
        o.replicas, o.keys
    );
    print!("| paced rate | decisions/s | statements/s | per 1000 decisions | transactions/s | Postgres CPU ms/s | replicas' CPU ms/s |");
    for k in &kinds {
        print!(" {k} |");
    }
    println!();
    println!("|{}", "---|".repeat(7 + kinds.len()));
    for p in phases {
        let per_k = if p.decisions_per_s > 0.0 {
            format!("{:.1}", p.statements_per_s * 1000.0 / p.decisions_per_s)
        } else {
            "–".into()
        };
        print!(
            "| {} | {:.0} | {:.1} | {per_k} | {:.1} | {} | {:.0} |",
            p.rate,
            p.decisions_per_s,
            p.statements_per_s,
            p.transactions_per_s,
            p.pg_cpu_ms_per_s.map_or("–".into(), |c| format!("{c:.0}")),
            p.replicas_cpu_ms_per_s
        );
        for k in &kinds {
            print!(" {:.1} |", p.by_kind_per_s.get(k).copied().unwrap_or(0.0));
        }
        println!();
    }
    // Fixed cost (idle) and marginal cost per 1000 decisions/s, from the
    // idle phase and the busiest one.
    let idle = phases.iter().find(|p| p.rate == 0);
    let busy = phases
        .iter()
        .max_by(|a, b| a.decisions_per_s.total_cmp(&b.decisions_per_s));
    if let (Some(idle), Some(busy)) = (idle, busy) {
        if busy.decisions_per_s > 0.0 {
            let k = busy.decisions_per_s / 1000.0;
            let marginal = (busy.statements_per_s - idle.statements_per_s) / k;
            println!(
                "\nfixed: {:.1} statements/s for {} idle replicas ({:.2} per replica); marginal: {marginal:.1} statements/s per 1000 decisions/s",
                idle.statements_per_s,
                o.replicas,
                idle.statements_per_s / o.replicas as f64
            );
            if let (Some(ci), Some(cb)) = (idle.pg_cpu_ms_per_s, busy.pg_cpu_ms_per_s) {
                let cpu_per_k = (cb - ci) / k;
                let per_stmt_us = if busy.statements_per_s > 0.0 {
                    cb * 1000.0 / busy.statements_per_s
                } else {
                    0.0
                };
                println!(
                    "Postgres CPU: {ci:.0} ms/s idle, {cpu_per_k:.1} ms/s more per 1000 decisions/s ({per_stmt_us:.0} µs per statement at the busiest phase)"
                );
            }
        }
    }
}
