//! Running it in a cluster: Prometheus metrics, graceful shutdown, TLS and
//! mutual TLS, readiness while the database is unreachable.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::grpc::pb;
use tollgate::store::{Invalidation, PostgresStore, Store};
use tonic_health::pb::health_check_response::ServingStatus;

/// The metrics endpoint of this test binary (the recorder is process-global).
fn metrics_addr() -> std::net::SocketAddr {
    static ADDR: OnceLock<std::net::SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The exporter needs a runtime of its own that outlives each test's.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tollgate::telemetry::install_metrics(port).unwrap();
                tx.send(()).unwrap();
                std::future::pending::<()>().await
            });
        });
        rx.recv().unwrap();
        port
    })
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

#[sqlx::test]
async fn metrics_report_decisions_caches_invalidations_database_and_quota_leases(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let addr = metrics_addr();
    let mut a = spawn(&conn, "msgflash").await;
    let mut b = spawn(&conn, "msgflash").await;
    a.create_tenant("acme", "pro").await;
    let (key, record) = a.create_key("acme").await;
    assert!(b.authenticate(&key).await.allowed);
    assert!(b.authenticate(&key).await.allowed);
    let r = b
        .authenticate_with(pb::AuthenticateRequest {
            api_key: key.clone(),
            cost: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.allowed);
    let stranger = b.profile.key_format.generate("live");
    for _ in 0..2 {
        // The second time, the negative cache answers.
        let r = b.authenticate(stranger.expose()).await;
        assert_eq!(reason(&r), "KEY_UNKNOWN");
    }
    let mut seen = b.invalidations();
    a.revoke(&record.key_id).await;
    let id: uuid::Uuid = record.key_id.parse().unwrap();
    wait_for(&mut seen, |e| *e == Invalidation::Key(id)).await;
    b.running.heartbeat().await.unwrap();

    let text = scrape(addr).await;
    for series in [
        "tollgate_decisions_total{",
        "reason=\"KEY_UNKNOWN\"",
        "credential=\"api_key\"",
        "tollgate_decision_duration_seconds_bucket",
        "tollgate_cache_lookups_total{cache=\"key\",result=\"hit\"}",
        "tollgate_cache_lookups_total{cache=\"negative\"",
        "tollgate_invalidations_received_total{kind=\"key\"}",
        "tollgate_revocation_lag_seconds_bucket",
        // Cache misses read keys in batches (one digest each here: no
        // concurrency), with size buckets of their own.
        "tollgate_db_query_duration_seconds_bucket{query=\"find_keys\"",
        "tollgate_key_lookup_batch_size_bucket{le=\"1\"}",
        "tollgate_key_lookup_batch_size_bucket{le=\"128\"}",
        "tollgate_db_pool_connections{state=\"idle\"}",
        "tollgate_quota_leases_total{result=\"granted\"}",
        "tollgate_quota_lease_units_total{direction=\"leased\"}",
        "tollgate_replicas",
        // Gauges are process-wide and other tests in this binary shut
        // instances down, so only their presence is asserted here; the
        // feed's state is b's `database` health (below).
        "tollgate_feed_connected ",
        "tollgate_feed_staleness_seconds ",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    assert_eq!(b.service_status("database").await, ServingStatus::Serving);
    assert!(!text.contains(&key), "no secret in metrics");
}

/// The value of one exact series (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[sqlx::test]
async fn metrics_count_check_quota_answers_by_outcome_and_reason(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let addr = metrics_addr();
    let allowed = r#"tollgate_quota_checks_total{outcome="allow",reason=""}"#;
    let unknown = r#"tollgate_quota_checks_total{outcome="deny",reason="KEY_UNKNOWN"}"#;
    let mut t = spawn(&conn, "default").await;
    let before = scrape(addr).await;
    t.create_tenant("acme", "pro").await;
    let (key, _) = t.create_key("acme").await;
    let stranger = t.profile.key_format.generate("live");
    for (api_key, allow) in [
        (key.as_str(), true),
        (key.as_str(), true),
        (stranger.expose(), false),
    ] {
        let r = t
            .auth
            .check_quota(pb::CheckQuotaRequest {
                api_key: api_key.to_owned(),
                cost: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.allowed, allow);
    }
    let after = scrape(addr).await;
    // Other tests in this binary share the recorder: at least ours counted.
    let grew = |series: &str| {
        sample(&after, series).unwrap_or(0.0) - sample(&before, series).unwrap_or(0.0)
    };
    assert!(
        grew(allowed) >= 2.0,
        "{allowed} did not count 2 in:\n{after}"
    );
    assert!(
        grew(unknown) >= 1.0,
        "{unknown} did not count 1 in:\n{after}"
    );
}

#[sqlx::test]
async fn shutdown_lets_in_flight_calls_finish_and_returns_quota_leases(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    shutdown_with(pool_opts, conn, 0).await;
}

/// The same on two connection workers (the binary's default shape): the
/// in-flight call runs on a worker's runtime, and the leases are returned
/// after the workers drained, on database connections they may have opened.
#[sqlx::test]
async fn shutdown_on_connection_workers_lets_in_flight_calls_finish_and_returns_quota_leases(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    shutdown_with(pool_opts, conn, 2).await;
}

async fn shutdown_with(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
    connection_workers: usize,
) {
    let opts = Options {
        connection_workers,
        ..Options::new(profile("default"))
    };
    let mut t = spawn_with(&conn, opts).await;
    t.create_tenant("acme", "pro").await;
    let (key, _) = t.create_key("acme").await;
    for _ in 0..3 {
        let r = t
            .authenticate_with(pb::AuthenticateRequest {
                api_key: key.clone(),
                cost: Some(1),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.allowed);
    }

    // Hold the tenant row so the next CreateKey blocks inside its transaction.
    let db = pool_opts.connect_with(conn.clone()).await.unwrap();
    let mut lock = db.begin().await.unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *lock)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM tenants WHERE tenant_id = 'acme' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut client = t.auth.clone();
    let in_flight = tokio::spawn(async move {
        client
            .create_key(op(pb::CreateKeyRequest {
                tenant_id: "acme".into(),
                name: "in flight".into(),
                ..Default::default()
            }))
            .await
    });
    // Signal: Postgres shows a backend blocked by our very lock (not any
    // lock wait on the server: other tests' databases share it).
    let blocked_by_us = "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))";
    tokio::time::timeout(Duration::from_secs(10), async {
        while sqlx::query_scalar::<_, i64>(blocked_by_us)
            .bind(holder)
            .fetch_one(&db)
            .await
            .unwrap()
            == 0
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("CreateKey waits on our lock");
    let mut health = t
        .health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let shutdown = tokio::spawn(t.running.shutdown());
    // Shutdown starts by going NOT_SERVING, while the call is still held.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = health.message().await.unwrap() {
            if update.status == ServingStatus::NotServing as i32 {
                return;
            }
        }
        panic!("the health stream ended before NOT_SERVING");
    })
    .await
    .expect("NOT_SERVING");
    assert!(!in_flight.is_finished());
    // (The Watch stream is a call too: end it, or shutdown waits for it.)
    drop(health);
    assert!(!shutdown.is_finished(), "shutdown waits for the call");
    lock.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown ends")
        .unwrap()
        .unwrap();
    // Shutdown returned after the call had written its key.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        keys, 2,
        "the in-flight CreateKey committed before shutdown returned"
    );
    let created = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight call ends")
        .unwrap();
    assert!(created.is_ok(), "the in-flight call finished: {created:?}");

    let used: i64 =
        sqlx::query_scalar("SELECT used FROM quota_usage WHERE limit_name = 'tenant_per_month'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(used, 3, "unused leased units were returned");
    let replicas: i64 = sqlx::query_scalar("SELECT count(*) FROM replicas")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(replicas, 0, "the replica left the heartbeat table");
}

/// Connection workers: each accepted connection is dealt to the next
/// worker in turn, and every worker answers the calls on its connections.
#[tokio::test]
async fn connections_are_dealt_to_the_connection_workers_in_turn_and_each_decides() {
    let store: Arc<dyn Store> = Arc::new(tollgate::store::MemoryStore::new());
    let opts = Options {
        connection_workers: 2,
        ..Options::new(profile("default"))
    };
    let mut t = spawn_on_store(store, opts).await;
    t.create_tenant("acme", "pro").await;
    let (key, _) = t.create_key("acme").await;
    let before = t.running.connections_per_worker();
    assert_eq!(before.len(), 2, "two workers");

    let addr = t.running.local_addr();
    for n in 0..4 {
        // A channel of its own: one new connection each.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = pb::auth_service_client::AuthServiceClient::new(channel)
            .authenticate(pb::AuthenticateRequest {
                api_key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.allowed, "connection {n}: {r:?}");
    }
    let after = t.running.connections_per_worker();
    let dealt: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(dealt, [2, 2], "four connections, two to each worker");
    t.running.shutdown().await.unwrap();
}

#[sqlx::test]
async fn a_replica_started_while_the_database_is_down_becomes_ready_when_it_answers(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let proxy = Proxy::start(pg_addr(&conn)).await;
    proxy.cut();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(proxy.options(&conn));
    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pool));
    let running = start_unwaited(store, None, 0).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", running.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let ready = health.check(check("")).await.unwrap().into_inner().status;
    assert_eq!(
        ready,
        ServingStatus::NotServing as i32,
        "not ready without the database"
    );
    let live = health
        .check(check("liveness"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        live,
        ServingStatus::Serving as i32,
        "but alive: a restart would not help"
    );

    let mut events = running.applied_invalidations();
    proxy.restore();
    wait_for(&mut events, |e| *e == Invalidation::Ready).await;
    let ready = health.check(check("")).await.unwrap().into_inner().status;
    assert_eq!(ready, ServingStatus::Serving as i32);
}

/// A Tollgate started without waiting for readiness (these tests watch it).
async fn start_unwaited(
    store: Arc<dyn Store>,
    tls: Option<Arc<tollgate::tls::Reloading>>,
    connection_workers: usize,
) -> tollgate::app::Running {
    start_holding(store, tls, connection_workers, 4096).await
}

/// As [`start_unwaited`], its gRPC port holding `max_connections` at once.
async fn start_holding(
    store: Arc<dyn Store>,
    tls: Option<Arc<tollgate::tls::Reloading>>,
    connection_workers: usize,
    max_connections: usize,
) -> tollgate::app::Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tollgate::app::start(
        tollgate::app::Parts {
            profile: Arc::new(profile("default")),
            peppers: peppers(),
            store,
            operator_token: None,
            guard: Default::default(),
            cache: Default::default(),
            max_message_bytes: 65536,
            last_used_flush: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(1),
            tls,
            clock: tollgate::clock::Clock::system(),
            envoy: Default::default(),
            rate_shares: Default::default(),
            ready_gate: None,
            dashboard: Default::default(),
            replicas: Default::default(),
            revocation: Default::default(),
            leak_reports: Default::default(),
            revocation_events: None,
            connection_workers,
            max_connections,
        },
        listener,
    )
    .await
    .unwrap()
}

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    stranger_cert: String,
    stranger_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["gateway".into()]);
    let stranger_key = KeyPair::generate().unwrap();
    let stranger = CertificateParams::new(vec!["stranger".to_string()])
        .unwrap()
        .self_signed(&stranger_key)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        stranger_cert: stranger.pem(),
        stranger_key: stranger_key.serialize_pem(),
    }
}

