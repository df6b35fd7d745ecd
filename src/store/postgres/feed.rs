//! The change feed: every decision-changing write records a row in
//! `changes` (a sequence number) and sends `NOTIFY` as the wake-up, in its
//! own transaction. Each replica LISTENs, remembers the last sequence it
//! applied, and after a reconnect applies the changes after it, paged,
//! instead of flushing its cache. Only when that history is gone (pruned
//! past the replica's sequence) does it send `Flush`.

use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::map_err;
use crate::crypto::KeyDigest;
use crate::domain::TenantId;
use crate::store::{Invalidation, StoreError};

/// The NOTIFY channel every replica listens on.
pub const CHANNEL: &str = "tollgate_invalidation";

/// Changes read per catch-up query.
const CATCH_UP_PAGE: i64 = 1_000;
/// A transaction that took a lower sequence number may commit after the
/// last change a replica saw: catch-up re-applies changes recorded this
/// long before it (re-applying an eviction is harmless).
const CATCH_UP_OVERLAP_SECS: f64 = 60.0;
/// Old changes are pruned as the feed connects and every this many probes.
const PRUNE_EVERY_PROBES: u64 = 720;
/// Reconnect backoff: doubles from the first to the most, each wait drawn
/// at random from its upper half so replicas do not reconnect in step.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How the feed keeps its history and watches its connection.
#[derive(Debug, Clone, Copy)]
pub struct FeedSettings {
    /// Changes older than this are pruned (the newest is always kept).
    pub retention: Duration,
    /// How often the LISTEN connection is probed (a hung or silently
    /// partitioned server sends no error, only silence).
    pub probe_every: Duration,
    /// Longest a probe of the LISTEN connection may take before the feed
    /// counts as lost.
    pub probe_timeout: Duration,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(86_400),
            probe_every: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(5),
        }
    }
}

/// The NOTIFY payload of `what` (sent after its change row is `seq`);
/// `None` for feed events never sent.
fn payload(what: &Invalidation) -> Option<String> {
    // The send time rides along so receivers can measure revocation lag.
    let sent_ms = Utc::now().timestamp_millis();
    Some(match what {
        Invalidation::Key(id) => format!("k:{id}@{sent_ms}"),
        Invalidation::Tenant(id) => format!("t:{id}@{sent_ms}"),
        Invalidation::KeyAdded(digest) => format!("n:{}@{sent_ms}", hex::encode(digest.as_bytes())),
        _ => return None,
    })
}

/// The `changes` columns of `what`: (kind, key_id, digest, tenant_id).
type ChangeColumns<'a> = (
    &'static str,
    Option<Uuid>,
    Option<&'a [u8]>,
    Option<&'a str>,
);

fn columns(what: &Invalidation) -> Option<ChangeColumns<'_>> {
    Some(match what {
        Invalidation::Key(id) => ("key", Some(*id), None, None),
        Invalidation::KeyAdded(d) => ("key_added", None, Some(&d.as_bytes()[..]), None),
        Invalidation::Tenant(t) => ("tenant", None, None, Some(t.as_str())),
        _ => return None,
    })
}

