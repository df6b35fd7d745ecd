//! What Postgres itself counted: `pg_stat_statements` (statements by text,
//! one database) and `pg_stat_database` (transactions), as snapshots to
//! subtract. The server must preload `pg_stat_statements`
//! (`shared_preload_libraries`; `scripts/bench` starts its Postgres so).

use std::collections::HashMap;

use anyhow::Context;
use sqlx::{Connection, PgConnection};

/// One connection to the benchmark's database, for statistics only.
pub struct PgStats {
    conn: PgConnection,
}

/// Calls per normalised statement text, and the database's commits.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub calls: HashMap<String, i64>,
    pub xacts: i64,
}

impl Snapshot {
    /// Calls since `before`, per statement, most first (this connection's
    /// own statistics queries left out).
    pub fn since(&self, before: &Snapshot) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = self
            .calls
            .iter()
            .map(|(q, n)| (q.clone(), n - before.calls.get(q).copied().unwrap_or(0)))
            .filter(|(q, n)| *n > 0 && !q.contains("pg_stat_"))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Calls since `before` of statements whose text contains `needle`.
    pub fn calls_matching(&self, before: &Snapshot, needle: &str) -> i64 {
        self.since(before)
            .iter()
            .filter(|(q, _)| q.contains(needle))
            .map(|(_, n)| n)
            .sum()
    }
}

impl PgStats {
    /// Connects to `database_url` and makes sure the extension is there.
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        let mut conn = PgConnection::connect(database_url).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await?;
        sqlx::query("SELECT count(*) FROM pg_stat_statements")
            .execute(&mut conn)
            .await
            .context(
                "pg_stat_statements is not loaded: start Postgres with \
                 -c shared_preload_libraries=pg_stat_statements",
            )?;
        Ok(Self { conn })
    }

    pub async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT query, sum(calls)::bigint FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             GROUP BY query",
        )
        .fetch_all(&mut self.conn)
        .await?;
        let xacts: i64 = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(&mut self.conn)
        .await?;
        Ok(Snapshot {
            calls: rows.into_iter().collect(),
            xacts,
        })
    }

    /// The connection, for other statements of the benchmark.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// One line of a statement's text, cut to `n` characters (for tables).
pub fn short(query: &str, n: usize) -> String {
    let one: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > n {
        format!("{}…", one.chars().take(n).collect::<String>())
    } else {
        one
    }
}
