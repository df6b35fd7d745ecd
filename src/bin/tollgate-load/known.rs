//! The known-digest set at scale (BENCHMARKS.md §11):
//! - resident memory of a `tollgate serve` replica once it has loaded N
//!   stored keys (seeded with SQL, `generate_series`), for this build and,
//!   alternating in the same run, a baseline build (`--baseline`);
//! - database statements per 1000 random well-formed unknown keys, with the
//!   lookup budget on (`pg_stat_statements`, and the replica's own count of
//!   keys refused without a lookup);
//! - the filter's false-positive rate, built from the real stored digests
//!   and probed with random 64-bit prefixes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tollgate::cache::known::{BuiltFilter, KnownDigests};
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tollgate::profile::Profile;
use tonic::transport::Channel;

use crate::fixture::{Fixture, FixtureOpts, Proc};
use crate::pgstat::{short, PgStats};
use crate::scenario::authenticate_request;

#[derive(Debug, clap::Args)]
pub struct KnownOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// Stored key counts to measure, ascending (rows are added between sizes).
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    pub keys: Vec<u64>,
    /// A baseline `tollgate` binary measured the same way, alternating.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Random well-formed unknown keys sent to each replica.
    #[arg(long, default_value_t = 1000)]
    pub probes: usize,
    /// Random prefixes tested against the filter for its false-positive rate.
    #[arg(long, default_value_t = 20_000_000)]
    pub fpr_probes: u64,
}

/// The statements key lookups by digest run (`store/postgres/keys.rs`): one
/// digest (`= $1`) or a batch of misses (`= ANY($1)`, up to 128 digests).
const FIND_KEY: &str = "FROM api_keys WHERE digest = ";
/// The statement that pages through every digest.
const DIGEST_PAGE: &str = "SELECT digest FROM api_keys WHERE";

pub async fn run(o: KnownOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let mut stats = PgStats::connect(fixture.database_url()).await?;
    sqlx::query(
        "INSERT INTO tenants (tenant_id, name, plan, subscription_status) \
         VALUES ('bulk', 'bulk', 'enterprise', 'active')",
    )
    .execute(stats.conn())
    .await?;
    let mut builds: Vec<(&str, Fixture)> = Vec::new();
    if let Some(b) = &o.baseline {
        builds.push(("baseline", fixture.with_bin(b.clone())));
    }
    builds.push(("this build", fixture.with_bin(bin_of(&o.setup)?)));
    let mut stored = 0u64;
    let mut results = Vec::new();
    for &n in &o.keys {
        if n < stored {
            bail!("--keys must be ascending");
        }
        let t = Instant::now();
        seed_rows(&mut stats, stored + 1, n).await?;
        println!(
            "seeded {} rows with SQL in {:.1} s ({n} stored keys)",
            n - stored,
            t.elapsed().as_secs_f64()
        );
        stored = n;
        for (label, fx) in &builds {
            let r = measure(fx, &mut stats, label, n, o.probes).await?;
            println!("{}", r.line());
            println!("{}", serde_json::to_string(&r)?);
            results.push(r);
        }
        fpr(&mut stats, n, o.fpr_probes).await?;
    }
    println!("\n| stored keys | build | RSS after loading | peak RSS | RSS when it turned ready | load (read + build) | key-lookup statements per {} unknown keys | all statements |", o.probes);
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s | {} | {} |",
            r.keys,
            r.build,
            r.rss as f64 / 1048576.0,
            r.peak as f64 / 1048576.0,
            r.rss_at_ready as f64 / 1048576.0,
            r.load_seconds,
            r.key_lookups,
            r.statements
        );
    }
    Ok(())
}

fn bin_of(setup: &FixtureOpts) -> anyhow::Result<PathBuf> {
    Ok(match &setup.tollgate {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("tollgate"),
    })
}