/// Records `what` in the change history and wakes every replica, inside
/// the caller's transaction (so both happen on commit, or neither).
pub(super) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    what: &Invalidation,
) -> Result<(), StoreError> {
    let (Some(payload), Some((kind, key_id, digest, tenant))) = (payload(what), columns(what))
    else {
        return Ok(());
    };
    sqlx::query(
        "WITH c AS (INSERT INTO changes (kind, key_id, digest, tenant_id) \
         VALUES ($1, $2, $3, $4) RETURNING seq) \
         SELECT pg_notify($5, $6 || '#' || c.seq) FROM c",
    )
    .bind(kind)
    .bind(key_id)
    .bind(digest)
    .bind(tenant)
    .bind(CHANNEL)
    .bind(payload)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// One statement replacing an old-pepper digest by `new`, recording and
/// announcing the new digest only if the row matched (the request path's
/// rehash).
pub(super) async fn rehash(
    pool: &PgPool,
    id: Uuid,
    old: &KeyDigest,
    new: &KeyDigest,
    pepper_version: i32,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH u AS (UPDATE api_keys SET digest = $3, pepper_version = $4 \
         WHERE key_id = $1 AND digest = $2 RETURNING 1), \
         c AS (INSERT INTO changes (kind, digest) SELECT 'key_added', $3 FROM u RETURNING seq) \
         SELECT pg_notify($5, $6 || '#' || c.seq) FROM c",
    )
    .bind(id)
    .bind(&old.as_bytes()[..])
    .bind(&new.as_bytes()[..])
    .bind(pepper_version)
    .bind(CHANNEL)
    .bind(payload(&Invalidation::KeyAdded(*new)))
    .execute(pool)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Deletes changes older than `retention`, keeping the newest.
pub(super) async fn prune(pool: &PgPool, retention: Duration) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM changes WHERE at < clock_timestamp() - make_interval(secs => $1) \
         AND seq < (SELECT max(seq) FROM changes)",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await
    .map_err(map_err)?;
    Ok(done.rows_affected())
}

