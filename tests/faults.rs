//! Faults, with real processes: the database link cut, Postgres stopped,
//! hung and out of connections. A replica keeps deciding from its cache
//! within the staleness bound, refuses what it cannot confirm past it, and
//! recovers without a restart. Every test is bounded in time (a bound, not a
//! synchronisation: each waits on health, invalidations or Postgres itself).

mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;
use tollgate::store::postgres::FeedSettings;
use tollgate::store::{Invalidation, PostgresStore};
use tonic_health::pb::health_check_response::ServingStatus;

/// No test here may take longer than this, whatever goes wrong.
const BOUND: Duration = Duration::from_secs(90);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the fault test finished within its bound")
}

fn with_staleness(profile_name: &str, seconds: u64) -> Options {
    let mut opts = Options::new(profile(profile_name));
    opts.cache.max_staleness_seconds = seconds;
    opts
}

/// The gRPC code of an Authenticate call (`Ok` = an answer, allow or deny).
async fn code_of(t: &mut Tollgate, key: &str) -> tonic::Code {
    match t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: key.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

#[sqlx::test]
async fn with_the_feed_down_a_replica_stays_ready_and_decides_cached_keys_within_the_staleness_bound(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut t = spawn_with(&proxy.options(&conn), with_staleness("default", 3600)).await;
        t.create_tenant("acme", "pro").await;
        let (cached, _) = t.create_key("acme").await;
        let (uncached, _) = t.create_key("acme").await;
        assert!(t.authenticate(&cached).await.allowed);
        assert_eq!(t.service_status("database").await, ServingStatus::Serving);

        proxy.cut();
        t.wait_for_service("database", ServingStatus::NotServing)
            .await;
        assert_eq!(
            t.health_status().await,
            ServingStatus::Serving,
            "still ready"
        );
        assert!(t.authenticate(&cached).await.allowed, "cached keys decide");
        assert_eq!(
            code_of(&mut t, &uncached).await,
            tonic::Code::Unavailable,
            "an uncached key cannot be decided: UNAVAILABLE, never a denial"
        );

        proxy.restore();
        t.wait_for_service("database", ServingStatus::Serving).await;
        assert!(t.authenticate(&uncached).await.allowed);
    })
    .await
}

#[sqlx::test]
async fn past_the_staleness_bound_cached_keys_are_unavailable_then_readiness_is_not_serving(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut t = spawn_with(&proxy.options(&conn), with_staleness("default", 1)).await;
        t.create_tenant("acme", "pro").await;
        let (cached, _) = t.create_key("acme").await;
        assert!(t.authenticate(&cached).await.allowed);

        proxy.cut();
        t.wait_for_health(ServingStatus::NotServing).await;
        assert_eq!(
            code_of(&mut t, &cached).await,
            tonic::Code::Unavailable,
            "past the bound a cached decision cannot be confirmed"
        );
        assert_eq!(
            t.service_status("liveness").await,
            ServingStatus::Serving,
            "alive: a restart would not help"
        );

        proxy.restore();
        t.wait_for_health(ServingStatus::Serving).await;
        assert!(
            t.authenticate(&cached).await.allowed,
            "recovered, no restart"
        );
    })
    .await
}

#[sqlx::test]
async fn a_key_revoked_on_another_replica_while_the_link_was_cut_is_refused_once_it_returns(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut a = spawn_with(&proxy.options(&conn), with_staleness("default", 3600)).await;
        let mut b = spawn(&conn, "default").await;
        b.create_tenant("acme", "pro").await;
        let (revoked, revoked_key) = b.create_key("acme").await;
        let (kept, _) = b.create_key("acme").await;
        assert!(a.authenticate(&revoked).await.allowed);
        assert!(a.authenticate(&kept).await.allowed);

        let mut events = a.invalidations();
        proxy.cut();
        wait_for(&mut events, |e| *e == Invalidation::Lost).await;
        b.revoke(&revoked_key.key_id).await;
        assert_eq!(reason(&b.authenticate(&revoked).await), "KEY_REVOKED");

        proxy.restore();
        let caught_up = until_ready(&mut events).await;
        assert!(
            caught_up.contains(&Invalidation::Key(revoked_key.key_id.parse().unwrap())),
            "the revocation was caught up: {caught_up:?}"
        );
        assert!(
            !caught_up.contains(&Invalidation::Flush),
            "caught up, not flushed: {caught_up:?}"
        );
        assert_eq!(a.health_status().await, ServingStatus::Serving);
        assert_eq!(a.service_status("database").await, ServingStatus::Serving);
        // The other cached key is still cached: no flush, no reload.
        assert!(a.running.caches().key(&digest_of(&kept)).is_some());
        assert!(a.running.caches().key(&digest_of(&revoked)).is_none());
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(a.authenticate(&kept).await.allowed);
    })
    .await
}

