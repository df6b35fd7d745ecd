//! A flood of random keys that are well-formed and carry valid checksums
//! (so the parser cannot refuse them), beside legitimate traffic: database
//! queries per 1000 flood requests, and legitimate throughput during the
//! flood as a ratio of legitimate throughput alone.

use std::sync::Arc;

use anyhow::ensure;
use tollgate::profile::Profile;

use crate::fixture::{limit, seed, FixtureOpts};
use crate::load::{self, LoadOpts};
use crate::scenario::{Kind, Scenario};

#[derive(Debug, clap::Args)]
pub struct AbuseOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// Legitimate keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Random keys in the flood (each used once if the run is short enough).
    #[arg(long, default_value_t = 400_000)]
    pub flood_keys: usize,
    #[command(flatten)]
    pub load: LoadOpts,
}

/// Every store query is timed into this histogram: its count is the queries.
fn db_queries() -> String {
    format!("{}_count", tollgate::telemetry::DB_QUERY_SECONDS)
}

pub async fn run(o: AbuseOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let server = fixture.spawn("tollgate", &[]).await?;
    let legit = seed(
        &server.target(),
        "legit",
        10,
        o.keys.div_ceil(10),
        vec![limit("key", "second", 1_000_000)],
    )
    .await?;
    let legit = Arc::new(legit.into_iter().map(|s| s.key).collect::<Vec<_>>());
    let format = Profile::embedded_default().key_format;
    let flood: Vec<String> = (0..o.flood_keys)
        .map(|_| format.generate("live").into_exposed())
        .collect();
    ensure!(
        flood.iter().all(|k| format.parse(k).is_ok()),
        "flood keys must be well-formed"
    );
    let flood = Arc::new(flood);

    let alone = load::run(
        "legitimate alone",
        &server.target(),
        Scenario::new(Kind::Authenticate, legit.clone()),
        &o.load,
    )
    .await?;
    println!("{}", alone.line());

    // The flood: counted from its first request, so every query it causes
    // is in the window.
    let flood_opts = LoadOpts {
        warmup: 0.0,
        ..o.load.clone()
    };
    let target = server.target();
    let before = server.metric_sum(&db_queries()).await?;
    let (flooded, during) = tokio::join!(
        load::run(
            "flood (random keys)",
            &target,
            Scenario::new(Kind::Authenticate, flood.clone()),
            &flood_opts,
        ),
        load::run(
            "legitimate during flood",
            &target,
            Scenario::new(Kind::Authenticate, legit.clone()),
            &flood_opts,
        )
    );
    let after = server.metric_sum(&db_queries()).await?;
    let (flooded, during) = (flooded?, during?);
    println!("{}", flooded.line());
    println!("{}", during.line());
    let sent = flooded.requests + during.requests;
    let per_1000 = (after - before) / flooded.requests.max(1) as f64 * 1000.0;
    ensure!(flooded.allowed == 0, "a random key was allowed");
    println!(
        "database queries: {:.0} during the flood window ({sent} requests) = {per_1000:.0} per 1000 flood requests; legitimate throughput during the flood = {:.2} of alone",
        after - before,
        during.rps / alone.rps
    );
    println!(
        "{}",
        serde_json::json!({
            "queries": after - before,
            "flood_requests": flooded.requests,
            "queries_per_1000_flood": per_1000,
            "flood_rps": flooded.rps,
            "legit_alone_rps": alone.rps,
            "legit_during_rps": during.rps,
            "legit_ratio": during.rps / alone.rps,
            "legit_during_p99_us": during.p99_us,
        })
    );
    Ok(())
}
