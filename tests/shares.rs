//! Fair rate-limit shares under skew, with three real Tollgate instances on
//! one Postgres (real gRPC, the real `rate_shares` exchange). Clocks are
//! frozen and moved together one second at a time; each replica exchanges
//! when the test says so (`Running::exchange_shares`), so every count below
//! is exact and nothing here measures time.

mod common;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::domain::limit::{LimitPeriod, LimitScope, LimitSpec};
use tollgate::domain::tenant::TenantId;
use tollgate::grpc::pb;
use tollgate::limits::shares::ShareSettings;
use tollgate::limits::Subject;

/// The documented rate: 50 a second per key, bursting to 50.
const RATE: u64 = 50;
const BURST: u64 = 50;

const BOUND: Duration = Duration::from_secs(120);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test finished within its bound")
}

/// Exchanges on; the interval is long enough that only the test's own
/// calls exchange after the one at start.
fn sharing() -> Options {
    let mut o = Options::new(profile("default"));
    o.rate_shares = ShareSettings {
        exchange_interval_ms: 3_600_000,
        ..Default::default()
    };
    o
}

struct Fleet {
    rate: u64,
    burst: u64,
    replicas: Vec<Tollgate>,
    key: String,
    lineage: uuid::Uuid,
    /// Units admitted by the whole fleet at each instant, in order.
    admitted: Vec<u64>,
}

impl Fleet {
    async fn start(conn: &PgConnectOptions) -> Self {
        Self::with_rate(conn, RATE, BURST).await
    }

