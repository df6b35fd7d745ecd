//! Connections the batched key read keeps between batches.
//!
//! A pooled connection costs two extra round trips per statement: sqlx
//! pings it as it leaves the pool (`test_before_acquire`) and again as it
//! returns. Under a stream of cache misses that was 5% of the server's CPU
//! and a round trip of latency per batch, on both sides of the link. The
//! miss path therefore keeps its connection between batches while they
//! keep coming. A connection idle for the idle limit (1 s unless set) goes
//! back to the pool (which pings it before anyone reuses it) within one
//! more idle limit, found by the next read or by a sweep that runs while
//! any is kept; one held for [`HOLD_LIMIT`] goes back at its next read, so
//! the pool's own rules (lifetime, health) still apply.
//!
//! A kept connection the server closed meanwhile (a restart, an idle
//! timeout, `pg_terminate_backend`) fails its next statement; that read is
//! retried once on a connection fresh from the pool, so a restart costs a
//! reconnect, not an error. Only reads come through here: a retried read
//! changes nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgDatabaseError, PgPool, PgSeverity};
use sqlx::Postgres;

/// A kept connection idle this long goes back to the pool (default).
const IDLE_LIMIT: Duration = Duration::from_secs(1);
/// A connection is kept at most this long in all, then goes back.
const HOLD_LIMIT: Duration = Duration::from_secs(60);
/// At most this many kept at once (one per batch in flight).
const MAX_KEPT: usize = 4;

/// One read's statement on the connection it is given.
pub(super) type ReadFuture<'c, T> =
    Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// The kept connections of one store (shared by its clones).
pub(super) struct Held {
    kept: Mutex<Vec<Kept>>,
    idle_limit: Duration,
    /// Whether a sweep task runs (at most one at a time).
    sweeping: AtomicBool,
    /// Kept connections found closed by the server as a read began.
    lost: AtomicU64,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    since: Instant,
    used: Instant,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("kept", &self.len())
            .field("idle_limit", &self.idle_limit)
            .finish()
    }
}

impl Default for Held {
    fn default() -> Self {
        Self::new(IDLE_LIMIT)
    }
}

impl Held {
    pub(super) fn new(idle_limit: Duration) -> Self {
        Self {
            kept: Mutex::default(),
            idle_limit,
            sweeping: AtomicBool::new(false),
            lost: AtomicU64::new(0),
        }
    }

    /// Runs the read `f` on a kept connection (or one from `pool`), and
    /// keeps that connection for the next read if `f` succeeded.
    pub(super) async fn read<T, F>(
        self: &Arc<Self>,
        pool: &PgPool,
        mut f: F,
    ) -> Result<T, sqlx::Error>
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
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::telemetry::DB_CONNECTIONS_LOST).increment(1);
                    tracing::info!(error = %e, "a kept database connection was closed; reading again on a new one");
                    kept.conn.close_on_drop();
                }
                // Anything else is the statement's own error, not the
                // link's; the connection goes back to the pool, which
                // checks it.
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
        self.lock().len()
    }

    /// Kept connections found closed by the server so far.
    pub(super) fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self, k: &Kept, now: Instant) -> bool {
        now.duration_since(k.used) < self.idle_limit && now.duration_since(k.since) < HOLD_LIMIT
    }

    /// The most recently used fresh kept connection; every stale one goes
    /// back to the pool.
    fn take(&self) -> Option<Kept> {
        self.hand_back_stale();
        self.lock().pop()
    }

    /// Hands every stale kept connection back to the pool; returns how
    /// many stay kept.
    fn hand_back_stale(&self) -> usize {
        let now = Instant::now();
        let (stale, left): (Vec<Kept>, usize) = {
            let mut kept = self.lock();
            let (stale, fresh) = std::mem::take(&mut *kept)
                .into_iter()
                .partition(|k| !self.fresh(k, now));
            *kept = fresh;
            (stale, kept.len())
        };
        // Dropped outside the lock: each drop hands its connection back.
        drop(stale);
        left
    }

    fn keep(self: &Arc<Self>, mut k: Kept) {
        k.used = Instant::now();
        {
            let mut kept = self.lock();
            if kept.len() >= MAX_KEPT {
                drop(kept);
                drop(k);
                return;
            }
            kept.push(k);
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(sweep(Arc::downgrade(self), self.idle_limit));
                }
                // No runtime: the next read hands stale ones back.
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }
}

/// While any connection is kept, hands back the stale ones every idle
/// limit, so a replica whose misses stop returns its connection.
async fn sweep(held: Weak<Held>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(held) = held.upgrade() else { return };
        if held.hand_back_stale() > 0 {
            continue;
        }
        held.sweeping.store(false, Ordering::Release);
        // One kept since the check needs a sweeper: this one, unless its
        // keeper started another.
        if held.len() == 0 || held.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

/// The server closed this connection (restart, termination, idle
/// timeout, a proxy's): the statement never ran, and another connection
/// may work.
fn is_dead(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => {
            // FATAL or PANIC: the server ends the session after sending it.
            let fatal = db
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic));
            // Connection exceptions (class 08: PgBouncer's too); the
            // operator-intervention codes a closing server sends.
            let code = db.code();
            let closing = code.as_deref().is_some_and(|c| {
                c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "57P05")
            });
            fatal || closing
        }
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