/// Rows `from..=to` of `api_keys`: distinct 32-byte digests
/// (`sha256` of the row number), all in tenant `bulk`. Chunks of a million.
async fn seed_rows(stats: &mut PgStats, from: u64, to: u64) -> anyhow::Result<()> {
    let mut start = from;
    while start <= to {
        let end = (start + 999_999).min(to);
        sqlx::query(
            "INSERT INTO api_keys (key_id, tenant_id, name, environment, hint, digest, \
               pepper_version, created_at, lineage_id) \
             SELECT id, 'bulk', 'bulk', 'live', 'tg_live_…', sha256(int8send(i)), 1, now(), id \
             FROM (SELECT i, gen_random_uuid() AS id FROM generate_series($1::bigint, $2::bigint) i) s",
        )
        .bind(start as i64)
        .bind(end as i64)
        .execute(stats.conn())
        .await?;
        start = end + 1;
    }
    sqlx::query("ANALYZE api_keys")
        .execute(stats.conn())
        .await?;
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct Measured {
    build: String,
    keys: u64,
    /// VmRSS once the digests are loaded (and the filter built).
    rss: u64,
    /// VmHWM: the peak while loading.
    peak: u64,
    rss_at_ready: u64,
    load_seconds: f64,
    probes: usize,
    key_lookups: i64,
    statements: i64,
    refused_without_lookup: f64,
    probe_seconds: f64,
}

impl Measured {
    fn line(&self) -> String {
        format!(
            "{} with {} stored keys: RSS {:.1} MiB ({:.1} MiB when it turned ready, peak {:.1} MiB), digests loaded in {:.1} s; {} unknown keys in {:.2} s cost {} key-lookup statements ({} statements in all), {} refused without a lookup",
            self.build,
            self.keys,
            self.rss as f64 / 1048576.0,
            self.rss_at_ready as f64 / 1048576.0,
            self.peak as f64 / 1048576.0,
            self.load_seconds,
            self.probes,
            self.probe_seconds,
            self.key_lookups,
            self.statements,
            self.refused_without_lookup,
        )
    }
}

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn rss_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} for {pid}"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

