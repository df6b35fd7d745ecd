//! Fair rate-limit shares under skew: three `tollgate serve` replicas on
//! one Postgres and one key with a per-second rate limit.
//!
//! - **skewed:** the key is driven at `--over` × its rate through ONE
//!   connection to one replica (as a ClusterIP Service pins an Envoy HTTP/2
//!   connection to one pod); after `--warmup` s, admitted/s over
//!   `--duration` s is compared with the documented rate (target ≥ 90%).
//! - **fleet:** right after, the same key is driven at `--over` × its rate
//!   through each of the three replicas at once, for `--warmup` +
//!   `--duration` s: the fleet's admitted units over the whole phase (the
//!   shares moving included) and in every 1 s window, against the rate plus
//!   one burst.
//!
//! Both run twice on fresh fleets: with the share exchange off (every
//! replica enforcing limit/N, as before) and on (the default settings).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use tokio::sync::Semaphore;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tollgate::telemetry::{REPLICAS, SHARED_CELLS};
use tonic::transport::Channel;

use crate::fixture::{limit, seed, FixtureOpts, Proc};
use crate::scenario::check_quota_request;

#[derive(Debug, clap::Args)]
pub struct SkewOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// The key's documented rate, per second (its burst is the same).
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Offered load, as a multiple of the rate.
    #[arg(long, default_value_t = 2.0)]
    pub over: f64,
    /// Seconds before measuring.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
}

/// Bucket width of the admission timeline.
const BUCKET: Duration = Duration::from_millis(50);

/// Admissions over time, in `BUCKET`s from a start.
struct Timeline {
    start: Instant,
    admitted: Vec<AtomicU64>,
    refused: AtomicU64,
    errors: AtomicU64,
}