async fn tls_health(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<i32, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| format!("{e:?}"))
}

/// A Secret volume as the kubelet mounts it: each file is a symlink into
/// `..data`, itself a symlink to a directory holding one version of every
/// file; a new version is written aside and swapped in with one rename, so
/// a reader never sees half of it.
struct SecretMount {
    dir: std::path::PathBuf,
    version: usize,
}

impl SecretMount {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mount = Self { dir, version: 0 };
        mount.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), mount.path(name)).unwrap();
        }
        mount
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// Writes every file of a new version, then swaps `..data` to it.
    fn publish(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.join(&version).join(name), text).unwrap();
        }
        let next = self.dir.join("..data_next");
        std::os::unix::fs::symlink(&version, &next).unwrap();
        std::fs::rename(&next, self.dir.join("..data")).unwrap();
    }
}

impl Drop for SecretMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn refs<'a>(files: &'a [(&'static str, String); 3]) -> [(&'static str, &'a str); 3] {
    files.each_ref().map(|(name, text)| (*name, text.as_str()))
}

#[tokio::test]
async fn mutual_tls_admits_clients_with_a_trusted_certificate_only_and_reloads_certificates() {
    // Served by the test's runtime, and by two connection workers (the
    // binary's default shape), where each worker runs its own handshakes.
    for connection_workers in [0, 2] {
        mutual_tls_with(connection_workers).await;
    }
}

#[tokio::test]
async fn a_full_grpc_port_closes_the_next_connection_tls_handshakes_included() {
    // The attack: open connections and never finish their TLS handshake
    // (or never send a byte) until the process runs out of file
    // descriptors, its database connections included. Each connection now
    // holds one of the port's slots from accept on; past the cap a new one
    // is closed on arrival, and a slot serves again once its connection
    // ends. Both accept paths: the test's runtime, and connection workers.
    for connection_workers in [0, 2] {
        let pki = pki();
        let (_mount, tls) = mutual_tls_files(&pki, 60);
        let store: Arc<dyn Store> = Arc::new(tollgate::store::MemoryStore::new());
        let running = start_holding(store, Some(tls), connection_workers, 2).await;
        let addr = running.local_addr();
        let client = Some((pki.client_cert.as_str(), pki.client_key.as_str()));

        // Two connections that never say a word: both in their handshake.
        let first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let refused = tls_health(addr, &pki.ca_pem, client).await;
        assert!(
            refused.is_err(),
            "a third is closed on arrival: {refused:?}"
        );

        // One of them goes: its slot serves a trusted client (once the
        // port has seen it go).
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tls_health(addr, &pki.ca_pem, client).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::task::yield_now().await;
        }
        running.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_full_plaintext_grpc_port_closes_the_next_connection_on_arrival() {
    use tokio::io::AsyncReadExt;
    for connection_workers in [0, 2] {
        let store: Arc<dyn Store> = Arc::new(tollgate::store::MemoryStore::new());
        let running = start_holding(store, None, connection_workers, 2).await;
        let addr = running.local_addr();
        let _first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A served connection waits for the client's preface; a refused
        // one is closed at once (end of stream or a reset).
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), third.read(&mut byte))
            .await
            .expect("closed on arrival, not held open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        running.shutdown().await.unwrap();
    }
}

/// The server's certificate, key and client CA of `p`, as mounted.
fn server_files(p: &Pki) -> [(&'static str, String); 3] {
    [
        ("tls.crt", p.server_cert.clone()),
        ("tls.key", p.server_key.clone()),
        ("ca.crt", p.ca_pem.clone()),
    ]
}

/// `p`'s server files in a Secret mount, and mutual TLS read from it
/// (checked for changes every `reload_seconds`).
fn mutual_tls_files(p: &Pki, reload_seconds: u64) -> (SecretMount, Arc<tollgate::tls::Reloading>) {
    let mount = SecretMount::new(&refs(&server_files(p)));
    let tls = tollgate::tls::Reloading::start(tollgate::tls::TlsSettings {
        cert_file: mount.path("tls.crt"),
        key_file: mount.path("tls.key"),
        client_ca_file: Some(mount.path("ca.crt")),
        reload_seconds,
    })
    .unwrap();
    (mount, tls)
}

async fn mutual_tls_with(connection_workers: usize) {
    let pki = pki();
    let (mut mount, tls) = mutual_tls_files(&pki, 1);
    let store: Arc<dyn Store> = Arc::new(tollgate::store::MemoryStore::new());
    let running = start_unwaited(store, Some(tls.clone()), connection_workers).await;
    let addr = running.local_addr();
    let serving = ServingStatus::Serving as i32;
    let client = Some((pki.client_cert.as_str(), pki.client_key.as_str()));

    assert_eq!(tls_health(addr, &pki.ca_pem, client).await, Ok(serving));
    assert!(
        tls_health(addr, &pki.ca_pem, None).await.is_err(),
        "no client certificate"
    );
    let stranger = Some((pki.stranger_cert.as_str(), pki.stranger_key.as_str()));
    assert!(
        tls_health(addr, &pki.ca_pem, stranger).await.is_err(),
        "a certificate the CA did not sign"
    );

    // Rotate to a certificate from a new CA, all three files at once (as a
    // Secret update lands): the running server picks it up.
    let next = self::pki();
    let mut reloaded = tls.subscribe();
    mount.publish(&refs(&server_files(&next)));
    tokio::time::timeout(Duration::from_secs(10), reloaded.recv())
        .await
        .expect("a reload within 10 s (the poller looks every second)")
        .unwrap();
    let next_client = Some((next.client_cert.as_str(), next.client_key.as_str()));
    assert_eq!(
        tls_health(addr, &next.ca_pem, next_client).await,
        Ok(serving)
    );
    assert!(
        tls_health(addr, &pki.ca_pem, client).await.is_err(),
        "old chain retired"
    );
    assert!(
        tls_health(addr, &next.ca_pem, client).await.is_err(),
        "the old client certificate is not signed by the new CA"
    );
    running.shutdown().await.unwrap();
}

/// Runs the real `grpcurl` (on PATH; scripts/test installs it) with no
/// proto files, from an empty directory; returns (success, stdout + stderr).
async fn grpcurl(args: &[&str]) -> (bool, String) {
    let empty = std::env::temp_dir().join(format!("tollgate-grpcurl-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("grpcurl")
            .args(args)
            .current_dir(&empty)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("grpcurl answers within a minute")
    .expect("grpcurl is on PATH (scripts/install-grpcurl)");
    std::fs::remove_dir_all(&empty).unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// grpcurl printed `google.rpc.BadRequest is not recognized` for every
/// validation error and could not call Envoy's `Authorization/Check` ("target
/// server does not expose service"): reflection now describes every service
/// on the port and the error-details messages.
#[sqlx::test]
async fn reflection_lets_grpcurl_list_describe_and_call_every_service_and_decode_error_details(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.create_tenant("acme", "pro").await;
    let (key, _) = t.create_key("acme").await;
    let addr = t.running.local_addr().to_string();

    let (ok, listed) = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(ok, "{listed}");
    let mut services: Vec<&str> = listed.lines().collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            "envoy.service.auth.v3.Authorization",
            "envoy.service.ratelimit.v3.RateLimitService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "tollgate.v1.AuthService",
            "tollgate.v1.ConsoleService",
            "tollgate.v1.RevocationService",
            "tollgate.v1.TenantService",
        ],
        "every service on the port is listed"
    );

    let (ok, described) = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "envoy.service.auth.v3.Authorization",
    ])
    .await;
    assert!(ok, "{described}");
    assert!(
        described.contains("rpc Check ( .envoy.service.auth.v3.CheckRequest )"),
        "{described}"
    );

    // A call that fails validation: the BadRequest details are decoded.
    let bearer = format!("authorization: Bearer {OPERATOR_TOKEN}");
    let (ok, refused) = grpcurl(&[
        "-plaintext",
        "-H",
        &bearer,
        "-d",
        r#"{"tenant_id": "not a valid id!", "name": ""}"#,
        &addr,
        "tollgate.v1.AuthService/CreateKey",
    ])
    .await;
    assert!(!ok, "{refused}");
    assert!(refused.contains("Code: InvalidArgument"), "{refused}");
    assert!(!refused.contains("not recognized"), "{refused}");
    assert!(
        refused.contains(r#""@type":"type.googleapis.com/google.rpc.BadRequest""#)
            && refused.contains(r#"{"field":"tenant_id","#)
            && refused.contains(r#"{"field":"name","#),
        "{refused}"
    );

    // Envoy's Check through grpcurl, with no proto files.
    let check = serde_json::json!({"attributes": {"request": {"http": {
        "method": "GET", "path": "/v1/things", "headers": {"x-api-key": key}}}}});
    let (ok, checked) = grpcurl(&[
        "-plaintext",
        "-d",
        &check.to_string(),
        &addr,
        "envoy.service.auth.v3.Authorization/Check",
    ])
    .await;
    assert!(ok, "{checked}");
    let answer: serde_json::Value = serde_json::from_str(&checked).expect("JSON answer");
    assert_eq!(answer["dynamicMetadata"]["decision"], "allow", "{checked}");
    assert_eq!(answer["dynamicMetadata"]["tenant_id"], "acme", "{checked}");
    assert!(!checked.contains(&key), "the credential is not echoed");

    // A health check by name, as a probe without grpc-health-probe would.
    let (ok, health) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;
    assert!(ok && health.contains(r#""status": "SERVING""#), "{health}");
}

/// Reflection describes Envoy's ext_authz with the `.proto` files in
/// `proto/third_party/`; they must be the ones of the envoy-types crate the
/// server is compiled with, or grpcurl would encode fields the server does
/// not know (scripts/vendor-protos after an upgrade).
#[test]
fn the_vendored_envoy_protos_equal_those_of_the_locked_envoy_types_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = std::env::temp_dir().join(format!("tollgate-protos-{}", uuid::Uuid::new_v4()));
    let out = std::process::Command::new(root.join("scripts/vendor-protos"))
        .arg(&scratch)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fn files(dir: &std::path::Path, base: &std::path::Path, into: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, base, into);
            } else {
                let name = path.strip_prefix(base).unwrap().display().to_string();
                into.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    let (mut want, mut have) = (Vec::new(), Vec::new());
    files(&scratch, &scratch, &mut want);
    let vendored = root.join("proto/third_party");
    files(&vendored, &vendored, &mut have);
    want.sort();
    have.sort();
    std::fs::remove_dir_all(&scratch).unwrap();
    assert!(want.len() > 10);
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&have), names(&want), "run scripts/vendor-protos");
    for ((name, a), (_, b)) in have.iter().zip(&want) {
        assert!(
            a == b,
            "{name} differs from envoy-types': run scripts/vendor-protos"
        );
    }
}
