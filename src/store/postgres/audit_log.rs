//! The audit log's writer: one row per change, inside the change's own
//! transaction. Used by the key and tenant store (`postgres.rs`) and the
//! console store (`console_pg.rs`).

use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use super::map_err;
use crate::domain::console::AuditEvent;
use crate::store::StoreError;

/// Writes an audit event inside the change's transaction.
pub(in crate::store) async fn insert_audit(
    tx: &mut Transaction<'_, Postgres>,
    e: &AuditEvent,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (event_id, at, tenant_id, actor, action, target, request_id, \
         details) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
    )
    .bind(e.id)
    .bind(e.at)
    .bind(e.tenant_id.as_str())
    .bind(&e.actor)
    .bind(&e.action)
    .bind(&e.target)
    .bind(&e.request_id)
    .bind(Json(&e.details))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}
