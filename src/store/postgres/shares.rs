//! Rate shares: each live replica's published demand and claim per rate
//! cell, read together with the live replicas and exchanged in turns.

use uuid::Uuid;

use super::{begin, map_err, timed, PostgresStore};
use crate::store::{ShareRow, ShareView, StoreError};

/// A live replica, and one of its published shares if it has any.
type SharesRow = (Uuid, Option<String>, Option<f64>, Option<f64>);

/// The live replicas and their published rate shares (one statement).
async fn read_shares<'e>(
    db: impl sqlx::PgExecutor<'e>,
    stale_after_secs: u32,
) -> Result<ShareView, sqlx::Error> {
    let rows: Vec<SharesRow> = sqlx::query_as(
        "SELECT r.replica_id, s.cell, s.demand, s.claim \
         FROM replicas r LEFT JOIN rate_shares s ON s.replica_id = r.replica_id \
         WHERE r.heartbeat_at > now() - make_interval(secs => $1)",
    )
    .bind(f64::from(stale_after_secs))
    .fetch_all(db)
    .await?;
    let mut view = ShareView::default();
    for (replica, cell, demand, claim) in rows {
        if !view.live.contains(&replica) {
            view.live.push(replica);
        }
        if let (Some(cell), Some(demand), Some(claim)) = (cell, demand, claim) {
            view.rows.push(ShareRow {
                cell,
                replica,
                demand,
                claim,
            });
        }
    }
    Ok(view)
}

pub(super) async fn rate_shares(
    store: &PostgresStore,
    stale_after_secs: u32,
) -> Result<ShareView, StoreError> {
    timed("rate_shares", read_shares(&store.pool, stale_after_secs))
        .await
        .map_err(map_err)
}

pub(super) async fn exchange_rate_shares(
    store: &PostgresStore,
    replica: Uuid,
    stale_after_secs: u32,
    decide: &mut (dyn for<'v> FnMut(&'v ShareView) -> Vec<ShareRow> + Send),
) -> Result<bool, StoreError> {
    let mut tx = begin(&store.pool).await?;
    // Exchanges take turns (the lock conflicts with itself, not with
    // plain reads): a claim decided below is never raced by another
    // replica's decided from the same, older rows.
    sqlx::query("LOCK TABLE rate_shares IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    let view = read_shares(&mut *tx, stale_after_secs)
        .await
        .map_err(map_err)?;
    let rows = decide(&view);
    if !view.live.contains(&replica) {
        // Others do not count a replica they think gone: publishing
        // would claim what nobody accounts for.
        return Ok(false);
    }
    let (mut cells, mut demands, mut claims) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        cells.push(r.cell);
        demands.push(r.demand.max(0.0));
        claims.push(r.claim.clamp(0.0, 1.0));
    }
    timed(
        "exchange_rate_shares",
        sqlx::query(
            "WITH gone AS (DELETE FROM rate_shares \
               WHERE replica_id = $1 AND NOT (cell = ANY($2))) \
             INSERT INTO rate_shares (cell, replica_id, demand, claim, updated_at) \
             SELECT cell, $1, demand, claim, now() \
               FROM UNNEST($2::text[], $3::float8[], $4::float8[]) AS m(cell, demand, claim) \
             ON CONFLICT (cell, replica_id) DO UPDATE \
               SET demand = EXCLUDED.demand, claim = EXCLUDED.claim, updated_at = now()",
        )
        .bind(replica)
        .bind(&cells)
        .bind(&demands)
        .bind(&claims)
        .execute(&mut *tx),
    )
    .await
    .map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    Ok(true)
}