#[sqlx::test]
async fn a_replica_whose_change_history_was_pruned_meanwhile_flushes_exactly_once(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut a = spawn_with(&proxy.options(&conn), with_staleness("default", 3600)).await;
        let mut b = spawn(&conn, "default").await;
        b.create_tenant("acme", "pro").await;
        let (revoked, revoked_key) = b.create_key("acme").await;
        let (kept, _) = b.create_key("acme").await;
        assert!(a.authenticate(&revoked).await.allowed);
        assert!(a.authenticate(&kept).await.allowed);

        let mut events = a.invalidations();
        proxy.cut();
        wait_for(&mut events, |e| *e == Invalidation::Lost).await;
        b.revoke(&revoked_key.key_id).await;
        // Retention passes: everything but the newest change is pruned,
        // the changes this replica last saw among them.
        let db = pool_opts.connect_with(conn.clone()).await.unwrap();
        let pruned = PostgresStore::new(db)
            .with_feed(FeedSettings {
                retention: Duration::ZERO,
                ..FeedSettings::default()
            })
            .prune_changes()
            .await
            .unwrap();
        assert!(pruned > 0);

        proxy.restore();
        let seen = until_ready(&mut events).await;
        let flushes = seen.iter().filter(|e| **e == Invalidation::Flush).count();
        assert_eq!(flushes, 1, "{seen:?}");
        assert!(
            a.running.caches().key(&digest_of(&kept)).is_none(),
            "flushed"
        );
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(a.authenticate(&kept).await.allowed);
    })
    .await
}

/// The events a replica applies up to (not including) its next `Ready`.
async fn until_ready(rx: &mut tokio::sync::broadcast::Receiver<Invalidation>) -> Vec<Invalidation> {
    let mut seen = Vec::new();
    loop {
        match rx.recv().await {
            Ok(Invalidation::Ready) => return seen,
            Ok(e) => seen.push(e),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                panic!("missed {n} events")
            }
            Err(e) => panic!("invalidation feed closed: {e}"),
        }
    }
}

/// The digest a replica caches `key` under.
fn digest_of(key: &str) -> tollgate::crypto::KeyDigest {
    peppers().current().digest(key)
}

#[sqlx::test]
async fn a_partitioned_replica_never_allows_a_key_revoked_elsewhere_past_the_staleness_bound(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        let mut a = spawn_with(&proxy.options(&conn), with_staleness("default", 1)).await;
        let mut b = spawn(&conn, "default").await;
        b.create_tenant("acme", "pro").await;
        let (revoked, revoked_key) = b.create_key("acme").await;
        let (kept, _) = b.create_key("acme").await;
        assert!(a.authenticate(&revoked).await.allowed);
        assert!(a.authenticate(&kept).await.allowed);

        // Only a's link is cut; b keeps writing.
        proxy.cut();
        b.revoke(&revoked_key.key_id).await;
        b.create_key("acme").await;
        a.wait_for_health(ServingStatus::NotServing).await;
        // Past the bound a cannot confirm anything: UNAVAILABLE, never allowed.
        assert_eq!(code_of(&mut a, &revoked).await, tonic::Code::Unavailable);
        assert_eq!(code_of(&mut a, &kept).await, tonic::Code::Unavailable);

        proxy.restore();
        a.wait_for_health(ServingStatus::Serving).await;
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(a.authenticate(&kept).await.allowed);
    })
    .await
}

