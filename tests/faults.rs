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
        let store = PostgresStore::new(pool.clone())
            .with_query_timeout(Some(Duration::from_secs(1)))
            .with_held_idle_limit(Duration::from_millis(50));
        let mut t = spawn_on_store(
            std::sync::Arc::new(store.clone()),
            with_staleness("default", 3600),
        )
        .await;
        t.create_tenant("acme", "pro").await;
        let (cached, _) = t.create_key("acme").await;
        let (uncached, _) = t.create_key("acme").await;
        assert!(t.authenticate(&cached).await.allowed);
        // The key read's held connection goes back to the pool once idle,
        // with no other read to notice (a sweep): the slow queries get it.
        while store.held_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

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

/// The batched key read keeps its connection between batches (no ping on
/// the way out of the pool and back). The attack on that: the server
/// closes the kept connection (a restart, an idle timeout, a DBA's
/// `pg_terminate_backend`) and the next uncached key fails on the dead link.
#[sqlx::test]
async fn a_kept_connection_the_server_closed_costs_a_reconnect_not_an_error(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(conn.clone())
            .await
            .unwrap();
        // Held however long the test takes: the retry is the only way on.
        let store = PostgresStore::new(pool).with_held_idle_limit(Duration::from_secs(3600));
        let mut t = spawn_on_store(
            std::sync::Arc::new(store.clone()),
            with_staleness("default", 3600),
        )
        .await;
        t.create_tenant("acme", "pro").await;
        let (first, _) = t.create_key("acme").await;
        let (second, _) = t.create_key("acme").await;
        assert!(t.authenticate(&first).await.allowed);
        assert_eq!(store.held_connections(), 1, "the read kept its connection");

        // Postgres closes the kept connection under the replica.
        let observer = pool_opts.connect_with(conn.clone()).await.unwrap();
        let kept = "SELECT pid FROM pg_stat_activity \
            WHERE datname = current_database() AND query LIKE 'SELECT key_id%= ANY($1)'";
        let pid: i32 = sqlx::query_scalar(kept).fetch_one(&observer).await.unwrap();
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(pid)
            .fetch_one(&observer)
            .await
            .unwrap();
        assert!(ended);

        assert!(
            t.authenticate(&second).await.allowed,
            "read again on a new connection"
        );
        assert_eq!(store.held_connections_lost(), 1, "found closed, read again");
        let now: i32 = sqlx::query_scalar(kept).fetch_one(&observer).await.unwrap();
        assert_ne!(now, pid, "a new connection is kept");
        assert_eq!(store.held_connections(), 1);
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

// ---------------------------------------------------------------------------
// Quota leases when a replica dies or is cut off (issue 12 item 4, issue 13).

/// Beats every `interval_ms`; gone after a second of silence.
fn short_beats(mut opts: Options, interval_ms: u64) -> Options {
    opts.replicas = tollgate::app::ReplicaSettings {
        heartbeat_interval_ms: interval_ms,
        heartbeat_expiry_seconds: 1,
    };
    opts
}

async fn create_tenant_with_quota(t: &mut Tollgate, id: &str, limit: u64) {
    t.tenants
        .create_tenant(op(pb::CreateTenantRequest {
            tenant_id: id.into(),
            name: id.into(),
            plan: "enterprise".into(),
            overrides: Some(pb::TenantOverrides {
                limits: vec![pb::LimitSpec {
                    scope: "tenant".into(),
                    period: "month".into(),
                    limit,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
}

/// One unit of `key`'s quota through `client`: Ok(allowed) or the error.
async fn spend_one(
    client: &mut pb::auth_service_client::AuthServiceClient<tonic::transport::Channel>,
    key: &str,
) -> Result<pb::AuthenticateResponse, tonic::Status> {
    client
        .authenticate(pb::AuthenticateRequest {
            api_key: key.into(),
            cost: Some(1),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Spends one unit at a time until refused; returns how many were admitted.
async fn spend_until_refused(
    client: &mut pb::auth_service_client::AuthServiceClient<tonic::transport::Channel>,
    key: &str,
) -> u64 {
    for admitted in 0..10_000 {
        match spend_one(client, key).await {
            Ok(r) if r.allowed => {}
            r => {
                eprintln!("refused after {admitted}: {r:?}");
                return admitted;
            }
        }
    }
    panic!("never refused");
}

/// The tenant's `tenant_per_month` usage as GetUsage reports it.
async fn tenant_usage(t: &mut Tollgate, tenant: &str) -> u64 {
    t.auth
        .get_usage(op(pb::GetUsageRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .quotas
        .into_iter()
        .find(|q| q.name == "tenant_per_month")
        .unwrap()
        .used
}

/// Polls Postgres until `sql` (one bigint) returns `want`: the store is the
/// signal. Bounded by the test's bound.
async fn until_db(db: &sqlx::PgPool, sql: &str, want: i64) {
    loop {
        let got: i64 = sqlx::query_scalar(sql).fetch_one(db).await.unwrap();
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `tollgate serve` as a real process on `conn`'s database, beating every
/// 250 ms (gone after 1 s of silence), and a client of it once it is ready.
struct Serve {
    child: std::process::Child,
    auth: pb::auth_service_client::AuthServiceClient<tonic::transport::Channel>,
}

impl Serve {
    async fn start(conn: &PgConnectOptions) -> Serve {
        use std::io::BufRead;
        let url = format!(
            "postgres://{}@{}:{}/{}",
            conn.get_username(),
            conn.get_host(),
            conn.get_port(),
            conn.get_database().unwrap()
        );
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TOLLGATE_PEPPER", std::str::from_utf8(PEPPER).unwrap())
            .env("TOLLGATE_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("TOLLGATE_LOG_FORMAT", "json")
            .env("TOLLGATE_REPLICAS__HEARTBEAT_INTERVAL_MS", "250")
            .env("TOLLGATE_REPLICAS__HEARTBEAT_EXPIRY_SECONDS", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("tollgate starts");
        // Both streams are drained for the child's whole life (a full pipe
        // would stall it); the listening line carries the bound address.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut seen = Vec::new();
        let addr: std::net::SocketAddr = loop {
            let Some(line) = rx.recv().await else {
                panic!("tollgate exited; it printed:\n{}", seen.join("\n"));
            };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "tollgate listening" {
                break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
            }
            seen.push(line);
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // Ready (migrations checked, feed live): the health Watch, not a sleep.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let mut watch = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(update) = watch.message().await.unwrap() {
            if update.status == ServingStatus::Serving as i32 {
                break;
            }
        }
        Serve {
            child,
            auth: pb::auth_service_client::AuthServiceClient::new(channel),
        }
    }

    /// SIGKILL: no lease returned, no report, no goodbye.
    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[sqlx::test]
async fn a_replica_sigkilled_holding_leases_never_causes_over_admission_and_idle_quota_is_spendable_again(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let mut survivor =
            spawn_with(&conn, short_beats(Options::new(profile("default")), 100)).await;
        create_tenant_with_quota(&mut survivor, "idle", 100).await;
        create_tenant_with_quota(&mut survivor, "busy", 100).await;
        let (idle_key, _) = survivor.create_key("idle").await;
        let (busy_key, _) = survivor.create_key("busy").await;
        let db = pool_opts.connect_with(conn.clone()).await.unwrap();

        let mut doomed = Serve::start(&conn).await;
        for _ in 0..10 {
            assert!(
                spend_one(&mut doomed.auth, &idle_key)
                    .await
                    .unwrap()
                    .allowed
            );
        }
        // Its next beats report the ten and give the idle counter's lease
        // back (the store shows it).
        until_db(
            &db,
            "SELECT used + 1000 * COALESCE((SELECT sum(units) FROM quota_leases \
               WHERE subject = 't:idle'), 0)::bigint FROM quota_usage \
             WHERE subject = 't:idle'",
            10,
        )
        .await;
        for _ in 0..5 {
            assert!(
                spend_one(&mut doomed.auth, &busy_key)
                    .await
                    .unwrap()
                    .allowed
            );
        }
        let doomed_id: uuid::Uuid =
            sqlx::query_scalar("SELECT replica_id FROM replicas WHERE replica_id <> $1")
                .bind(survivor.running.replica_id())
                .fetch_one(&db)
                .await
                .unwrap();
        doomed.sigkill();
        // What the dead replica had leased of the busy counter: it may have
        // admitted any of it, so none of it may be given to anyone else.
        let busy_leased: i64 =
            sqlx::query_scalar("SELECT used FROM quota_usage WHERE subject = 't:busy'")
                .fetch_one(&db)
                .await
                .unwrap();
        assert!(busy_leased > 5, "it held an unspent lease: {busy_leased}");

        let mut client = survivor.auth.clone();
        let idle_admitted = 10 + spend_until_refused(&mut client, &idle_key).await;
        let busy_admitted = 5 + spend_until_refused(&mut client, &busy_key).await;
        assert_eq!(
            idle_admitted, 100,
            "the idle lease was back before the kill"
        );
        assert!(busy_admitted <= 100, "never over-admitted: {busy_admitted}");
        assert_eq!(
            busy_admitted,
            100 - (busy_leased as u64 - 5),
            "under-admitted by exactly what the dead replica held unspent"
        );

        // Its heartbeat expires; the survivor's beat reclaims its holding.
        until_db(
            &db,
            &format!("SELECT count(*) FROM quota_leases WHERE replica_id = '{doomed_id}'"),
            0,
        )
        .await;
        assert_eq!(tenant_usage(&mut survivor, "idle").await, idle_admitted);
        assert_eq!(
            tenant_usage(&mut survivor, "busy").await,
            100,
            "a dead replica's unreported units count as consumed"
        );
        assert_eq!(
            reason(&spend_one(&mut client, &busy_key).await.unwrap()),
            "QUOTA_EXHAUSTED"
        );
    })
    .await
}

#[sqlx::test]
async fn a_partitioned_replica_spends_only_its_own_lease_even_after_its_holding_is_reclaimed(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    bounded(async {
        let proxy = Proxy::start(pg_addr(&conn)).await;
        // a beats every 500 ms, so a counter it used a moment ago is not idle yet.
        let mut a = spawn_with(
            &proxy.options(&conn),
            short_beats(with_staleness("default", 3600), 500),
        )
        .await;
        let mut b = spawn_with(&conn, short_beats(Options::new(profile("default")), 100)).await;
        create_tenant_with_quota(&mut b, "acme", 100).await;
        let (key, _) = b.create_key("acme").await;
        let mut a_client = a.auth.clone();
        let mut b_client = b.auth.clone();
        for _ in 0..5 {
            assert!(spend_one(&mut a_client, &key).await.unwrap().allowed);
        }
        let db = pool_opts.connect_with(conn.clone()).await.unwrap();
        let a_id = a.running.replica_id();

        proxy.cut();
        // a's heartbeat expires and b reclaims its holding.
        until_db(
            &db,
            &format!("SELECT count(*) FROM quota_leases WHERE replica_id = '{a_id}'"),
            0,
        )
        .await;
        // a, alive behind the cut, still spends its local lease (it may:
        // the reclaim counted those units as consumed, not free)…
        let a_admitted = 5 + spend_until_refused(&mut a_client, &key).await;
        // …and b gets only what nobody holds.
        let b_admitted = spend_until_refused(&mut b_client, &key).await;
        assert_eq!(
            a_admitted + b_admitted,
            100,
            "never more than the quota (a: {a_admitted}, b: {b_admitted})"
        );

        proxy.restore();
        // a reconnects: its report finds its holding gone and changes nothing.
        while a.running.report_leases(true).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tenant_usage(&mut b, "acme").await, 100);
        assert_eq!(tenant_usage(&mut a, "acme").await, 100);
        assert_eq!(
            reason(&spend_one(&mut a_client, &key).await.unwrap()),
            "QUOTA_EXHAUSTED"
        );
    })
    .await
}
