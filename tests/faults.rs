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
use tollgate::store::postgres::FeedSettings;
use tollgate::store::{Invalidation, PostgresStore};
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
        let caught_up = until_ready(&mut events).await;
        assert!(
            caught_up.contains(&Invalidation::Key(revoked_key.key_id.parse().unwrap())),
            "the revocation was caught up: {caught_up:?}"
        );
        assert!(
            !caught_up.contains(&Invalidation::Flush),
            "caught up, not flushed: {caught_up:?}"
        );
        assert_eq!(a.health_status().await, ServingStatus::Serving);
        assert_eq!(a.service_status("database").await, ServingStatus::Serving);
        // The other cached key is still cached: no flush, no reload.
        assert!(a.running.caches().key(&digest_of(&kept)).is_some());
        assert!(a.running.caches().key(&digest_of(&revoked)).is_none());
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(a.authenticate(&kept).await.allowed);
    })
    .await
}

#[sqlx::test]
async fn a_replica_whose_change_history_was_pruned_meanwhile_flushes_exactly_once(
    pool_opts: PgPoolOptions,
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
        // Retention passes: everything but the newest change is pruned,
        // the changes this replica last saw among them.
        let db = pool_opts.connect_with(conn.clone()).await.unwrap();
        let pruned = PostgresStore::new(db)
            .with_feed(FeedSettings {
                retention: Duration::ZERO,
                ..FeedSettings::default()
            })
            .prune_changes()
            .await
            .unwrap();
        assert!(pruned > 0);

        proxy.restore();
        let seen = until_ready(&mut events).await;
        let flushes = seen.iter().filter(|e| **e == Invalidation::Flush).count();
        assert_eq!(flushes, 1, "{seen:?}");
        assert!(
            a.running.caches().key(&digest_of(&kept)).is_none(),
            "flushed"
        );
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(a.authenticate(&kept).await.allowed);
    })
    .await
}

/// The events a replica applies up to (not including) its next `Ready`.
async fn until_ready(rx: &mut tokio::sync::broadcast::Receiver<Invalidation>) -> Vec<Invalidation> {
    let mut seen = Vec::new();
    loop {
        match rx.recv().await {
            Ok(Invalidation::Ready) => return seen,
            Ok(e) => seen.push(e),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                panic!("missed {n} events")
            }
            Err(e) => panic!("invalidation feed closed: {e}"),
        }
    }
}

/// The digest a replica caches `key` under.
fn digest_of(key: &str) -> tollgate::crypto::KeyDigest {
    peppers().current().digest(key)
}