impl Timeline {
    fn new(start: Instant, seconds: u64) -> Arc<Self> {
        let n = (seconds as u128 * 1000 / BUCKET.as_millis() + 1) as usize;
        Arc::new(Self {
            start,
            admitted: (0..n).map(|_| AtomicU64::new(0)).collect(),
            refused: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    fn record_admitted(&self) {
        let i = (self.start.elapsed().as_millis() / BUCKET.as_millis()) as usize;
        let i = i.min(self.admitted.len() - 1);
        self.admitted[i].fetch_add(1, Ordering::Relaxed);
    }

    fn per_bucket(&self) -> Vec<u64> {
        self.admitted
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Admitted between `from` and `to` seconds after the start.
    fn between(&self, from: u64, to: u64) -> u64 {
        let per = 1000 / BUCKET.as_millis() as u64;
        self.per_bucket()
            .iter()
            .skip((from * per) as usize)
            .take(((to - from) * per) as usize)
            .sum()
    }

    /// The most admitted in any 1 s window.
    fn max_second(&self) -> u64 {
        let per = (1000 / BUCKET.as_millis()) as usize;
        let b = self.per_bucket();
        b.windows(per.min(b.len()))
            .map(|w| w.iter().sum::<u64>())
            .max()
            .unwrap_or(0)
    }
}

/// Offers `per_second` CheckQuota calls of `key` on `channel` (one HTTP/2
/// connection), paced, until `until`, recording into `timeline`.
async fn drive(
    channel: Channel,
    key: Arc<String>,
    per_second: f64,
    until: Instant,
    timeline: Arc<Timeline>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(Semaphore::new(256));
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            break;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut client = AuthServiceClient::new(channel.clone());
        let (key, timeline) = (key.clone(), timeline.clone());
        tokio::spawn(async move {
            match client.check_quota(check_quota_request(&key)).await {
                Ok(r) if r.get_ref().allowed => timeline.record_admitted(),
                Ok(_) => {
                    timeline.refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    timeline.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    let _ = in_flight.acquire_many(256).await;
}

/// What one fleet measured.
#[derive(Debug, serde::Serialize)]
struct Measured {
    sharing: bool,
    skewed_admitted_per_s: f64,
    skewed_share_of_rate: f64,
    skewed_errors: u64,
    /// Cells replica-0 published after the skewed warm-up (a row while hot).
    published_cells: f64,
    fleet_admitted: u64,
    fleet_bound: u64,
    fleet_max_1s: u64,
    fleet_errors: u64,
}

async fn fleet(o: &SkewOpts, sharing: bool) -> anyhow::Result<Measured> {
    let fixture = o.setup.fixture().await?;
    let env: &[(&str, &str)] = if sharing {
        &[]
    } else {
        &[("TOLLGATE_RATE_SHARES__EXCHANGE_INTERVAL_MS", "0")]
    };
    let mut replicas: Vec<Proc> = Vec::new();
    for i in 0..3 {
        replicas.push(fixture.spawn(&format!("replica-{i}"), env).await?);
    }
    for r in &replicas {
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.metric_sum(REPLICAS).await.unwrap_or(0.0) < 3.0 {
            ensure!(Instant::now() < deadline, "{} never saw 3 replicas", r.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let seeded = seed(
        &replicas[0].target(),
        if sharing { "skew-on" } else { "skew-off" },
        1,
        1,
        vec![limit("key", "second", o.rate)],
    )
    .await?;
    let key = Arc::new(seeded[0].key.clone());
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(Channel::from_shared(r.target())?.connect().await?);
    }
    let offered = o.over * o.rate as f64;

    // Skewed: everything through replica-0's one connection.
    let seconds = o.warmup + o.duration;
    let start = Instant::now();
    let skewed = Timeline::new(start, seconds + 1);
    let warmed = start + Duration::from_secs(o.warmup);
    let probe = async {
        tokio::time::sleep_until(warmed.into()).await;
        replicas[0].metric_sum(SHARED_CELLS).await.unwrap_or(0.0)
    };
    let (_, published_cells) = tokio::join!(
        drive(
            channels[0].clone(),
            key.clone(),
            offered,
            start + Duration::from_secs(seconds),
            skewed.clone(),
        ),
        probe
    );
    let admitted = skewed.between(o.warmup, seconds);
    let skewed_admitted_per_s = admitted as f64 / o.duration as f64;

    // Fleet: the same key through all three at once, shares moving.
    let start = Instant::now();
    let all = Timeline::new(start, seconds + 1);
    let until = start + Duration::from_secs(seconds);
    let mut set = tokio::task::JoinSet::new();
    for ch in &channels {
        set.spawn(drive(ch.clone(), key.clone(), offered, until, all.clone()));
    }
    while set.join_next().await.is_some() {}
    let fleet_admitted: u64 = all.per_bucket().iter().sum();
    Ok(Measured {
        sharing,
        skewed_admitted_per_s,
        skewed_share_of_rate: skewed_admitted_per_s / o.rate as f64,
        skewed_errors: skewed.errors.load(Ordering::Relaxed),
        published_cells,
        fleet_admitted,
        // The last calls may complete just after `until`: one more second.
        fleet_bound: o.rate * (seconds + 1) + o.rate,
        fleet_max_1s: all.max_second(),
        fleet_errors: all.errors.load(Ordering::Relaxed),
    })
}

pub async fn run(o: SkewOpts) -> anyhow::Result<()> {
    ensure!(
        o.rate > 0 && o.over > 0.0 && o.duration > 0,
        "nothing to drive"
    );
    println!(
        "one key at {} units/s (burst {}), offered {:.0}/s per connection; warm-up {} s, measured {} s",
        o.rate,
        o.rate,
        o.over * o.rate as f64,
        o.warmup,
        o.duration
    );
    let mut results = Vec::new();
    for sharing in [false, true] {
        let m = fleet(&o, sharing).await?;
        let label = if sharing {
            "shares exchanged (default)"
        } else {
            "limit/N (exchange off)"
        };
        println!(
            "{label}: skewed: {:.1} admitted/s = {:.1}% of the documented rate ({} errors; replica-0 published {} cells); \
             fleet of 3 at once: {} admitted in {} s (bound rate × (T + 1) + burst = {}), most in any 1 s: {} (rate + burst = {}), {} errors",
            m.skewed_admitted_per_s,
            m.skewed_share_of_rate * 100.0,
            m.skewed_errors,
            m.published_cells,
            m.fleet_admitted,
            o.warmup + o.duration,
            m.fleet_bound,
            m.fleet_max_1s,
            2 * o.rate,
            m.fleet_errors,
        );
        results.push(m);
    }
    println!("{}", serde_json::to_string(&results)?);
    let on = &results[1];
    ensure!(
        on.fleet_admitted <= on.fleet_bound && on.fleet_max_1s <= 2 * o.rate,
        "OVER-ADMISSION: {} admitted (bound {}), {} in one second",
        on.fleet_admitted,
        on.fleet_bound,
        on.fleet_max_1s
    );
    Ok(())
}