async fn measure(
    fx: &Fixture,
    stats: &mut PgStats,
    build: &str,
    keys: u64,
    probes: usize,
) -> anyhow::Result<Measured> {
    let before = stats.snapshot().await?;
    let started = Instant::now();
    let proc = fx.spawn(build, &[]).await?;
    let (rss_at_ready, _) = rss_of(proc.pid())?;
    // Loaded: every page of digests read (the last one short), then the
    // resident set steady for 2 s (the build, off the runtime, is done).
    let pages = (keys / 10_000 + 1) as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while stats.snapshot().await?.calls_matching(&before, DIGEST_PAGE) < pages {
        if Instant::now() > deadline {
            bail!("{build} did not read every digest in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last = rss_of(proc.pid())?.0;
    let mut steady_since = Instant::now();
    let mut loaded_at = Instant::now();
    while steady_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_of(proc.pid())?.0;
        if now.abs_diff(last) > last / 200 {
            steady_since = Instant::now();
            loaded_at = Instant::now();
        }
        last = now;
    }
    let load_seconds = loaded_at.duration_since(started).as_secs_f64();
    let (rss, peak) = rss_of(proc.pid())?;

    let (key_lookups, statements, refused, probe_seconds) = probe(&proc, stats, probes).await?;
    Ok(Measured {
        build: build.to_owned(),
        keys,
        rss,
        peak,
        rss_at_ready,
        load_seconds,
        probes,
        key_lookups,
        statements,
        refused_without_lookup: refused,
        probe_seconds,
    })
}

/// Sends `n` random well-formed keys (16 at a time): key lookups and all
/// statements Postgres ran for this database meanwhile, and the keys the
/// replica refused without a lookup.
async fn probe(proc: &Proc, stats: &mut PgStats, n: usize) -> anyhow::Result<(i64, i64, f64, f64)> {
    let format = Profile::embedded_default().key_format;
    let keys: Arc<Vec<String>> = Arc::new(
        (0..n)
            .map(|_| format.generate("live").into_exposed())
            .collect(),
    );
    let refused_before = known_absent(proc).await?;
    let before = stats.snapshot().await?;
    let ch = Channel::from_shared(proc.target())?.connect().await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for w in 0..16 {
        let (keys, mut client) = (keys.clone(), AuthServiceClient::new(ch.clone()));
        set.spawn(async move {
            for key in keys.iter().skip(w).step_by(16) {
                let r = client.authenticate(authenticate_request(key)).await?;
                anyhow::ensure!(!r.into_inner().allowed, "a random key was allowed");
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = stats.snapshot().await?;
    let refused = known_absent(proc).await? - refused_before;
    for (q, calls) in after.since(&before).iter().take(6) {
        println!("    {calls:>6}  {}", short(q, 110));
    }
    Ok((
        after.calls_matching(&before, FIND_KEY),
        after.since(&before).iter().map(|(_, n)| n).sum(),
        refused,
        seconds,
    ))
}

/// `tollgate_cache_lookups_total{cache="known",result="absent"}`: keys
/// refused without a lookup (outside the set, budget spent).
async fn known_absent(proc: &Proc) -> anyhow::Result<f64> {
    let addr = proc.metrics.context("no metrics port")?;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with(tollgate::telemetry::CACHE_LOOKUPS)
                && l.contains("cache=\"known\"")
                && l.contains("result=\"absent\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Builds the filter from the stored digests, as a replica does, and
/// probes it with random prefixes: false positives against 2^-16.
async fn fpr(stats: &mut PgStats, keys: u64, probes: u64) -> anyhow::Result<()> {
    let mut prefixes = Vec::with_capacity(keys as usize);
    let mut rows =
        sqlx::query_scalar::<_, Vec<u8>>("SELECT substring(digest from 1 for 8) FROM api_keys")
            .fetch(stats.conn());
    while let Some(b) = rows.next().await {
        let b: [u8; 8] = b?.as_slice().try_into().context("an 8-byte prefix")?;
        prefixes.push(u64::from_le_bytes(b));
    }
    drop(rows);
    let stored = prefixes.clone();
    let t = Instant::now();
    let built = tokio::task::spawn_blocking(move || BuiltFilter::build(prefixes))
        .await?
        .map_err(anyhow::Error::msg)?;
    let build_s = t.elapsed().as_secs_f64();
    let (n, bytes) = (built.keys(), built.bytes());
    let known = KnownDigests::new(1);
    let epoch = known.begin();
    known.install(epoch, built);
    let missed = stored.iter().filter(|p| !known.may_contain(**p)).count();
    // The exact set the filter replaces (8-byte prefixes in a HashSet),
    // measured the same way, for comparison.
    let rss0 = crate::memory::rss_bytes()?;
    let stored: std::collections::HashSet<u64> = stored.into_iter().collect();
    let set_bytes = crate::memory::rss_bytes()?.saturating_sub(rss0);
    let (mut positives, mut tested) = (0u64, 0u64);
    while tested < probes {
        let p: u64 = rand::random();
        if stored.contains(&p) {
            continue;
        }
        tested += 1;
        positives += u64::from(known.may_contain(p));
    }
    let rate = positives as f64 / tested as f64;
    println!(
        "filter of {n} stored digests: {:.1} MiB ({:.2} bits a key; the exact set of prefixes it replaces: {:.1} MiB resident), built in {build_s:.2} s; {missed} stored digests missed; {positives} false positives in {tested} random prefixes: rate {rate:.3e} (bound 2^-16 = {:.3e}); per 1000 unknown keys {:.4} lookups past the budget",
        bytes as f64 / 1048576.0,
        bytes as f64 * 8.0 / n.max(1) as f64,
        set_bytes as f64 / 1048576.0,
        1.0 / 65536.0,
        rate * 1000.0
    );
    println!(
        "{}",
        serde_json::json!({"fpr": {"keys": n, "filter_bytes": bytes, "exact_set_rss_bytes": set_bytes, "build_seconds": build_s, "missed": missed, "positives": positives, "probes": tested, "rate": rate}})
    );
    anyhow::ensure!(missed == 0, "the filter missed {missed} stored digests");
    Ok(())
}