/// Found by the soak (BENCHMARKS.md §7): the bound used to start when the
/// loss was noticed, so a change committed while the link was already
/// silent (noticed only after the probe timed out) was allowed for the
/// whole bound again.
#[sqlx::test]
async fn a_revocation_a_silent_link_never_delivered_is_refused_once_the_bound_since_the_last_confirmed_change_is_past(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        // The link is probed every 100 ms and declared lost after 3 s of
        // silence, well past the 1 s bound.
        let store = PostgresStore::new(pool(&proxy.options(&conn)).await).with_feed(FeedSettings {
            probe_every: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(3),
            ..FeedSettings::default()
        });
        let mut a = spawn_on_store(std::sync::Arc::new(store), with_staleness("default", 1)).await;
        let mut b = spawn(&conn, "default").await;
        b.create_tenant("acme", "pro").await;
        let (revoked, revoked_key) = b.create_key("acme").await;
        assert!(a.authenticate(&revoked).await.allowed);
        let mut events = a.invalidations();
        wait_for(&mut events, |e| matches!(e, Invalidation::Current(_))).await;

        // a's link goes quiet (no error), then the key is revoked elsewhere.
        proxy.hold();
        b.revoke(&revoked_key.key_id).await;
        assert_eq!(reason(&b.authenticate(&revoked).await), "KEY_REVOKED");
        wait_for(&mut events, |e| *e == Invalidation::Lost).await;
        // Noticed 3 s into the silence, with a last confirmation from
        // before it: the bound is already past, so nothing cached is given.
        assert_eq!(code_of(&mut a, &revoked).await, tonic::Code::Unavailable);
        assert_eq!(a.health_status().await, ServingStatus::NotServing);

        proxy.cut();
        proxy.restore();
        a.wait_for_health(ServingStatus::Serving).await;
        assert_eq!(reason(&a.authenticate(&revoked).await), "KEY_REVOKED");
    })
    .await
}

#[sqlx::test]
async fn with_every_pooled_connection_held_by_slow_queries_uncached_keys_are_unavailable_not_hung(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        // Three connections: the feed's LISTEN holds one, slow queries the rest.
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_millis(500))
            .connect_with(conn.clone())
            .await
            .unwrap();
        let store =
            PostgresStore::new(pool.clone()).with_query_timeout(Some(Duration::from_secs(1)));
        let mut t =
            spawn_on_store(std::sync::Arc::new(store), with_staleness("default", 3600)).await;
        t.create_tenant("acme", "pro").await;
        let (cached, _) = t.create_key("acme").await;
        let (uncached, _) = t.create_key("acme").await;
        assert!(t.authenticate(&cached).await.allowed);

        let slow: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(
                    async move { sqlx::query("SELECT pg_sleep(600)").execute(&pool).await },
                )
            })
            .collect();
        // Signal: Postgres shows both slow queries running.
        let observer = pool_opts.connect_with(conn.clone()).await.unwrap();
        let sleeping = "SELECT count(*) FROM pg_stat_activity \
            WHERE query = 'SELECT pg_sleep(600)' AND state = 'active'";
        while sqlx::query_scalar::<_, i64>(sleeping)
            .fetch_one(&observer)
            .await
            .unwrap()
            < 2
        {
            tokio::task::yield_now().await;
        }

        assert!(t.authenticate(&cached).await.allowed, "cached keys decide");
        assert_eq!(
            code_of(&mut t, &uncached).await,
            tonic::Code::Unavailable,
            "a bounded wait for a connection, then UNAVAILABLE"
        );
        assert_eq!(t.health_status().await, ServingStatus::Serving);
        assert_eq!(t.service_status("database").await, ServingStatus::Serving);

        // The slow queries end: the replica recovers by itself.
        sqlx::query(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
             WHERE query = 'SELECT pg_sleep(600)'",
        )
        .execute(&observer)
        .await
        .unwrap();
        for task in slow {
            assert!(task.await.unwrap().is_err(), "cancelled");
        }
        assert!(t.authenticate(&uncached).await.allowed);
    })
    .await
}

/// A PostgreSQL 15 of this test's own, to stop, start, freeze and thaw
/// (never the shared server). Removed on drop.
struct Throwaway {
    dir: std::path::PathBuf,
    port: u16,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `program args…` as the `postgres` user when running as root.
fn as_pg(program: &str, args: &[&str]) -> tokio::process::Command {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let mut c;
    if root {
        c = tokio::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
    } else {
        c = tokio::process::Command::new(program);
    }
    c.args(args).stdout(std::process::Stdio::null());
    c
}

impl Throwaway {
    async fn start() -> Throwaway {
        let dir = std::env::temp_dir().join(format!("tollgate-faults-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::process::Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.join("data");
        let ok = as_pg(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )
        .status()
        .await
        .unwrap();
        assert!(ok.success(), "initdb");
        let pg = Throwaway { dir, port };
        pg.up().await;
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_string()
    }

    async fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.to_str().unwrap()
        );
        let log = self.dir.join("server.log");
        let ok = as_pg(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        )
        .status()
        .await
        .unwrap();
        assert!(ok.success(), "pg_ctl start");
    }

    async fn down(&self) {
        let ok = as_pg(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &self.data(), "-m", "fast", "-w", "stop"],
        )
        .status()
        .await
        .unwrap();
        assert!(ok.success(), "pg_ctl stop");
    }

