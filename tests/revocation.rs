//! Automatic revocation policies over real gRPC against real Postgres:
//! the dry run lists exactly what a sweep revokes, a tenant's override
//! wins over the profile, a key used recently is kept, and replicas
//! sweeping at once revoke, audit and publish each key once. Clocks are
//! frozen; sweeps are driven by the test (`Manager::sweep_revocations`).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::domain::revocation::RevocationPolicy;
use tollgate::grpc::pb;
use tollgate::grpc::pb::revocation_service_client::RevocationServiceClient;
use tollgate::store::Invalidation;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn t0() -> DateTime<Utc> {
    "2026-12-01T09:00:00Z".parse().unwrap()
}

/// A replica of the default profile whose policy is `policy`, clock frozen at T0.
async fn replica(conn: &PgConnectOptions, policy: RevocationPolicy) -> Tollgate {
    let mut p = profile("default");
    p.revocation = policy;
    let t = spawn_with(conn, Options::new(p)).await;
    t.running.clock().freeze_at(t0());
    t
}

fn unused_after(days: u32) -> RevocationPolicy {
    RevocationPolicy {
        unused_days: Some(days),
        ..Default::default()
    }
}

fn client(t: &Tollgate) -> RevocationServiceClient<tonic::transport::Channel> {
    RevocationServiceClient::new(t.channel.clone())
}

/// The dry run's key ids and policies for `tenant` (every page).
async fn dry_run(t: &Tollgate, tenant: &str) -> BTreeSet<(String, String)> {
    let mut c = client(t);
    let mut seen = BTreeSet::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_policy_revocations(op(pb::ListPolicyRevocationsRequest {
                tenant_id: tenant.into(),
                page_size: 2,
                page_token: token.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            r.keys
                .into_iter()
                .map(|k| (k.key.unwrap().key_id, k.policy)),
        );
        if r.next_page_token.is_empty() {
            return seen;
        }
        token = r.next_page_token;
    }
}

/// What a sweep of `t` revoked: (key id, policy).
async fn sweep(t: &Tollgate, batch: u32) -> BTreeSet<(String, String)> {
    let report = t.running.manager().sweep_revocations(batch).await;
    assert_eq!(report.failed_tenants, 0);
    report
        .revoked
        .iter()
        .map(|m| (m.key.id.to_string(), m.reason.as_str().to_string()))
        .collect()
}

/// Audit rows of policy revocations per key: key id → policies recorded.
async fn policy_audit(pool: &sqlx::PgPool) -> HashMap<String, Vec<String>> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT target, details->>'policy' FROM audit_events WHERE action = 'key.revoked' \
         ORDER BY event_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for (target, policy) in rows {
        by_key
            .entry(target)
            .or_default()
            .push(policy.unwrap_or_default());
    }
    by_key
}

#[sqlx::test]
async fn the_dry_run_lists_exactly_what_a_sweep_revokes_and_a_key_used_recently_is_kept(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let mut t = replica(&conn, unused_after(30)).await;
    t.create_tenant("shop", "enterprise").await;
    let (_, never_used) = t.create_key("shop").await;
    let (used_secret, used) = t.create_key("shop").await;
    let (stale_secret, stale) = t.create_key("shop").await;
    // Day 5: the stale key is used once; day 20: the other one.
    t.running.clock().advance(5 * DAY);
    assert!(t.authenticate(&stale_secret).await.allowed);
    t.running.clock().advance(15 * DAY);
    assert!(t.authenticate(&used_secret).await.allowed);
    t.running.flush_usage().await.unwrap();
    let (fresh_secret, _fresh) = t.create_key("shop").await;
    // Day 40: unused for 30 days means before day 10.
    t.running.clock().advance(20 * DAY);

    let listed = dry_run(&t, "shop").await;
    let expected: BTreeSet<(String, String)> = [&never_used, &stale]
        .iter()
        .map(|k| (k.key_id.clone(), "unused".to_string()))
        .collect();
    assert_eq!(
        listed, expected,
        "the dry run lists the keys unused for 30 days"
    );
    assert!(
        policy_audit(&pool).await.is_empty(),
        "the dry run changes nothing"
    );
    assert!(t.authenticate(&stale_secret).await.allowed);

    let revoked = sweep(&t, 500).await;
    assert_eq!(revoked, listed, "the sweep revokes exactly what was listed");
    assert_eq!(reason(&t.authenticate(&stale_secret).await), "KEY_REVOKED");
    assert!(
        t.authenticate(&used_secret).await.allowed,
        "used on day 20: kept"
    );
    assert!(
        t.authenticate(&fresh_secret).await.allowed,
        "created on day 20: kept"
    );
    let audit = policy_audit(&pool).await;
    for k in [&never_used, &stale] {
        assert_eq!(audit[&k.key_id], vec!["unused"], "audited with its policy");
    }
    assert_eq!(audit.len(), 2);
    let got = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: stale.key_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(got.revoke_reason, "policy:unused");
    assert_eq!(used.revoke_reason, "");

    // Idempotent: nothing left to revoke, nothing listed.
    assert!(sweep(&t, 500).await.is_empty());
    assert!(dry_run(&t, "shop").await.is_empty());
    assert_eq!(policy_audit(&pool).await.len(), 2);
}

