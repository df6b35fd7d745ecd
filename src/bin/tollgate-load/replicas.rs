//! Three `tollgate serve` replicas on one Postgres:
//! - revocation lag: RevokeKey returns (committed) → every replica refuses
//!   the key, over many revocations, each warmed into all three caches;
//! - quota accuracy: CheckQuota through all three until the quota is
//!   spent, one replica SIGKILLed half-way: admitted must never exceed it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;

use tollgate::telemetry::{REPLICAS, REVOCATION_LAG_SECONDS};

use crate::fixture::{limit, revoke, seed, FixtureOpts, Proc};
use crate::scenario::{authenticate_request, check_quota_request};

#[derive(Debug, clap::Args)]
pub struct ReplicaOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// Revocations to time.
    #[arg(long, default_value_t = 300)]
    pub revocations: usize,
    /// The tenant's daily quota in the accuracy run.
    #[arg(long, default_value_t = 50_000)]
    pub quota: u64,
    /// Requests in flight per replica in the accuracy run.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

async fn client(p: &Proc) -> anyhow::Result<AuthServiceClient<Channel>> {
    let ch = Channel::from_shared(p.target())?.connect().await?;
    Ok(AuthServiceClient::new(ch))
}

/// Polls `client` with `key` until it is refused; when.
async fn until_refused(
    mut client: AuthServiceClient<Channel>,
    key: String,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client
            .authenticate(authenticate_request(&key))
            .await?
            .into_inner();
        let now = Instant::now();
        if !r.allowed {
            let reason = r.denial.map(|d| d.reason).unwrap_or_default();
            ensure!(
                reason == "KEY_REVOKED",
                "refused for {reason}, not revocation"
            );
            return Ok(now);
        }
        if now > deadline {
            bail!("a replica still accepts a key revoked 5 s ago");
        }
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub async fn run(o: ReplicaOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(fixture.spawn(&format!("replica-{i}"), &[]).await?);
    }
    // Every replica must count three before the accuracy run divides limits.
    for r in &replicas {
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.metric_sum(REPLICAS).await.unwrap_or(0.0) < 3.0 {
            ensure!(Instant::now() < deadline, "{} never saw 3 replicas", r.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(client(r).await?);
    }

    // Revocation lag.
    let keys = seed(&replicas[0].target(), "lag", 1, o.revocations, vec![]).await?;
    let mut from_commit = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut from_send = from_commit.clone();
    for (i, k) in keys.iter().enumerate() {
        for c in clients.iter_mut() {
            let r = c
                .authenticate(authenticate_request(&k.key))
                .await?
                .into_inner();
            ensure!(r.allowed, "a fresh key is refused: {:?}", r.denial);
        }
        let via = i % 3;
        let sent = Instant::now();
        revoke(&mut clients[via], &k.key_id).await?;
        let committed = Instant::now();
        let mut set = JoinSet::new();
        for c in &clients {
            set.spawn(until_refused(c.clone(), k.key.clone()));
        }
        let mut last = committed;
        while let Some(t) = set.join_next().await {
            last = last.max(t??);
        }
        from_commit.record((last - committed).as_nanos().max(1_000) as u64)?;
        from_send.record((last - sent).as_nanos().max(1_000) as u64)?;
    }
    let mut server_sum = 0.0;
    let mut server_count = 0.0;
    for r in &replicas {
        server_sum += r
            .metric_sum(&format!("{REVOCATION_LAG_SECONDS}_sum"))
            .await?;
        server_count += r
            .metric_sum(&format!("{REVOCATION_LAG_SECONDS}_count"))
            .await?;
    }
    println!(
        "revocation lag over {} revocations (RevokeKey returned → all 3 refuse): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        from_commit.len(),
        us(&from_commit, 0.5),
        us(&from_commit, 0.99),
        from_commit.max() as f64 / 1000.0
    );
    println!(
        "  from RevokeKey sent: p50 {:.0} µs, p99 {:.0} µs; server-side NOTIFY sent → applied (tollgate_revocation_lag_seconds): mean {:.0} µs over {} notifications",
        us(&from_send, 0.5),
        us(&from_send, 0.99),
        if server_count > 0.0 { server_sum / server_count * 1e6 } else { 0.0 },
        server_count
    );

    // Quota accuracy with a kill.
    let quota_keys = seed(
        &replicas[0].target(),
        "quota",
        1,
        30,
        vec![limit("tenant", "day", o.quota)],
    )
    .await?;
    let keys: Arc<Vec<String>> = Arc::new(quota_keys.into_iter().map(|k| k.key).collect());
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let mut set = JoinSet::new();
    for (r, c) in clients.iter().enumerate() {
        for t in 0..o.concurrency {
            let (mut c, keys, admitted) = (c.clone(), keys.clone(), admitted.clone());
            let step = o.concurrency;
            set.spawn(async move {
                let mut i = t;
                loop {
                    i += step;
                    match c
                        .check_quota(check_quota_request(&keys[i % keys.len()]))
                        .await
                    {
                        Ok(resp) if resp.get_ref().allowed => {
                            admitted[r].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(resp) => {
                            let reason = resp.into_inner().denial.map(|d| d.reason);
                            return (r, reason.unwrap_or_default());
                        }
                        Err(e) => return (r, format!("gRPC {:?}", e.code())),
                    }
                }
            });
        }
    }
    let total = || {
        admitted
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut victim = replicas.pop().context("three replicas")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while total() < o.quota / 2 {
        ensure!(
            Instant::now() < deadline,
            "half the quota was not reached in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    victim.kill();
    let at_kill = total();
    let mut endings = std::collections::BTreeMap::<(usize, String), usize>::new();
    while let Some(done) = set.join_next().await {
        *endings.entry(done?).or_default() += 1;
    }
    let per: Vec<u64> = admitted.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let admitted = total();
    println!(
        "quota accuracy: quota {}, admitted {admitted} (per replica {per:?}; replica-2 SIGKILLed at {at_kill} admitted), over-admitted {}, never admitted {}",
        o.quota,
        admitted.saturating_sub(o.quota),
        o.quota.saturating_sub(admitted)
    );
    println!("  how the senders stopped (replica, reason) → count: {endings:?}");
    println!(
        "{}",
        serde_json::json!({
            "revocations": from_commit.len(),
            "lag_commit_p50_us": us(&from_commit, 0.5),
            "lag_commit_p99_us": us(&from_commit, 0.99),
            "lag_commit_max_us": from_commit.max() as f64 / 1000.0,
            "lag_send_p50_us": us(&from_send, 0.5),
            "lag_send_p99_us": us(&from_send, 0.99),
            "quota": o.quota,
            "admitted": admitted,
            "over_admitted": admitted.saturating_sub(o.quota),
        })
    );
    ensure!(
        admitted <= o.quota,
        "OVER-ADMISSION: {admitted} > {}",
        o.quota
    );
    Ok(())
}
