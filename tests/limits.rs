//! Rate limits and quotas over real gRPC against real Postgres, with several
//! Tollgate instances sharing one database. Clocks are frozen so rate limits
//! see no time pass between calls; nothing here measures time.

mod common;

use chrono::{DateTime, Utc};
use common::*;
use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;
use tollgate::store::Invalidation;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn quota(scope: &str, period: &str, limit: u64) -> pb::LimitSpec {
    pb::LimitSpec {
        scope: scope.into(),
        period: period.into(),
        limit,
        ..Default::default()
    }
}

async fn create_tenant_with_limits(
    t: &mut Tollgate,
    id: &str,
    plan: &str,
    limits: Vec<pb::LimitSpec>,
) {
    t.tenants
        .create_tenant(op(pb::CreateTenantRequest {
            tenant_id: id.into(),
            name: id.into(),
            plan: plan.into(),
            overrides: Some(pb::TenantOverrides {
                limits,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
}

async fn spend(t: &mut Tollgate, key: &str, cost: u32) -> pb::AuthenticateResponse {
    t.authenticate_with(pb::AuthenticateRequest {
        api_key: key.into(),
        cost: Some(cost),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[sqlx::test]
async fn msgflash_allows_ten_requests_per_second_per_key_then_answers_429_with_retry_after(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("acme", "pro").await;
    let (key, _) = t.create_key("acme").await;
    for i in 0..10 {
        let r = spend(&mut t, &key, 1).await;
        assert!(r.allowed, "request {i}: {r:?}");
    }
    let r = spend(&mut t, &key, 1).await;
    assert!(!r.allowed);
    let d = r.denial.unwrap();
    assert_eq!(d.reason, "RATE_LIMITED");
    assert_eq!(d.code, "API_RATE_LIMIT_EXCEEDED");
    assert_eq!(d.http_status, 429);
    assert_eq!(d.retry_after_seconds, 1, "100 ms rounds up to 1 s");
    let names: Vec<&str> = r.limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["key_per_second", "tenant_per_month"],
        "tightest first, all reported"
    );
    assert_eq!(r.limits[0].remaining, 0);

    // Identity-only calls (no cost) are not counted.
    assert!(t.authenticate(&key).await.allowed);
    t.running
        .clock()
        .advance(std::time::Duration::from_millis(100));
    assert!(
        spend(&mut t, &key, 1).await.allowed,
        "one unit back after 100 ms"
    );
}

#[sqlx::test]
async fn a_request_costing_several_units_and_denied_requests_consume_nothing(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    create_tenant_with_limits(
        &mut t,
        "acme",
        "pro",
        vec![quota("key", "minute", 2), quota("tenant", "day", 10)],
    )
    .await;
    let (key, _) = t.create_key("acme").await;
    assert!(spend(&mut t, &key, 1).await.allowed);
    assert!(spend(&mut t, &key, 1).await.allowed);
    for _ in 0..5 {
        assert_eq!(reason(&spend(&mut t, &key, 1).await), "RATE_LIMITED");
    }
    t.running.shutdown().await.unwrap();
    let db = pool_opts.connect_with(conn.clone()).await.unwrap();
    let used: i64 =
        sqlx::query_scalar("SELECT used FROM quota_usage WHERE limit_name = 'tenant_per_day'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(used, 2, "the day quota saw only the two admitted requests");

    // A request may cost several units.
    let mut t = spawn(&conn, "default").await;
    create_tenant_with_limits(&mut t, "bulk", "pro", vec![quota("tenant", "day", 10)]).await;
    let (key, _) = t.create_key("bulk").await;
    assert!(spend(&mut t, &key, 2).await.allowed);
    assert_eq!(
        reason(&spend(&mut t, &key, 9).await),
        "QUOTA_EXHAUSTED",
        "2 + 9 > 10"
    );
    assert!(spend(&mut t, &key, 8).await.allowed, "2 + 8 = 10");
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "QUOTA_EXHAUSTED");
}

#[sqlx::test]
async fn three_instances_hammering_one_quota_admit_exactly_the_quota(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "default").await;
    let b = spawn(&conn, "default").await;
    let c = spawn(&conn, "default").await;
    create_tenant_with_limits(
        &mut a,
        "acme",
        "enterprise",
        vec![quota("tenant", "month", 300)],
    )
    .await;
    let (key, _) = a.create_key("acme").await;

    let clients = [a.auth.clone(), b.auth.clone(), c.auth.clone()];
    let calls = (0..900).map(|i| {
        let mut client = clients[i % 3].clone();
        let key = key.clone();
        async move {
            client
                .authenticate(pb::AuthenticateRequest {
                    api_key: key,
                    cost: Some(1),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .allowed
        }
    });
    // 30 at a time from each replica's point of view.
    let results: Vec<bool> = futures::stream::iter(calls)
        .buffer_unordered(90)
        .collect()
        .await;
    let admitted = results.iter().filter(|a| **a).count();
    assert_eq!(admitted, 300);
    let db = pool_opts.connect_with(conn).await.unwrap();
    let used: i64 = sqlx::query_scalar("SELECT used FROM quota_usage")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(used, 300);
}

#[sqlx::test]
async fn a_replica_killed_mid_run_never_causes_over_admission(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "default").await;
    let mut b = spawn(&conn, "default").await;
    let doomed = spawn(&conn, "default").await;
    create_tenant_with_limits(
        &mut a,
        "acme",
        "enterprise",
        vec![quota("tenant", "month", 200)],
    )
    .await;
    let (key, _) = a.create_key("acme").await;

    let mut admitted = 0;
    let mut doomed_client = doomed.auth.clone();
    for i in 0..150 {
        let r = match i % 3 {
            0 => spend(&mut a, &key, 1).await.allowed,
            1 => spend(&mut b, &key, 1).await.allowed,
            _ => {
                doomed_client
                    .authenticate(pb::AuthenticateRequest {
                        api_key: key.clone(),
                        cost: Some(1),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .allowed
            }
        };
        admitted += usize::from(r);
    }
    // SIGKILL-like: its unused lease is never returned.
    doomed.running.kill();
    for i in 0..400 {
        let t = if i % 2 == 0 { &mut a } else { &mut b };
        admitted += usize::from(spend(t, &key, 1).await.allowed);
    }
    assert!(admitted <= 200, "admitted {admitted} of a 200 quota");
    assert!(
        admitted >= 150,
        "a crash under-admits by at most its lease: {admitted}"
    );
    let db = pool_opts.connect_with(conn).await.unwrap();
    let used: i64 = sqlx::query_scalar("SELECT used FROM quota_usage")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(used <= 200);
}

#[sqlx::test]
async fn usage_survives_a_restart_and_a_dry_run_consumes_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut first = spawn(&conn, "messagesmart").await;
    first.create_tenant("shop", "default").await;
    let (key, record) = first.create_key("shop").await;
    assert!(spend(&mut first, &key, 5).await.allowed);
    first.running.shutdown().await.unwrap();

    let mut second = spawn(&conn, "messagesmart").await;
    let usage = second
        .auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: record.key_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let month = usage
        .quotas
        .iter()
        .find(|q| q.name == "key_per_month")
        .unwrap();
    assert_eq!((month.used, month.limit), (5, 10_000));

    for _ in 0..3 {
        let r = second
            .auth
            .check_quota(pb::CheckQuotaRequest {
                api_key: key.clone(),
                cost: 1,
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.allowed);
        let m = r.limits.iter().find(|l| l.name == "key_per_month").unwrap();
        assert_eq!(m.remaining, 10_000 - 5 - 1, "what would remain after it");
    }
    let r = second
        .auth
        .check_quota(op(pb::CheckQuotaRequest {
            key_id: record.key_id.clone(),
            cost: 2,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed);
    assert_eq!(r.plan, "default");
    second.running.shutdown().await.unwrap();
    let mut third = spawn(&conn, "messagesmart").await;
    let usage = third
        .auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: record.key_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let month = usage
        .quotas
        .iter()
        .find(|q| q.name == "key_per_month")
        .unwrap();
    assert_eq!(month.used, 7, "5 + 2; dry runs took nothing");
}

#[sqlx::test]
async fn messagesmart_keys_carry_their_own_quota(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.running.clock().freeze_at(at("2026-11-23T23:00:00Z"));
    t.create_tenant("shop", "default").await;
    let (key, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "daily".into(),
            limits: vec![quota("key", "day", 2)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(spend(&mut t, &key, 1).await.allowed);
    assert!(spend(&mut t, &key, 1).await.allowed);
    let r = spend(&mut t, &key, 1).await;
    let d = r.denial.unwrap();
    assert_eq!(d.code, "api_key_quota_exceeded");
    assert_eq!(d.http_status, 429);
    assert_eq!(d.retry_after_seconds, 3600, "until midnight UTC");
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["error"]["message"], "API key quota has been exceeded.");
    t.running
        .clock()
        .advance(std::time::Duration::from_secs(3600));
    assert!(spend(&mut t, &key, 1).await.allowed, "a new day");
}

#[sqlx::test]
async fn raising_a_limit_takes_effect_at_once_and_lowering_it_denies_until_the_next_period(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.running.clock().freeze_at(at("2027-01-31T12:00:00Z"));
    create_tenant_with_limits(
        &mut t,
        "acme",
        "enterprise",
        vec![quota("tenant", "month", 3)],
    )
    .await;
    let (key, _) = t.create_key("acme").await;
    for _ in 0..3 {
        assert!(spend(&mut t, &key, 1).await.allowed);
    }
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "QUOTA_EXHAUSTED");

    let set_quota = |limit| {
        op(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            update_mask: vec!["overrides".into()],
            overrides: Some(pb::TenantOverrides {
                limits: vec![quota("tenant", "month", limit)],
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let tenant = tollgate::domain::TenantId::parse("acme").unwrap();
    let mut events = t.invalidations();
    t.tenants.update_tenant(set_quota(5)).await.unwrap();
    wait_for(&mut events, |e| *e == Invalidation::Tenant(tenant.clone())).await;
    assert!(
        spend(&mut t, &key, 1).await.allowed,
        "raised: usage kept, 2 more"
    );
    assert!(spend(&mut t, &key, 1).await.allowed);
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "QUOTA_EXHAUSTED");

    t.tenants.update_tenant(set_quota(2)).await.unwrap();
    wait_for(&mut events, |e| *e == Invalidation::Tenant(tenant.clone())).await;
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "QUOTA_EXHAUSTED");
    // Next calendar month.
    t.running
        .clock()
        .advance(std::time::Duration::from_secs(13 * 24 * 3600));
    assert!(spend(&mut t, &key, 1).await.allowed);
}

#[sqlx::test]
async fn shadow_mode_allows_and_reports_the_would_be_denial(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let text = std::fs::read_to_string(format!(
        "{}/profiles/default.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("[plans.free]\n", "[plans.free]\nshadow = true\n");
    let profile = tollgate::profile::Profile::from_toml(&text).unwrap();
    assert!(profile.plan("free").unwrap().shadow);
    let mut t = spawn_with(&conn, Options::new(profile)).await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("acme", "free").await;
    let (key, _) = t.create_key("acme").await;
    for _ in 0..10 {
        let r = spend(&mut t, &key, 1).await;
        assert!(r.allowed);
        assert_eq!(r.shadow_denial_reason, "");
    }
    let r = spend(&mut t, &key, 1).await;
    assert!(r.allowed, "shadow mode never denies");
    assert_eq!(r.shadow_denial_reason, "RATE_LIMITED");
    assert!(r.denial.is_none());
}

#[sqlx::test]
async fn replicas_divide_a_rate_limit_and_re_divide_when_one_leaves(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "default").await;
    let mut b = spawn(&conn, "default").await;
    let c = spawn(&conn, "default").await;
    for t in [&a, &b, &c] {
        t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    }
    create_tenant_with_limits(
        &mut a,
        "acme",
        "enterprise",
        vec![quota("key", "minute", 30)],
    )
    .await;
    let (key, _) = a.create_key("acme").await;
    for t in [&a, &b, &c] {
        t.running.heartbeat().await.unwrap();
    }
    assert_eq!(a.running.heartbeat().await.unwrap(), 3);
    let mut admitted_by_a = 0;
    for _ in 0..30 {
        admitted_by_a += usize::from(spend(&mut a, &key, 1).await.allowed);
    }
    assert_eq!(admitted_by_a, 10, "a third of 30/min");

    c.running.shutdown().await.unwrap();
    assert_eq!(b.running.heartbeat().await.unwrap(), 2);
    let mut admitted_by_b = 0;
    for _ in 0..30 {
        admitted_by_b += usize::from(spend(&mut b, &key, 1).await.allowed);
    }
    assert_eq!(admitted_by_b, 15, "half of 30/min");
}

/// The names and limits an allowed or denied call reports, tightest first.
fn reported(r: &pb::AuthenticateResponse) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = r.limits.iter().map(|l| (l.name.clone(), l.limit)).collect();
    v.sort();
    v
}

#[sqlx::test]
async fn a_key_given_its_own_daily_quota_keeps_the_plans_sixty_per_minute(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "messagesmart").await;
    a.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    a.create_tenant("shop", "default").await;
    let (key, _) = a
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "support gave it a quota".into(),
            limits: vec![quota("key", "day", 1000)],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut admitted = 0;
    let mut last = None;
    for _ in 0..75 {
        let r = spend(&mut a, &key, 1).await;
        admitted += usize::from(r.allowed);
        last = Some(r);
    }
    let last = last.unwrap();
    assert_eq!(admitted, 60, "the plan's 60/min still holds");
    assert_eq!(reason(&last), "RATE_LIMITED");
    assert_eq!(
        reported(&last),
        vec![
            ("key_per_day".to_string(), 1000),
            ("key_per_minute".to_string(), 60),
            ("key_per_month".to_string(), 10_000),
        ]
    );
}

#[sqlx::test]
async fn a_key_given_its_own_rate_keeps_the_plans_monthly_quota(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("shop", "default").await;
    let (key, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "slower".into(),
            limits: vec![quota("key", "minute", 30)],
            ..Default::default()
        })
        .await
        .unwrap();
    let r = spend(&mut t, &key, 1).await;
    assert!(r.allowed);
    assert_eq!(
        reported(&r),
        vec![
            ("key_per_minute".to_string(), 30),
            ("key_per_month".to_string(), 10_000),
        ],
        "its own 30/min tightens the plan's 60; the plan's quota stays"
    );
    for _ in 0..29 {
        assert!(spend(&mut t, &key, 1).await.allowed);
    }
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "RATE_LIMITED");
}

#[sqlx::test]
async fn a_limit_for_test_keys_leaves_a_live_keys_plan_limits_in_force(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("shop", "default").await;
    let mut test_only = quota("key", "minute", 5);
    test_only.environments = vec!["test".into()];
    let (key, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "live".into(),
            environment: "live".into(),
            limits: vec![test_only],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut admitted = 0;
    for _ in 0..61 {
        admitted += usize::from(spend(&mut t, &key, 1).await.allowed);
    }
    assert_eq!(admitted, 60, "the plan's 60/min, not nothing and not 5");
    let r = spend(&mut t, &key, 1).await;
    assert_eq!(
        reported(&r),
        vec![
            ("key_per_minute".to_string(), 60),
            ("key_per_month".to_string(), 10_000),
        ]
    );
}

#[sqlx::test]
async fn a_key_limit_looser_than_the_plans_is_refused_naming_the_field_and_changes_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.create_tenant("shop", "default").await;
    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "greedy".into(),
            limits: vec![quota("key", "minute", 1_000_000_000)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["limits[0].limit"]);
    let (_, record) = t.create_key("shop").await;
    let mut loose_burst = quota("key", "minute", 10);
    loose_burst.burst = 1000;
    let err = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: record.key_id.clone(),
            update_mask: vec!["limits".into()],
            limits: vec![quota("key", "month", 20_000), loose_burst],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["limits[0].limit", "limits[1].burst"]);
    let key = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: record.key_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(key.limits.is_empty(), "nothing changed");
}

async fn rotate(t: &mut Tollgate, key_id: &str, grace_seconds: i64) -> pb::RotateKeyResponse {
    t.auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: key_id.into(),
            grace_seconds,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

#[sqlx::test]
async fn rotating_a_key_that_spent_its_daily_quota_hands_out_no_fresh_quota(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "messagesmart").await;
    let mut b = spawn(&conn, "messagesmart").await;
    for t in [&a, &b] {
        t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    }
    a.create_tenant("shop", "default").await;
    let (old, record) = a
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "three a day".into(),
            limits: vec![quota("key", "day", 3)],
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(spend(&mut a, &old, 1).await.allowed);
    }
    assert_eq!(reason(&spend(&mut a, &old, 1).await), "QUOTA_EXHAUSTED");
    let rotated = rotate(&mut b, &record.key_id, 3600).await;
    let new = rotated.api_key;
    assert_eq!(
        reason(&spend(&mut b, &new, 1).await),
        "QUOTA_EXHAUSTED",
        "the new key is the same key's next credential, with the same quota"
    );
    assert_eq!(reason(&spend(&mut a, &new, 1).await), "QUOTA_EXHAUSTED");
    assert_eq!(reason(&spend(&mut b, &old, 1).await), "QUOTA_EXHAUSTED");
    let usage = a
        .auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: rotated.key.unwrap().key_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let day = usage
        .quotas
        .iter()
        .find(|q| q.name == "key_per_day")
        .unwrap();
    assert_eq!((day.used, day.limit), (3, 3));
}

#[sqlx::test]
async fn a_chain_of_rotations_keeps_one_key_in_grace_and_shares_one_rate(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("shop", "default").await;
    let (first, record) = t.create_key("shop").await;
    let second = rotate(&mut t, &record.key_id, 3600).await;
    let third = rotate(&mut t, &second.key.unwrap().key_id, 3600).await;
    assert_eq!(
        reason(&t.authenticate(&first).await),
        "KEY_EXPIRED",
        "rotating again ends the earlier key's grace"
    );
    let (second, third) = (second.api_key, third.api_key);
    let mut admitted = 0;
    for i in 0..80 {
        let key = if i % 2 == 0 { &second } else { &third };
        admitted += usize::from(spend(&mut t, key, 1).await.allowed);
    }
    assert_eq!(
        admitted, 60,
        "two live credentials, one 60/min between them"
    );
}

#[sqlx::test]
async fn an_expired_key_revived_past_the_cap_is_refused_and_stays_expired(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("free", "free").await;
    let (_, short) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "free".into(),
            name: "short-lived".into(),
            ttl_seconds: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    t.create_key("free").await;
    t.running
        .clock()
        .advance(std::time::Duration::from_secs(120));
    let (_, third) = t.create_key("free").await;
    let revive = || {
        op(pb::UpdateKeyRequest {
            key_id: short.key_id.clone(),
            update_mask: vec!["expires_at".into()],
            ..Default::default()
        })
    };
    let err = t.auth.update_key(revive()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let key = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: short.key_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(key.expires_at.is_some(), "still expired: nothing changed");

    // Under the cap, reviving is allowed.
    t.revoke(&third.key_id).await;
    let key = t.auth.update_key(revive()).await.unwrap().into_inner().key;
    assert!(key.unwrap().expires_at.is_none());
}

/// Waits until `n` backends of this database wait on a lock (a condition
/// polled on the database, not a sleep).
async fn until_waiting_on_locks(db: &sqlx::PgPool, n: i64) {
    for _ in 0..100_000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{n} backends never waited on a lock");
}

/// Holds the key row's lock in a transaction of the test's own, so the
/// calls started meanwhile queue on it in a known order.
async fn lock_key_row(
    db: &sqlx::PgPool,
    key_id: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM api_keys WHERE key_id = $1::uuid FOR UPDATE")
        .bind(key_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

#[sqlx::test]
async fn an_update_queued_behind_a_rotation_cannot_keep_the_rotated_key_live_forever(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    let b = spawn(&conn, "default").await;
    t.create_tenant("acme", "pro").await;
    let (_, record) = t.create_key("acme").await;
    let db = pool_opts.connect_with(conn).await.unwrap();

    let hold = lock_key_row(&db, &record.key_id).await;
    let mut rotator = t.auth.clone();
    let id = record.key_id.clone();
    let rotation = tokio::spawn(async move {
        rotator
            .rotate_key(op(pb::RotateKeyRequest {
                key_id: id,
                grace_seconds: 60,
                ..Default::default()
            }))
            .await
    });
    until_waiting_on_locks(&db, 1).await;
    let mut updater = b.auth.clone();
    let id = record.key_id.clone();
    let update = tokio::spawn(async move {
        updater
            .update_key(op(pb::UpdateKeyRequest {
                key_id: id,
                update_mask: vec!["expires_at".into()],
                ..Default::default()
            }))
            .await
    });
    until_waiting_on_locks(&db, 2).await;
    hold.rollback().await.unwrap();

    rotation.await.unwrap().unwrap();
    let err = update.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let old = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: record.key_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(
        old.expires_at.is_some(),
        "the rotated key ends with its grace"
    );
}

#[sqlx::test]
async fn scopes_narrowed_while_a_rotation_waits_are_the_new_keys_scopes(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    let b = spawn(&conn, "default").await;
    t.create_tenant("acme", "pro").await;
    let (_, record) = t.create_key("acme").await;
    assert_eq!(record.scopes, vec!["read", "write"]);
    let db = pool_opts.connect_with(conn).await.unwrap();

    let hold = lock_key_row(&db, &record.key_id).await;
    let mut updater = b.auth.clone();
    let id = record.key_id.clone();
    let narrowing = tokio::spawn(async move {
        updater
            .update_key(op(pb::UpdateKeyRequest {
                key_id: id,
                update_mask: vec!["scopes".into()],
                scopes: vec!["read".into()],
                ..Default::default()
            }))
            .await
    });
    until_waiting_on_locks(&db, 1).await;
    let mut rotator = t.auth.clone();
    let id = record.key_id.clone();
    let rotation = tokio::spawn(async move {
        rotator
            .rotate_key(op(pb::RotateKeyRequest {
                key_id: id,
                grace_seconds: 60,
                ..Default::default()
            }))
            .await
    });
    until_waiting_on_locks(&db, 2).await;
    hold.rollback().await.unwrap();

    narrowing.await.unwrap().unwrap();
    let rotated = rotation.await.unwrap().unwrap().into_inner();
    assert_eq!(rotated.key.unwrap().scopes, vec!["read"], "not lost");
}

#[sqlx::test]
async fn retries_through_a_database_outage_do_not_burn_the_callers_rate_limit(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let proxy = Proxy::start(pg_addr(&conn)).await;
    let store: std::sync::Arc<dyn tollgate::store::Store> = std::sync::Arc::new(
        tollgate::store::PostgresStore::new(pool(&proxy.options(&conn)).await),
    );
    let mut t = spawn_on_store(store, Options::new(profile("default"))).await;
    t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    create_tenant_with_limits(
        &mut t,
        "acme",
        "enterprise",
        vec![quota("key", "minute", 3), quota("tenant", "day", 100)],
    )
    .await;
    let (key, _) = t.create_key("acme").await;
    // Identity only: the key is cached, no quota is leased yet.
    assert!(t.authenticate(&key).await.allowed);

    proxy.cut();
    for _ in 0..3 {
        // The rate limit is taken in memory, then the quota lease fails.
        let err = t
            .authenticate_with(pb::AuthenticateRequest {
                api_key: key.clone(),
                cost: Some(1),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }
    proxy.restore();
    for i in 0..3 {
        let r = spend(&mut t, &key, 1).await;
        assert!(r.allowed, "request {i} after the outage: {r:?}");
    }
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "RATE_LIMITED");
}

#[sqlx::test]
async fn moving_the_billing_day_carries_this_months_usage_instead_of_resetting_it(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "default").await;
    let mut b = spawn(&conn, "default").await;
    for t in [&a, &b] {
        t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    }
    let month = vec![quota("tenant", "month", 10), quota("key", "month", 10)];
    create_tenant_with_limits(&mut a, "acme", "enterprise", month.clone()).await;
    let (key, record) = a.create_key("acme").await;
    for _ in 0..6 {
        assert!(spend(&mut a, &key, 1).await.allowed);
    }
    a.running.shutdown().await.unwrap();

    let tenant = tollgate::domain::TenantId::parse("acme").unwrap();
    let mut events = b.invalidations();
    b.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            update_mask: vec!["overrides".into()],
            overrides: Some(pb::TenantOverrides {
                limits: month,
                billing_day: Some(20),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    wait_for(&mut events, |e| *e == Invalidation::Tenant(tenant.clone())).await;
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += usize::from(spend(&mut b, &key, 1).await.allowed);
    }
    assert_eq!(admitted, 4, "6 of 10 were already used this month");
    let usage = b
        .auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: record.key_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let month = usage
        .quotas
        .iter()
        .find(|q| q.name == "key_per_month")
        .unwrap();
    assert_eq!(month.used, 10);
    assert_eq!(
        month.period_start.as_ref().unwrap().seconds,
        at("2026-11-20T00:00:00Z").timestamp()
    );
}

#[sqlx::test]
async fn stepping_the_wall_clock_neither_refills_nor_freezes_a_rate_limit(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    let clock = t.running.clock().clone();
    clock.freeze_at(at("2026-11-23T10:00:00Z"));
    t.create_tenant("acme", "pro").await;
    let (key, _) = t.create_key("acme").await;
    for _ in 0..10 {
        assert!(spend(&mut t, &key, 1).await.allowed);
    }
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "RATE_LIMITED");

    // An hour forward on the wall: no time passed, nothing refilled.
    clock.freeze_at(at("2026-11-23T11:00:00Z"));
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "RATE_LIMITED");
    // A day back on the wall: 100 ms later one unit is back, as always.
    clock.freeze_at(at("2026-11-22T11:00:00Z"));
    clock.advance(std::time::Duration::from_millis(100));
    assert!(spend(&mut t, &key, 1).await.allowed);
    assert_eq!(reason(&spend(&mut t, &key, 1).await), "RATE_LIMITED");
}

async fn key_usage(t: &mut Tollgate, key_id: &str, name: &str) -> u64 {
    t.auth
        .get_usage(op(pb::GetUsageRequest {
            key_id: key_id.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .quotas
        .into_iter()
        .find(|q| q.name == name)
        .unwrap()
        .used
}

#[sqlx::test]
async fn a_request_costing_more_than_is_left_takes_nothing_and_strands_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "default").await;
    let mut b = spawn(&conn, "default").await;
    for t in [&a, &b] {
        t.running.clock().freeze_at(at("2026-11-23T10:00:00Z"));
    }
    create_tenant_with_limits(&mut a, "acme", "enterprise", vec![quota("key", "day", 100)]).await;
    let (key, record) = a.create_key("acme").await;

    assert_eq!(reason(&spend(&mut a, &key, 1000).await), "QUOTA_EXHAUSTED");
    assert_eq!(key_usage(&mut b, &record.key_id, "key_per_day").await, 0);
    assert!(
        spend(&mut b, &key, 50).await.allowed,
        "the refused request left the quota to others"
    );
    // The other 50 go to small requests on either replica, its own included.
    let mut admitted = 50;
    for i in 0..200 {
        let t = if i % 2 == 0 { &mut a } else { &mut b };
        admitted += u64::from(spend(t, &key, 1).await.allowed);
    }
    assert_eq!(admitted, 100);
    assert_eq!(key_usage(&mut b, &record.key_id, "key_per_day").await, 100);
}

#[sqlx::test]
async fn a_key_that_made_one_request_reads_one_unit_used_not_its_replicas_lease(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.create_tenant("shop", "default").await;
    let (key, record) = t.create_key("shop").await;
    assert!(spend(&mut t, &key, 1).await.allowed);
    assert_eq!(key_usage(&mut t, &record.key_id, "key_per_month").await, 1);
    let r = t
        .auth
        .check_quota(pb::CheckQuotaRequest {
            api_key: key.clone(),
            cost: 1,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let month = r.limits.iter().find(|l| l.name == "key_per_month").unwrap();
    assert_eq!(
        month.remaining,
        10_000 - 1 - 1,
        "what would remain after it"
    );
}

async fn dry_run_remaining(t: &mut Tollgate, key: &str, name: &str) -> u64 {
    let r = t
        .auth
        .check_quota(pb::CheckQuotaRequest {
            api_key: key.into(),
            cost: 1,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.limits.iter().find(|l| l.name == name).unwrap().remaining
}

#[sqlx::test]
async fn with_two_replicas_holding_leases_usage_and_remaining_count_what_was_admitted(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "default").await;
    let mut b = spawn(&conn, "default").await;
    create_tenant_with_limits(
        &mut a,
        "acme",
        "enterprise",
        vec![quota("key", "day", 1000)],
    )
    .await;
    let (key, record) = a.create_key("acme").await;
    for _ in 0..3 {
        assert!(spend(&mut a, &key, 1).await.allowed);
    }
    for _ in 0..5 {
        assert!(spend(&mut b, &key, 1).await.allowed);
    }
    // Each beat reports what was consumed (leases kept); a second beat
    // tells each replica what the other reported.
    for _ in 0..2 {
        a.running.report_leases(false).await.unwrap();
        b.running.report_leases(false).await.unwrap();
    }
    for t in [&mut a, &mut b] {
        assert_eq!(key_usage(t, &record.key_id, "key_per_day").await, 8);
        assert_eq!(
            dry_run_remaining(t, &key, "key_per_day").await,
            1000 - 8 - 1,
            "what would remain after one more"
        );
    }
    let r = spend(&mut b, &key, 1).await;
    let day = r.limits.iter().find(|l| l.name == "key_per_day").unwrap();
    assert_eq!(day.remaining, 1000 - 9, "the RateLimit headers' remaining");
    let db = pool_opts.connect_with(conn).await.unwrap();
    let leased: i64 = sqlx::query_scalar("SELECT used FROM quota_usage")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(
        leased > 9,
        "both replicas still hold unspent leases: {leased}"
    );
}