#[sqlx::test]
async fn a_tenant_override_wins_over_the_profile_policy(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut t = replica(&conn, unused_after(30)).await;
    let mut c = client(&t);
    for tenant in ["plain", "strict", "lenient", "aged"] {
        t.create_tenant(tenant, "enterprise").await;
    }
    let set = |tenant: &str, policy: pb::RevocationPolicy| {
        op(pb::SetRevocationPolicyRequest {
            tenant_id: tenant.into(),
            policy: Some(policy),
        })
    };
    let strict = c
        .set_revocation_policy(set(
            "strict",
            pb::RevocationPolicy {
                unused_days: Some(5),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strict.effective.unwrap().unused_days, Some(5));
    c.set_revocation_policy(set(
        "lenient",
        pb::RevocationPolicy {
            unused_days: Some(0),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    c.set_revocation_policy(set(
        "aged",
        pb::RevocationPolicy {
            max_age_days: Some(7),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let mut keys = HashMap::new();
    for tenant in ["plain", "strict", "lenient", "aged"] {
        keys.insert(tenant, t.create_key(tenant).await);
    }
    // Day 9: the aged tenant's key is used (so it is not unused); day 10: sweep.
    t.running.clock().advance(9 * DAY);
    assert!(t.authenticate(&keys["aged"].0).await.allowed);
    t.running.flush_usage().await.unwrap();
    t.running.clock().advance(DAY);

    let mut listed = BTreeSet::new();
    for tenant in ["plain", "strict", "lenient", "aged"] {
        listed.extend(dry_run(&t, tenant).await);
    }
    let expected: BTreeSet<(String, String)> = [
        (keys["strict"].1.key_id.clone(), "unused".to_string()),
        (keys["aged"].1.key_id.clone(), "max_age".to_string()),
    ]
    .into();
    assert_eq!(listed, expected);
    assert_eq!(sweep(&t, 500).await, expected);
    assert!(
        t.authenticate(&keys["plain"].0).await.allowed,
        "profile: 30 days"
    );
    assert!(
        t.authenticate(&keys["lenient"].0).await.allowed,
        "override: off"
    );
    assert_eq!(
        reason(&t.authenticate(&keys["strict"].0).await),
        "KEY_REVOKED"
    );
    assert_eq!(
        reason(&t.authenticate(&keys["aged"].0).await),
        "KEY_REVOKED"
    );

    // Clearing the override brings the profile's policy back.
    let cleared = c
        .set_revocation_policy(op(pb::SetRevocationPolicyRequest {
            tenant_id: "lenient".into(),
            policy: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.tenant_override.is_none());
    assert_eq!(cleared.effective.unwrap().unused_days, Some(30));
}

#[sqlx::test]
async fn two_replicas_sweeping_at_once_revoke_audit_and_publish_each_key_once(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let mut a = replica(&conn, unused_after(30)).await;
    let mut b = replica(&conn, unused_after(30)).await;
    let mut secrets = Vec::new();
    let mut ids = BTreeSet::new();
    for tenant in ["t1", "t2", "t3"] {
        a.create_tenant(tenant, "enterprise").await;
        for _ in 0..15 {
            let (secret, key) = a.create_key(tenant).await;
            ids.insert(key.key_id);
            secrets.push(secret);
        }
    }
    // Both replicas hold every key in cache before the sweep.
    for s in &secrets {
        assert!(a.authenticate(s).await.allowed);
        assert!(b.authenticate(s).await.allowed);
    }
    a.running.flush_usage().await.unwrap();
    b.running.flush_usage().await.unwrap();
    for r in [&a, &b] {
        r.running.clock().advance(31 * DAY);
    }
    let mut seen_a = a.invalidations();
    let mut seen_b = b.invalidations();

    let (by_a, by_b) = tokio::join!(sweep(&a, 4), sweep(&b, 4));
    let ids_a: BTreeSet<String> = by_a.iter().map(|(k, _)| k.clone()).collect();
    let ids_b: BTreeSet<String> = by_b.iter().map(|(k, _)| k.clone()).collect();
    assert!(ids_a.is_disjoint(&ids_b), "no key revoked by both");
    let all: BTreeSet<String> = ids_a.union(&ids_b).cloned().collect();
    assert_eq!(all, ids, "every key revoked");
    let audit = policy_audit(&pool).await;
    assert_eq!(audit.len(), ids.len());
    for id in &ids {
        assert_eq!(audit[id], vec!["unused"], "audited once: {id}");
    }

    // Every replica drops every key: its own at once, the other's from the feed.
    for (seen, name) in [(&mut seen_a, "A"), (&mut seen_b, "B")] {
        let mut pending = ids.clone();
        tokio::time::timeout(Duration::from_secs(30), async {
            while !pending.is_empty() {
                match seen.recv().await {
                    Ok(Invalidation::Key(id)) => {
                        pending.remove(&id.to_string());
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{name}: invalidation feed: {e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} never heard of every revocation"));
    }
    for s in &secrets {
        assert_eq!(reason(&a.authenticate(s).await), "KEY_REVOKED");
        assert_eq!(reason(&b.authenticate(s).await), "KEY_REVOKED");
    }
}
