//! Connections the batched key read keeps between batches.
//!
//! A pooled connection costs two extra round trips per statement: sqlx
//! pings it as it leaves the pool (`test_before_acquire`) and again as it
//! returns. Under a stream of cache misses that was 5% of the server's CPU
//! and a round trip of latency per batch, on both sides of the link. The
//! miss path therefore keeps its connection between batches while they
//! keep coming, and hands it back to the pool (which pings it before
//! anyone reuses it) once it has been idle for [`IDLE_LIMIT`] or held for
//! [`HOLD_LIMIT`], so the pool's own rules (lifetime, health) still apply.
//!
//! A kept connection the server closed meanwhile (a restart, an idle
//! timeout, `pg_terminate_backend`) fails its next statement; that read is
//! retried once on a connection fresh from the pool, so a restart costs a
//! reconnect, not an error. Only reads come through here: a retried read
//! changes nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Postgres;
use std::future::Future;
use std::pin::Pin;

/// A kept connection idle this long goes back to the pool.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(1);
/// A connection is kept at most this long in all, then goes back.
pub(super) const HOLD_LIMIT: Duration = Duration::from_secs(60);
/// At most this many kept at once (one per batch in flight).
const MAX_KEPT: usize = 4;

/// One read's statement on the connection it is given.
pub(super) type ReadFuture<'c, T> =
    Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// The kept connections of one store (shared by its clones).
#[derive(Default)]
pub(super) struct Held {
    kept: Mutex<Vec<Kept>>,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    since: Instant,
    used: Instant,
}

impl Kept {
    fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.used) < IDLE_LIMIT && now.duration_since(self.since) < HOLD_LIMIT
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("kept", &self.kept.lock().map(|k| k.len()).unwrap_or(0))
            .finish()
    }
}

impl Held {
    /// Runs the read `f` on a kept connection (or one from `pool`), and
    /// keeps that connection for the next read if `f` succeeded.
    pub(super) async fn read<T, F>(&self, pool: &PgPool, mut f: F) -> Result<T, sqlx::Error>
    where
        F: for<'c> FnMut(&'c mut PgConnection) -> ReadFuture<'c, T>,
    {
        if let Some(mut kept) = self.take() {
            match f(&mut kept.conn).await {
                Ok(out) => {
                    self.keep(kept);
                    return Ok(out);
                }
                Err(e) if is_dead(&e) => {
                    metrics::counter!(crate::telemetry::DB_CONNECTIONS_LOST).increment(1);
                    tracing::info!(error = %e, "a kept database connection was closed; reading again on a new one");
                    kept.conn.close_on_drop();
                }
                // Anything else is the statement's own error, not the link's.
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        let mut kept = Kept {
            conn: pool.acquire().await?,
            since: now,
            used: now,
        };
        let out = f(&mut kept.conn).await?;
        self.keep(kept);
        Ok(out)
    }

    /// How many connections are kept now.
    pub(super) fn len(&self) -> usize {
        self.kept.lock().map(|k| k.len()).unwrap_or(0)
    }

    /// The most recently used kept connection that is still fresh; stale
    /// ones go back to the pool as they are found.
    fn take(&self) -> Option<Kept> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut kept = self.kept.lock().ok()?;
            loop {
                match kept.pop() {
                    Some(k) if k.fresh(now) => break Some(k),
                    Some(k) => stale.push(k),
                    None => break None,
                }
            }
        };
        // Dropped outside the lock: each drop hands its connection back.
        drop(stale);
        found
    }

    fn keep(&self, mut k: Kept) {
        k.used = Instant::now();
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() < MAX_KEPT {
                kept.push(k);
                return;
            }
        }
        drop(k);
    }
}

/// The server closed this connection (restart, termination, idle
/// timeout): the statement never ran, and another connection may work.
fn is_dead(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        // admin_shutdown, crash_shutdown, cannot_connect_now;
        // connection_does_not_exist, connection_failure
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("57P01" | "57P02" | "57P03" | "08003" | "08006")
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_link_counts_as_dead() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_dead(&io));
        assert!(!is_dead(&sqlx::Error::RowNotFound));
        assert!(!is_dead(&sqlx::Error::PoolTimedOut));
        assert!(!is_dead(&sqlx::Error::Protocol(
            "unexpected message".into()
        )));
    }
}
