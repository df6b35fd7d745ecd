//! Quota counters and the replicas' holdings of them: leases, reports,
//! reclaiming a dead replica's holdings, and the counters' reads.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{map_err, timed, PostgresStore};
use crate::store::{QuotaCounter, QuotaGrant, QuotaReport, QuotaTally, StoreError};

pub(super) async fn lease_quota(
    store: &PostgresStore,
    replica: Uuid,
    c: &QuotaCounter,
    chunk: u64,
    at_least: u64,
    limit: u64,
    consumed: i64,
) -> Result<QuotaGrant, StoreError> {
    let at_least = i64::try_from(at_least.max(1)).unwrap_or(i64::MAX);
    let chunk = i64::try_from(chunk).unwrap_or(i64::MAX).max(at_least);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // `last_grant` is computed from the old row in the same statement
    // that locks and updates it, so the grant is exact. Nothing is
    // granted unless `at_least` units fit. The grant is added to this
    // replica's holding in the same statement (less what it consumed
    // since its last report): the store never counts units as leased
    // without knowing who holds them.
    let (granted, used, others): (i64, i64, i64) = sqlx::query_as(
        "WITH g AS ( \
           INSERT INTO quota_usage AS q (subject, limit_name, period_start, used, last_grant) \
           SELECT $1, $2, $3, LEAST($4, $5), LEAST($4, $5) WHERE $6 <= $5 \
           ON CONFLICT (subject, limit_name, period_start) DO UPDATE \
           SET last_grant = LEAST($4, $5 - q.used), used = q.used + LEAST($4, $5 - q.used), \
               updated_at = now() \
           WHERE q.used + $6 <= $5 RETURNING last_grant, used), \
         held AS ( \
           INSERT INTO quota_leases AS l (subject, limit_name, period_start, replica_id, units) \
           SELECT $1, $2, $3, $7, GREATEST(n.granted - $8, 0) \
           FROM (SELECT COALESCE((SELECT last_grant FROM g), 0) AS granted) n \
           WHERE n.granted > 0 OR $8 <> 0 \
           ON CONFLICT (subject, limit_name, period_start, replica_id) DO UPDATE \
           SET units = GREATEST(l.units + COALESCE((SELECT last_grant FROM g), 0) - $8, 0), \
               updated_at = now()) \
         SELECT COALESCE(g.last_grant, 0), \
           COALESCE(g.used, (SELECT used FROM quota_usage \
             WHERE subject = $1 AND limit_name = $2 AND period_start = $3), 0), \
           COALESCE((SELECT sum(units) FROM quota_leases \
             WHERE subject = $1 AND limit_name = $2 AND period_start = $3 \
               AND replica_id <> $7), 0)::bigint \
         FROM (SELECT 1) AS one LEFT JOIN g ON true",
    )
    .bind(&c.subject)
    .bind(c.name)
    .bind(c.period_start)
    .bind(chunk)
    .bind(limit)
    .bind(at_least)
    .bind(replica)
    .bind(consumed)
    .fetch_one(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(QuotaGrant {
        granted: granted.max(0) as u64,
        used: used.max(0) as u64,
        others: others.max(0) as u64,
    })
}

pub(super) async fn report_quota(
    store: &PostgresStore,
    replica: Uuid,
    reports: &[QuotaReport],
) -> Result<Vec<QuotaTally>, StoreError> {
    if reports.is_empty() {
        return Ok(Vec::new());
    }
    let subjects: Vec<&str> = reports.iter().map(|r| r.counter.subject.as_str()).collect();
    let names: Vec<&str> = reports.iter().map(|r| r.counter.name).collect();
    let starts: Vec<DateTime<Utc>> = reports.iter().map(|r| r.counter.period_start).collect();
    let consumed: Vec<i64> = reports.iter().map(|r| r.consumed).collect();
    let returned: Vec<i64> = reports
        .iter()
        .map(|r| i64::try_from(r.returned).unwrap_or(i64::MAX))
        .collect();
    // One statement: holdings drop by what was consumed and returned
    // (a holding already reclaimed stays gone); returned units leave
    // the totals; each counter's tally comes back in input order.
    let rows: Vec<(i64, i64)> = timed(
        "report_quota",
        sqlx::query_as(
            "WITH r AS ( \
               SELECT * FROM unnest($2::text[], $3::text[], $4::timestamptz[], \
                 $5::bigint[], $6::bigint[]) WITH ORDINALITY \
                 AS r(subject, limit_name, period_start, consumed, returned, ord)), \
             held AS ( \
               UPDATE quota_leases l \
               SET units = GREATEST(l.units - r.consumed - r.returned, 0), updated_at = now() \
               FROM r WHERE l.replica_id = $1 AND l.subject = r.subject \
                 AND l.limit_name = r.limit_name AND l.period_start = r.period_start \
                 AND (r.consumed <> 0 OR r.returned <> 0)), \
             freed AS ( \
               UPDATE quota_usage q SET used = GREATEST(q.used - r.returned, 0), \
                 updated_at = now() \
               FROM r WHERE r.returned > 0 AND q.subject = r.subject \
                 AND q.limit_name = r.limit_name AND q.period_start = r.period_start \
               RETURNING q.subject, q.limit_name, q.period_start, q.used) \
             SELECT COALESCE(f.used, q.used, 0), \
               COALESCE((SELECT sum(o.units) FROM quota_leases o \
                 WHERE o.subject = r.subject AND o.limit_name = r.limit_name \
                   AND o.period_start = r.period_start AND o.replica_id <> $1), 0)::bigint \
             FROM r \
             LEFT JOIN freed f ON f.subject = r.subject AND f.limit_name = r.limit_name \
               AND f.period_start = r.period_start \
             LEFT JOIN quota_usage q ON q.subject = r.subject AND q.limit_name = r.limit_name \
               AND q.period_start = r.period_start \
             ORDER BY r.ord",
        )
        .bind(replica)
        .bind(subjects)
        .bind(names)
        .bind(starts)
        .bind(consumed)
        .bind(returned)
        .fetch_all(&store.pool),
    )
    .await
    .map_err(map_err)?;
    Ok(rows
        .into_iter()
        .map(|(used, others)| QuotaTally {
            used: used.max(0) as u64,
            others: others.max(0) as u64,
        })
        .collect())
}

pub(super) async fn reclaim_quota_leases(
    store: &PostgresStore,
    replica: Uuid,
    stale_after_secs: u32,
) -> Result<u64, StoreError> {
    // The holders are few: a skip scan of the replica_id index lists
    // them without reading every holding. A holder is dead once no
    // heartbeat vouches for it (its row expired, or was pruned); a row
    // it wrote within the expiry is left for a later beat (a replica
    // may lease before its first heartbeat). The caller's own emptied
    // rows go too.
    let units: Option<i64> = timed(
        "reclaim_quota_leases",
        sqlx::query_scalar(
            "WITH RECURSIVE holders AS ( \
               (SELECT replica_id FROM quota_leases ORDER BY replica_id LIMIT 1) \
               UNION ALL \
               SELECT (SELECT l.replica_id FROM quota_leases l \
                 WHERE l.replica_id > h.replica_id ORDER BY l.replica_id LIMIT 1) \
               FROM holders h WHERE h.replica_id IS NOT NULL), \
             dead AS ( \
               SELECT h.replica_id FROM holders h \
               WHERE h.replica_id IS NOT NULL AND h.replica_id <> $2 \
                 AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.replica_id = h.replica_id \
                   AND r.heartbeat_at > now() - make_interval(secs => $1))), \
             gone AS ( \
               DELETE FROM quota_leases l USING dead d WHERE l.replica_id = d.replica_id \
                 AND l.updated_at < now() - make_interval(secs => $1) \
               RETURNING l.units), \
             emptied AS ( \
               DELETE FROM quota_leases WHERE replica_id = $2 AND units = 0) \
             SELECT sum(units)::bigint FROM gone",
        )
        .bind(f64::from(stale_after_secs))
        .bind(replica)
        .fetch_one(&store.pool),
    )
    .await
    .map_err(map_err)?;
    Ok(units.unwrap_or(0).max(0) as u64)
}

pub(super) async fn quota_used(store: &PostgresStore, c: &QuotaCounter) -> Result<u64, StoreError> {
    let used: Option<i64> = sqlx::query_scalar(
        "SELECT used FROM quota_usage \
         WHERE subject = $1 AND limit_name = $2 AND period_start = $3",
    )
    .bind(&c.subject)
    .bind(c.name)
    .bind(c.period_start)
    .fetch_optional(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(used.unwrap_or(0).max(0) as u64)
}

pub(super) async fn quota_consumed(
    store: &PostgresStore,
    c: &QuotaCounter,
) -> Result<u64, StoreError> {
    let consumed: Option<i64> = sqlx::query_scalar(
        "SELECT q.used - COALESCE((SELECT sum(l.units) FROM quota_leases l \
           WHERE l.subject = q.subject AND l.limit_name = q.limit_name \
             AND l.period_start = q.period_start), 0)::bigint \
         FROM quota_usage q \
         WHERE q.subject = $1 AND q.limit_name = $2 AND q.period_start = $3",
    )
    .bind(&c.subject)
    .bind(c.name)
    .bind(c.period_start)
    .fetch_optional(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(consumed.unwrap_or(0).max(0) as u64)
}