    async fn with_rate(conn: &PgConnectOptions, rate: u64, burst: u64) -> Self {
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(spawn_with(conn, sharing()).await);
        }
        let t0: DateTime<Utc> = "2026-12-03T10:00:00Z".parse().unwrap();
        for r in &replicas {
            r.running.clock().freeze_at(t0);
        }
        let a = &mut replicas[0];
        a.tenants
            .create_tenant(op(pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                name: "acme".into(),
                plan: "enterprise".into(),
                overrides: Some(pb::TenantOverrides {
                    limits: vec![pb::LimitSpec {
                        scope: "key".into(),
                        period: "second".into(),
                        limit: rate,
                        burst,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
        let (key, record) = a.create_key("acme").await;
        for r in &replicas {
            r.running.heartbeat().await.unwrap();
        }
        for r in &replicas {
            assert_eq!(r.running.heartbeat().await.unwrap(), 3);
        }
        Self {
            rate,
            burst,
            replicas,
            key,
            lineage: record.key_id.parse().unwrap(),
            admitted: Vec::new(),
        }
    }

    /// One instant: `calls[i]` requests of one unit to replica `i`; then
    /// every clock moves one second and every replica exchanges, in order.
    /// Returns what each replica admitted.
    async fn second(&mut self, calls: [u64; 3]) -> [u64; 3] {
        let mut admitted = [0; 3];
        for (i, r) in self.replicas.iter_mut().enumerate() {
            for _ in 0..calls[i] {
                let resp = r
                    .authenticate_with(pb::AuthenticateRequest {
                        api_key: self.key.clone(),
                        cost: Some(1),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                if resp.allowed {
                    admitted[i] += 1;
                } else {
                    assert_eq!(reason(&resp), "RATE_LIMITED");
                }
            }
        }
        self.admitted.push(admitted.iter().sum());
        for r in &self.replicas {
            r.running.clock().advance(Duration::from_secs(1));
        }
        for r in &self.replicas {
            r.running.exchange_shares().await.unwrap();
        }
        admitted
    }

    /// The fraction of the rate replica `i` enforces for the key now.
    fn share(&self, i: usize) -> f64 {
        let tenant = TenantId::parse("acme").unwrap();
        let subject = Subject {
            key: Some(self.lineage),
            tenant: &tenant,
            billing_day: None,
            environment: None,
        };
        let spec = LimitSpec {
            scope: LimitScope::Key,
            period: LimitPeriod::Second,
            limit: self.rate,
            burst: Some(self.burst),
            environments: vec![],
        };
        self.replicas[i]
            .running
            .limiter()
            .rate_share(&subject, &spec)
            .unwrap()
    }

    /// Over every run of consecutive instants, the fleet admitted at most
    /// the rate for the time between them plus one burst.
    fn assert_never_over_admitted(&self) {
        for i in 0..self.admitted.len() {
            let mut sum = 0;
            for (j, a) in self.admitted.iter().enumerate().skip(i) {
                sum += a;
                let allowed = self.rate * (j - i) as u64 + self.burst;
                assert!(
                    sum <= allowed,
                    "instants {i}..={j} admitted {sum} > {allowed}: {:?}",
                    self.admitted
                );
            }
        }
    }
}

#[sqlx::test]
async fn a_key_whose_traffic_all_reaches_one_replica_gets_its_documented_rate_and_the_fleet_never_more(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let mut fleet = Fleet::start(&conn).await;
        for i in 0..3 {
            assert!((fleet.share(i) - 1.0 / 3.0).abs() < 1e-9, "even at first");
        }

        // Twice the rate, all through replica 0 (one Envoy connection).
        // Warm-up: demand builds, the exchange moves the shares.
        for _ in 0..6 {
            fleet.second([2 * RATE, 0, 0]).await;
        }
        let shares: Vec<f64> = (0..3).map(|i| fleet.share(i)).collect();
        assert!(shares[0] >= 0.9, "the hot replica's share: {shares:?}");
        assert!(shares.iter().sum::<f64>() <= 1.0 + 1e-9, "{shares:?}");

        // Ten seconds: at least 90% of the documented 500 (limit/N gave a third).
        let mut admitted = 0;
        for _ in 0..10 {
            admitted += fleet.second([2 * RATE, 0, 0]).await[0];
        }
        assert!(
            admitted >= RATE * 10 * 9 / 10,
            "replica 0 admitted {admitted} of {} in 10 s",
            RATE * 10
        );

        // The same key now hammered through all three: the fleet still
        // admits no more than the rate plus one burst.
        for _ in 0..10 {
            fleet.second([2 * RATE; 3]).await;
        }
        // And the traffic moves to replica 1 alone: replica 0 gives its
        // share back, replica 1 gets the rate.
        for _ in 0..8 {
            fleet.second([0, 2 * RATE, 0]).await;
        }
        let shares: Vec<f64> = (0..3).map(|i| fleet.share(i)).collect();
        assert!(shares[1] >= 0.9, "the share moved: {shares:?}");
        let mut admitted = 0;
        for _ in 0..10 {
            admitted += fleet.second([0, 2 * RATE, 0]).await[1];
        }
        assert!(
            admitted >= RATE * 10 * 9 / 10,
            "replica 1 admitted {admitted}"
        );
        fleet.assert_never_over_admitted();

        // Quiet: every row goes and every replica is back to the even split.
        for _ in 0..30 {
            fleet.second([0, 0, 0]).await;
        }
        for i in 0..3 {
            assert!(
                (fleet.share(i) - 1.0 / 3.0).abs() < 1e-9,
                "{}",
                fleet.share(i)
            );
        }
        let db = pool(&conn).await;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rate_shares")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(rows, 0, "nothing published once nothing is hot");
    })
    .await
}

#[sqlx::test]
async fn a_replica_joining_while_a_key_is_hot_starts_from_what_the_others_leave(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let mut fleet = Fleet::start(&conn).await;
        for _ in 0..6 {
            fleet.second([2 * RATE, 0, 0]).await;
        }
        assert!(fleet.share(0) >= 0.9);
        // A fourth replica: it exchanged once before it turned ready, so it
        // already enforces no more than the others' claims leave, instead of
        // the quarter it would start from.
        let d = spawn_with(&conn, sharing()).await;
        let tenant = TenantId::parse("acme").unwrap();
        let subject = Subject {
            key: Some(fleet.lineage),
            tenant: &tenant,
            billing_day: None,
            environment: None,
        };
        let spec = LimitSpec {
            scope: LimitScope::Key,
            period: LimitPeriod::Second,
            limit: RATE,
            burst: Some(BURST),
            environments: vec![],
        };
        let joined = d.running.limiter().rate_share(&subject, &spec).unwrap();
        let others: f64 = (0..3).map(|i| fleet.share(i)).sum();
        assert!(
            joined + others <= 1.0 + 1e-9,
            "the newcomer enforces {joined} beside {others}"
        );
        assert!(joined < 0.25, "not the even quarter: {joined}");
    })
    .await
}

#[sqlx::test]
async fn traffic_moving_between_replicas_at_random_never_gets_the_fleet_past_rate_plus_burst(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        // 20 a second bursting to 30: an idle replica's floor (1/30) is
        // still one whole unit of burst.
        let mut fleet = Fleet::with_rate(&conn, 20, 30).await;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        // Each replica's calls a second, changing now and then: idle, a
        // trickle, about the rate, twice the rate.
        let levels = [0, 5, 20, 40];
        let mut calls = [0u64; 3];
        let mut hot_seconds = 0;
        for _ in 0..60 {
            for c in calls.iter_mut() {
                if next(10) < 3 {
                    *c = levels[next(4) as usize];
                }
            }
            let admitted = fleet.second(calls).await;
            hot_seconds += u64::from(admitted.iter().sum::<u64>() >= 15);
        }
        fleet.assert_never_over_admitted();
        assert!(
            hot_seconds >= 10,
            "the walk must press on the limit: {hot_seconds}"
        );
    })
    .await
}