/// A notification: the change and its sequence number.
pub(super) fn parse_payload(payload: &str) -> Option<(Option<i64>, Invalidation)> {
    let (rest, seq) = match payload.rsplit_once('#') {
        Some((rest, seq)) => (rest, seq.parse::<i64>().ok()),
        None => (payload, None),
    };
    let (body, sent_ms) = match rest.rsplit_once('@') {
        Some((body, ms)) => (body, ms.parse::<i64>().ok()),
        None => (rest, None),
    };
    if let Some(ms) = sent_ms {
        let lag = (Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0;
        metrics::histogram!(crate::telemetry::REVOCATION_LAG_SECONDS).record(lag);
    }
    let event = match body.split_once(':')? {
        ("k", id) => Uuid::parse_str(id).ok().map(Invalidation::Key),
        ("t", id) => TenantId::parse(id).map(Invalidation::Tenant),
        ("n", digest) => hex::decode(digest)
            .ok()
            .and_then(|b| KeyDigest::from_slice(&b))
            .map(Invalidation::KeyAdded),
        _ => None,
    }?;
    Some((seq, event))
}

#[derive(sqlx::FromRow)]
struct ChangeRow {
    seq: i64,
    kind: String,
    key_id: Option<Uuid>,
    digest: Option<Vec<u8>>,
    tenant_id: Option<String>,
}

impl ChangeRow {
    fn event(&self) -> Option<Invalidation> {
        match self.kind.as_str() {
            "key" => self.key_id.map(Invalidation::Key),
            "key_added" => self
                .digest
                .as_deref()
                .and_then(KeyDigest::from_slice)
                .map(Invalidation::KeyAdded),
            "tenant" => self
                .tenant_id
                .as_deref()
                .and_then(TenantId::parse)
                .map(Invalidation::Tenant),
            _ => None,
        }
    }
}

/// Where a reconnecting replica stands.
enum CatchUp {
    /// Every change after the last one seen was applied; the newest seen.
    Applied { newest: i64, changes: u64 },
    /// The history after the last one seen is gone: flush.
    Gone { newest: i64 },
}

/// The newest recorded sequence (0 when none).
async fn newest(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM changes")
        .fetch_one(pool)
        .await
}

/// Applies, page by page, the changes after `last` (with the overlap).
async fn catch_up(
    pool: &PgPool,
    last: i64,
    tx: &mpsc::Sender<Invalidation>,
) -> Result<Option<CatchUp>, sqlx::Error> {
    let (oldest, from): (Option<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT min(seq) FROM changes), \
         COALESCE((SELECT min(seq) FROM changes WHERE at >= \
           (SELECT at FROM changes WHERE seq = $1) - make_interval(secs => $2)), $1 + 1) - 1",
    )
    .bind(last)
    .bind(CATCH_UP_OVERLAP_SECS)
    .fetch_one(pool)
    .await?;
    let gone = match oldest {
        // Nothing recorded at all: nothing was missed.
        None => false,
        // The row of the last change seen is still there, or (nothing was
        // recorded when this replica first connected) the first one is.
        Some(oldest) if last > 0 => oldest > last,
        Some(oldest) => oldest > 1,
    };
    if gone {
        return Ok(Some(CatchUp::Gone {
            newest: newest(pool).await?,
        }));
    }
    let mut after = from.min(last);
    let mut changes = 0;
    let mut newest_seen = last;
    loop {
        let page: Vec<ChangeRow> = sqlx::query_as(
            "SELECT seq, kind, key_id, digest, tenant_id FROM changes \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(CATCH_UP_PAGE)
        .fetch_all(pool)
        .await?;
        let full = page.len() as i64 == CATCH_UP_PAGE;
        for row in &page {
            after = row.seq;
            newest_seen = newest_seen.max(row.seq);
            if let Some(event) = row.event() {
                changes += 1;
                if tx.send(event).await.is_err() {
                    return Ok(None);
                }
            }
        }
        if !full {
            return Ok(Some(CatchUp::Applied {
                newest: newest_seen,
                changes,
            }));
        }
    }
}

/// A random wait in the upper half of `backoff`.
fn jittered(backoff: Duration) -> Duration {
    let ms = backoff.as_millis().max(2) as u64;
    Duration::from_millis(rand::random_range(ms / 2..=ms))
}

/// Keeps a LISTEN connection up and delivers changes to `tx`: `Ready` once
/// live (after catching up on a reconnect, or `Flush` first when the
/// history is gone), every change as it commits, `Lost` when the connection
/// fails or stops answering. Ends when the receiver is dropped.
pub(super) async fn listen(pool: PgPool, tx: mpsc::Sender<Invalidation>, settings: FeedSettings) {
    // The newest sequence applied; `None` before the first connect.
    let mut last: Option<i64> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Whatever committed before this instant is read by the catch-up
        // below (or was already applied).
        let began = tokio::time::Instant::now();
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let listener = tokio::select! {
            r = connected => r,
            () = tx.closed() => return,
        };
        let caught_up = match listener {
            Err(e) => Err(e),
            // LISTEN first, then read the history: a change committed in
            // between is both read and notified (applied twice, harmlessly).
            Ok(l) => match last {
                None => newest(&pool).await.map(|n| {
                    (
                        l,
                        Some(CatchUp::Applied {
                            newest: n,
                            changes: 0,
                        }),
                    )
                }),
                Some(seq) => catch_up(&pool, seq, &tx).await.map(|c| (l, c)),
            },
        };
        let mut listener = match caught_up {
            Ok((_, None)) => return,
            Ok((l, Some(CatchUp::Applied { newest, changes }))) => {
                if last.is_some() {
                    tracing::info!(
                        changes,
                        since_seq = last,
                        "invalidation feed reconnected; caught up"
                    );
                }
                last = Some(newest);
                l
            }
            Ok((l, Some(CatchUp::Gone { newest }))) => {
                tracing::warn!(
                    since_seq = last,
                    "change history pruned past this replica's last change; flushing the cache"
                );
                if tx.send(Invalidation::Flush).await.is_err() {
                    return;
                }
                last = Some(newest);
                l
            }
            Err(e) => {
                let wait = jittered(backoff);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "invalidation listener cannot connect");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        if tx.send(Invalidation::Current(began)).await.is_err()
            || tx.send(Invalidation::Ready).await.is_err()
        {
            return;
        }
        match prune(&pool, settings.retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "old changes pruned"),
            Err(e) => tracing::warn!(error = %e, "could not prune old changes"),
        }
        let mut probe = tokio::time::interval(settings.probe_every.max(Duration::from_millis(10)));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.reset();
        let mut probes = 0u64;
        // A probe that found changes not yet applied: when it was sent and
        // the newest sequence it saw. Confirmed once that one arrives.
        let mut pending: Option<(tokio::time::Instant, i64)> = None;
        loop {
            let next = tokio::select! {
                n = listener.try_recv() => n,
                () = tx.closed() => return,
                _ = probe.tick() => {
                    // The probe reads the newest committed change: once this
                    // replica has applied it, it was current when the probe
                    // was sent.
                    let sent = tokio::time::Instant::now();
                    let answered = tokio::time::timeout(
                        settings.probe_timeout,
                        sqlx::query_scalar::<_, i64>("SELECT COALESCE(max(seq), 0) FROM changes")
                            .fetch_one(&mut listener),
                    )
                    .await;
                    match answered {
                        Ok(Ok(newest)) => {
                            if last.unwrap_or(0) >= newest {
                                pending = None;
                                if tx.send(Invalidation::Current(sent)).await.is_err() {
                                    return;
                                }
                            } else if pending.is_none() {
                                pending = Some((sent, newest));
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "invalidation listener probe failed");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!("invalidation listener probe timed out");
                            break;
                        }
                    }
                    probes += 1;
                    // Prune now and then (every replica does; it is cheap).
                    if probes.is_multiple_of(PRUNE_EVERY_PROBES) {
                        if let Err(e) = prune(&pool, settings.retention).await {
                            tracing::warn!(error = %e, "could not prune old changes");
                        }
                    }
                    continue;
                }
            };
            let (seq, event) = match next {
                Ok(Some(n)) => match parse_payload(n.payload()) {
                    Some(parsed) => parsed,
                    None => {
                        tracing::warn!("ignoring an unrecognised invalidation payload");
                        continue;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "invalidation listener failed");
                    break;
                }
            };
            // Notifications come in commit order, sequences need not:
            // apply every one, remember the highest.
            if let Some(seq) = seq {
                last = Some(last.map_or(seq, |l| l.max(seq)));
            }
            if tx.send(event).await.is_err() {
                return;
            }
            if let Some((sent, newest)) = pending {
                if last.unwrap_or(0) >= newest {
                    pending = None;
                    if tx.send(Invalidation::Current(sent)).await.is_err() {
                        return;
                    }
                }
            }
        }
        tracing::warn!("invalidation listener lost its connection; reconnecting");
        if tx.send(Invalidation::Lost).await.is_err() {
            return;
        }
        // Every replica lost the database at once: do not all come back
        // at once either.
        tokio::select! {
            () = tokio::time::sleep(jittered(backoff)) => {}
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse_payload(&format!("k:{id}")),
            Some((None, Invalidation::Key(id)))
        );
        assert_eq!(
            parse_payload(&format!("k:{id}@1700000000000#42")),
            Some((Some(42), Invalidation::Key(id)))
        );
        assert_eq!(
            parse_payload("t:acme"),
            Some((None, Invalidation::Tenant(TenantId::parse("acme").unwrap())))
        );
        let digest = KeyDigest::from_slice(&[7; 32]).unwrap();
        assert_eq!(
            parse_payload(&format!("n:{}@1700000000000#7", hex::encode([7u8; 32]))),
            Some((Some(7), Invalidation::KeyAdded(digest)))
        );
        assert_eq!(parse_payload("n:abcd"), None);
        assert_eq!(parse_payload("x:1"), None);
        assert_eq!(parse_payload("k:nope"), None);
    }

    #[test]
    fn reconnect_waits_are_jittered_within_the_backoff() {
        for _ in 0..100 {
            let w = jittered(Duration::from_millis(400));
            assert!(w >= Duration::from_millis(200) && w <= Duration::from_millis(400));
        }
    }
}
