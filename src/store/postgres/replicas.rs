//! Replica membership: the heartbeat (and live count) and leaving.

use uuid::Uuid;

use super::{map_err, PostgresStore};
use crate::store::StoreError;

pub(super) async fn heartbeat(
    store: &PostgresStore,
    replica: Uuid,
    stale_after_secs: u32,
) -> Result<u32, StoreError> {
    let live: i64 = sqlx::query_scalar(
        "WITH beat AS (INSERT INTO replicas (replica_id, heartbeat_at) VALUES ($1, now()) \
           ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = now() RETURNING 1), \
         gone AS (DELETE FROM replicas WHERE heartbeat_at < now() - interval '1 hour') \
         SELECT (SELECT count(*) FROM beat) + (SELECT count(*) FROM replicas \
           WHERE replica_id <> $1 AND heartbeat_at > now() - make_interval(secs => $2))",
    )
    .bind(replica)
    .bind(f64::from(stale_after_secs))
    .fetch_one(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(u32::try_from(live).unwrap_or(1).max(1))
}

pub(super) async fn leave(store: &PostgresStore, replica: Uuid) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM replicas WHERE replica_id = $1")
        .bind(replica)
        .execute(&store.pool)
        .await
        .map_err(map_err)?;
    Ok(())
}