    fn conn(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
    }

    /// The postmaster and its children (this server's processes only).
    fn pids(&self) -> Vec<String> {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        let postmaster = pidfile.lines().next().unwrap().trim().to_string();
        let children = std::process::Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .unwrap();
        std::iter::once(postmaster)
            .chain(
                String::from_utf8_lossy(&children.stdout)
                    .lines()
                    .map(|l| l.trim().to_string()),
            )
            .collect()
    }

    /// Every process of this server stops answering (SIGSTOP), by id.
    fn freeze(&self) {
        for pid in self.pids() {
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status();
        }
    }

    fn thaw(&self) {
        for pid in self.pids() {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid])
                .status();
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if self.dir.join("data/postmaster.pid").exists() {
            self.thaw();
        }
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A replica on `pg` with short, explicit bounds: pool wait, query
/// timeout and feed probe.
async fn replica_on(pg: &Throwaway) -> Tollgate {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(pg.conn())
        .await
        .unwrap();
    let store = PostgresStore::new(pool)
        .with_query_timeout(Some(Duration::from_millis(500)))
        .with_feed(FeedSettings {
            probe_every: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(500),
            ..FeedSettings::default()
        });
    store.migrate().await.unwrap();
    spawn_on_store(std::sync::Arc::new(store), with_staleness("default", 3600)).await
}

/// Keys on a fresh replica: (cached, uncached, revoked before the fault).
async fn keys_before_the_fault(t: &mut Tollgate) -> (String, String, String) {
    t.create_tenant("acme", "pro").await;
    let (cached, _) = t.create_key("acme").await;
    let (uncached, _) = t.create_key("acme").await;
    let (revoked, revoked_key) = t.create_key("acme").await;
    assert!(t.authenticate(&cached).await.allowed);
    assert!(t.authenticate(&revoked).await.allowed);
    let mut seen = t.invalidations();
    t.revoke(&revoked_key.key_id).await;
    let id: uuid::Uuid = revoked_key.key_id.parse().unwrap();
    wait_for(&mut seen, |e| *e == Invalidation::Key(id)).await;
    (cached, uncached, revoked)
}

#[tokio::test]
async fn postgres_stopped_then_restarted_cached_keys_keep_deciding_and_the_replica_recovers() {
    bounded(async {
        let pg = Throwaway::start().await;
        let mut t = replica_on(&pg).await;
        let (cached, uncached, revoked) = keys_before_the_fault(&mut t).await;

        pg.down().await;
        t.wait_for_service("database", ServingStatus::NotServing)
            .await;
        assert_eq!(t.health_status().await, ServingStatus::Serving);
        assert!(t.authenticate(&cached).await.allowed);
        assert_eq!(code_of(&mut t, &uncached).await, tonic::Code::Unavailable);
        assert_ne!(
            code_of(&mut t, &revoked).await,
            tonic::Code::Ok,
            "never allowed"
        );

        pg.up().await;
        t.wait_for_service("database", ServingStatus::Serving).await;
        assert!(t.authenticate(&uncached).await.allowed, "no restart needed");
        assert_eq!(reason(&t.authenticate(&revoked).await), "KEY_REVOKED");
        assert!(t.authenticate(&cached).await.allowed);
    })
    .await
}

#[tokio::test]
async fn postgres_hung_longer_than_every_timeout_is_noticed_and_survived() {
    bounded(async {
        let pg = Throwaway::start().await;
        let mut t = replica_on(&pg).await;
        let (cached, uncached, revoked) = keys_before_the_fault(&mut t).await;

        pg.freeze();
        // The feed's probe stops being answered.
        t.wait_for_service("database", ServingStatus::NotServing)
            .await;
        assert_eq!(t.health_status().await, ServingStatus::Serving);
        assert!(t.authenticate(&cached).await.allowed);
        assert_eq!(
            code_of(&mut t, &uncached).await,
            tonic::Code::Unavailable,
            "bounded by the query and pool timeouts, not by the hang"
        );
        let revoked_code = code_of(&mut t, &revoked).await;
        assert_eq!(revoked_code, tonic::Code::Unavailable, "never allowed");

        pg.thaw();
        t.wait_for_service("database", ServingStatus::Serving).await;
        assert!(t.authenticate(&uncached).await.allowed, "no restart needed");
        assert_eq!(reason(&t.authenticate(&revoked).await), "KEY_REVOKED");
    })
    .await
}
