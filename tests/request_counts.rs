//! Per-key request counts (MailSage "Monitor key usage in dashboard") over
//! real gRPC against real Postgres: counted in memory on the decision path,
//! written by the flush in one store call, read back by GetUsage per day
//! and per hour, summed across replicas.

mod common;
#[path = "support/spy_store.rs"]
mod spy_store;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use common::*;
use spy_store::SpyStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;
use tollgate::store::{PostgresStore, Store};
use tonic::Code;

async fn usage(t: &mut Tollgate, key_id: &str) -> pb::GetUsageResponse {
    t.auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: key_id.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

/// (allowed, denied) summed over a series.
fn sum(series: &[pb::RequestCount]) -> (u64, u64) {
    series
        .iter()
        .fold((0, 0), |(a, d), c| (a + c.allowed, d + c.denied))
}

#[sqlx::test]
async fn each_key_s_allowed_and_denied_requests_are_exact_after_one_flush_write(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let spy = Arc::new(SpyStore::new(Arc::new(PostgresStore::new(
        pool(&conn).await,
    ))));
    let store: Arc<dyn Store> = spy.clone();
    let mut t = spawn_on_store(store, Options::new(profile("msgflash"))).await;
    // Frozen: every count lands in one hour and one day.
    let now = chrono::Utc::now();
    t.running.clock().freeze_at(now);
    t.create_tenant("acme", "pro").await;
    let (a_secret, a) = t.create_key("acme").await;
    let (b_secret, b) = t.create_key("acme").await;
    for _ in 0..4 {
        assert!(t.authenticate(&a_secret).await.allowed);
    }
    // CheckQuota by the key itself is a decision about it too.
    let checked = t
        .auth
        .check_quota(pb::CheckQuotaRequest {
            api_key: a_secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(checked.allowed, "{checked:?}");
    for _ in 0..2 {
        assert!(t.authenticate(&b_secret).await.allowed);
    }
    t.revoke(&b.key_id).await;
    for _ in 0..3 {
        let r = t.authenticate(&b_secret).await;
        assert_eq!(reason(&r), "KEY_REVOKED", "{r:?}");
    }
    // Nothing is written before the flush.
    assert_eq!(usage(&mut t, &a.key_id).await.daily_requests, vec![]);
    let calls = spy.counts.request_count_calls.load(SeqCst);

    assert_eq!(t.running.flush_request_counts().await.unwrap(), 2);
    assert_eq!(
        spy.counts.request_count_calls.load(SeqCst),
        calls + 1,
        "one store write for the whole batch"
    );
    assert_eq!(
        spy.counts.request_count_rows.load(SeqCst),
        2,
        "one row per key"
    );

    let today =
        chrono::DateTime::from_timestamp(now.timestamp() - now.timestamp() % 86_400, 0).unwrap();
    let hour =
        chrono::DateTime::from_timestamp(now.timestamp() - now.timestamp() % 3600, 0).unwrap();
    let ua = usage(&mut t, &a.key_id).await;
    assert_eq!(
        ua.daily_requests,
        vec![pb::RequestCount {
            start: Some(prost_types::Timestamp {
                seconds: today.timestamp(),
                nanos: 0
            }),
            allowed: 5,
            denied: 0
        }]
    );
    assert_eq!(ua.hourly_requests.len(), 1);
    assert_eq!(
        ua.hourly_requests[0].start.unwrap().seconds,
        hour.timestamp()
    );
    assert_eq!(sum(&ua.hourly_requests), (5, 0));
    let ub = usage(&mut t, &b.key_id).await;
    assert_eq!(sum(&ub.daily_requests), (2, 3), "denials counted apart");
    assert_eq!(sum(&ub.hourly_requests), (2, 3));

    // A second flush adds to the same rows; an idle one writes nothing.
    t.authenticate(&a_secret).await;
    assert_eq!(t.running.flush_request_counts().await.unwrap(), 1);
    assert_eq!(t.running.flush_request_counts().await.unwrap(), 0);
    assert_eq!(spy.counts.request_count_calls.load(SeqCst), calls + 2);
    assert_eq!(sum(&usage(&mut t, &a.key_id).await.daily_requests), (6, 0));

    let bad = t
        .auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: a.key_id.clone(),
            days: 401,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // `days` without a key is refused, not ignored: counts are per key.
    let bad = t
        .auth
        .get_usage(op(pb::GetUsageRequest {
            tenant_id: "acme".into(),
            days: 7,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
}

#[sqlx::test]
async fn every_replica_s_counts_are_summed(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut a = spawn(&conn, "msgflash").await;
    let mut b = spawn(&conn, "msgflash").await;
    let now = chrono::Utc::now();
    a.running.clock().freeze_at(now);
    b.running.clock().freeze_at(now);
    a.create_tenant("acme", "pro").await;
    let (secret, key) = a.create_key("acme").await;
    for _ in 0..4 {
        assert!(a.authenticate(&secret).await.allowed);
    }
    for _ in 0..3 {
        assert!(b.authenticate(&secret).await.allowed);
    }
    a.running.flush_request_counts().await.unwrap();
    b.running.flush_request_counts().await.unwrap();
    for t in [&mut a, &mut b] {
        let u = usage(t, &key.key_id).await;
        assert_eq!(sum(&u.daily_requests), (7, 0));
        assert_eq!(sum(&u.hourly_requests), (7, 0));
    }
}

/// Rows of `table` for `key`, by period start (seconds), as stored.
async fn stored(pool: &sqlx::PgPool, table: &str, column: &str, key: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT EXTRACT(EPOCH FROM {column})::bigint, allowed FROM {table} \
         WHERE key_id = $1::uuid ORDER BY {column}"
    ))
    .bind(key)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn hourly_counts_are_kept_two_days_and_daily_counts_four_hundred_days(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let db = pool(&conn).await;
    let mut t = spawn(&conn, "msgflash").await;
    let clock = t.running.clock().clone();
    // 00:30 UTC on a day, frozen: each step below flushes in a known hour.
    let now = chrono::Utc::now().timestamp();
    let day0 = now - now % 86_400 - 10 * 86_400;
    clock.freeze_at(chrono::DateTime::from_timestamp(day0 + 1800, 0).unwrap());
    t.create_tenant("acme", "pro").await;
    let (secret, key) = t.create_key("acme").await;
    let hour = |h: i64| day0 + h * 3600;
    let step = |hours: u64| clock.advance(std::time::Duration::from_secs(hours * 3600));

    assert!(t.authenticate(&secret).await.allowed);
    t.running.flush_request_counts().await.unwrap();
    // 47 hours on, the first hour is still within the last 48.
    step(47);
    assert!(t.authenticate(&secret).await.allowed);
    t.running.flush_request_counts().await.unwrap();
    let hourly = stored(&db, "key_requests_hourly", "hour", &key.key_id).await;
    assert_eq!(hourly, vec![(hour(0), 1), (hour(47), 1)]);
    let u = usage(&mut t, &key.key_id).await;
    assert_eq!(
        (u.hourly_requests.len(), sum(&u.hourly_requests)),
        (2, (2, 0))
    );

    // One more hour: the first has aged out and is pruned by the flush;
    // its day stays.
    step(1);
    assert!(t.authenticate(&secret).await.allowed);
    t.running.flush_request_counts().await.unwrap();
    let hourly = stored(&db, "key_requests_hourly", "hour", &key.key_id).await;
    assert_eq!(hourly, vec![(hour(47), 1), (hour(48), 1)]);
    let daily = stored(&db, "key_requests_daily", "day", &key.key_id).await;
    assert_eq!(
        daily,
        vec![(day0, 1), (day0 + 86_400, 1), (day0 + 2 * 86_400, 1)]
    );

    // 400 days after the first: only the last 400 days (today included)
    // are kept. (The key expired meanwhile: a denial, still counted.)
    step(400 * 24 - 48);
    t.authenticate(&secret).await;
    t.running.flush_request_counts().await.unwrap();
    let daily = stored(&db, "key_requests_daily", "day", &key.key_id).await;
    assert_eq!(
        daily.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
        vec![day0 + 86_400, day0 + 2 * 86_400, day0 + 400 * 86_400],
        "day 0 is 400 days old: pruned"
    );
    let hourly = stored(&db, "key_requests_hourly", "hour", &key.key_id).await;
    assert_eq!(hourly.len(), 1, "{hourly:?}");
    let u = usage(&mut t, &key.key_id).await;
    assert_eq!(u.daily_requests.len(), 1, "30 days by default");
    let all = t
        .auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: key.key_id.clone(),
            days: 400,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.daily_requests.len(), 3, "every day kept is readable");
}
