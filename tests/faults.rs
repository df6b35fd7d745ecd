//! Faults, with real processes: the database link cut, Postgres stopped,
//! hung and out of connections. A replica keeps deciding from its cache
//! within the staleness bound, refuses what it cannot confirm past it, and
//! recovers without a restart. Every test is bounded in time (a bound, not a
//! synchronisation: each waits on health, invalidations or Postgres itself).

mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;
use tollgate::store::Invalidation;
use tonic_health::pb::health_check_response::ServingStatus;

/// No test here may take longer than this, whatever goes wrong.
const BOUND: Duration = Duration::from_secs(90);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the fault test finished within its bound")
}

fn with_staleness(profile_name: &str, seconds: u64) -> Options {
    let mut opts = Options::new(profile(profile_name));
    opts.cache.max_staleness_seconds = seconds;
    opts
}

/// The gRPC code of an Authenticate call (`Ok` = an answer, allow or deny).
async fn code_of(t: &mut Tollgate, key: &str) -> tonic::Code {
    match t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: key.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

#[sqlx::test]
async fn with_the_feed_down_a_replica_stays_ready_and_decides_cached_keys_within_the_staleness_bound(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut t = spawn_with(&proxy.options(&conn), with_staleness("default", 3600)).await;
        t.create_tenant("acme", "pro").await;
        let (cached, _) = t.create_key("acme").await;
        let (uncached, _) = t.create_key("acme").await;
        assert!(t.authenticate(&cached).await.allowed);
        assert_eq!(t.service_status("database").await, ServingStatus::Serving);

        proxy.cut();
        t.wait_for_service("database", ServingStatus::NotServing)
            .await;
        assert_eq!(
            t.health_status().await,
            ServingStatus::Serving,
            "still ready"
        );
        assert!(t.authenticate(&cached).await.allowed, "cached keys decide");
        assert_eq!(
            code_of(&mut t, &uncached).await,
            tonic::Code::Unavailable,
            "an uncached key cannot be decided: UNAVAILABLE, never a denial"
        );

        proxy.restore();
        t.wait_for_service("database", ServingStatus::Serving).await;
        assert!(t.authenticate(&uncached).await.allowed);
    })
    .await
}

#[sqlx::test]
async fn past_the_staleness_bound_cached_keys_are_unavailable_then_readiness_is_not_serving(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut t = spawn_with(&proxy.options(&conn), with_staleness("default", 1)).await;
        t.create_tenant("acme", "pro").await;
        let (cached, _) = t.create_key("acme").await;
        assert!(t.authenticate(&cached).await.allowed);

        proxy.cut();
        t.wait_for_health(ServingStatus::NotServing).await;
        assert_eq!(
            code_of(&mut t, &cached).await,
            tonic::Code::Unavailable,
            "past the bound a cached decision cannot be confirmed"
        );
        assert_eq!(
            t.service_status("liveness").await,
            ServingStatus::Serving,
            "alive: a restart would not help"
        );

        proxy.restore();
        t.wait_for_health(ServingStatus::Serving).await;
        assert!(
            t.authenticate(&cached).await.allowed,
            "recovered, no restart"
        );
    })
    .await
}

#[sqlx::test]
async fn a_key_revoked_on_another_replica_while_the_link_was_cut_is_refused_once_it_returns(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut a = spawn_with(&proxy.options(&conn), with_staleness("default", 3600)).await;
        let mut b = spawn(&conn, "default").await;
        b.create_tenant("acme", "pro").await;
        let (revoked, revoked_key) = b.create_key("acme").await;
        let (kept, _) = b.create_key("acme").await;
        assert!(a.authenticate(&revoked).await.allowed);
        assert!(a.authenticate(&kept).await.allowed);

        let mut events = a.invalidations();
        proxy.cut();
        wait_for(&mut events, |e| *e == Invalidation::Lost).await;
        b.revoke(&revoked_key.key_id).await;
        assert_eq!(reason(&b.authenticate(&revoked).await), "KEY_REVOKED");

        proxy.restore();
        a.wait_for_service("database", ServingStatus::Serving).await;
        assert_eq!(a.health_status().await, ServingStatus::Serving);
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(a.authenticate(&kept).await.allowed);
    })
    .await
}
