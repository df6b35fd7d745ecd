//! Per-key request counts (`key_requests_daily`, `key_requests_hourly`):
//! a flush's batch added in one transaction, one statement per table, and
//! rows past their retention pruned in the same transaction.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{begin, map_err, PostgresStore};
use crate::domain::usage::{
    day_of, oldest_day_kept, oldest_hour_kept, KeyCounts, RequestSeries, RequestTotal,
};
use crate::domain::KeyId;
use crate::store::StoreError;

pub(super) async fn add(
    store: &PostgresStore,
    hour: DateTime<Utc>,
    counts: &[KeyCounts],
) -> Result<(), StoreError> {
    if counts.is_empty() {
        return Ok(());
    }
    let keys: Vec<Uuid> = counts.iter().map(|c| c.key).collect();
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let allowed: Vec<i64> = counts.iter().map(|c| clamp(c.allowed)).collect();
    let denied: Vec<i64> = counts.iter().map(|c| clamp(c.denied)).collect();
    let mut tx = begin(store.pool()).await?;
    for (table, column, at) in [
        ("key_requests_hourly", "hour", hour),
        ("key_requests_daily", "day", day_of(hour)),
    ] {
        let sql = format!(
            "INSERT INTO {table} (key_id, {column}, allowed, denied) \
             SELECT k, $2, a, d FROM UNNEST($1::uuid[], $3::bigint[], $4::bigint[]) AS t(k, a, d) \
             ON CONFLICT (key_id, {column}) DO UPDATE SET \
             allowed = {table}.allowed + EXCLUDED.allowed, \
             denied = {table}.denied + EXCLUDED.denied"
        );
        sqlx::query(&sql)
            .bind(&keys)
            .bind(at)
            .bind(&allowed)
            .bind(&denied)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    // Retention: every flush prunes what has aged out (an index range scan
    // that finds nothing most of the time; safe when replicas race).
    for (sql, from) in [
        (
            "DELETE FROM key_requests_hourly WHERE hour < $1",
            oldest_hour_kept(hour),
        ),
        (
            "DELETE FROM key_requests_daily WHERE day < $1",
            oldest_day_kept(hour),
        ),
    ] {
        sqlx::query(sql)
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    tx.commit().await.map_err(map_err)
}

pub(super) async fn series(
    store: &PostgresStore,
    key: KeyId,
    days_from: DateTime<Utc>,
    hours_from: DateTime<Utc>,
) -> Result<RequestSeries, StoreError> {
    let read = |table: &'static str, column: &'static str, from: DateTime<Utc>| async move {
        let sql = format!(
            "SELECT {column}, allowed, denied FROM {table} WHERE key_id = $1 AND {column} >= $2 \
             ORDER BY {column}"
        );
        let rows: Vec<(DateTime<Utc>, i64, i64)> = sqlx::query_as(&sql)
            .bind(key)
            .bind(from)
            .fetch_all(store.pool())
            .await
            .map_err(map_err)?;
        Ok::<_, StoreError>(
            rows.into_iter()
                .map(|(start, a, d)| RequestTotal {
                    start,
                    allowed: a.max(0) as u64,
                    denied: d.max(0) as u64,
                })
                .collect(),
        )
    };
    Ok(RequestSeries {
        daily: read("key_requests_daily", "day", days_from).await?,
        hourly: read("key_requests_hourly", "hour", hours_from).await?,
    })
}
