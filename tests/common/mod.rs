//! Shared test harness: Tollgate instances on 127.0.0.1:0 against a real
//! Postgres (a fresh database per test from `#[sqlx::test]`), gRPC clients,
//! and a TCP proxy that can cut the database link to simulate an outage.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use tollgate::app::{self, Parts, Running};
use tollgate::cache::CacheSettings;
use tollgate::clock::Clock;
use tollgate::crypto::{Pepper, Peppers};
use tollgate::grpc::pb;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tollgate::grpc::pb::tenant_service_client::TenantServiceClient;
use tollgate::profile::Profile;
use tollgate::store::{Invalidation, PostgresStore, Store};

pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";
pub const PEPPER: &[u8] = b"test-pepper-0123456789abcdef-0123456789";

/// A shipped profile by name (`default`, `msgflash`, `mailsage`, `msgine`, `messagesmart`).
pub fn profile(name: &str) -> Profile {
    let path = format!("{}/profiles/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    Profile::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn peppers() -> Peppers {
    Peppers::new(Pepper::new(1, PEPPER.to_vec()).unwrap(), vec![]).unwrap()
}

/// A pool on `conn` sized for tests, failing fast when the database is gone.
pub async fn pool(conn: &PgConnectOptions) -> sqlx::PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(conn.clone())
        .await
        .expect("test database reachable")
}

/// One running Tollgate with clients connected to it.
pub struct Tollgate {
    pub running: Running,
    pub auth: AuthServiceClient<Channel>,
    pub tenants: TenantServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    pub channel: Channel,
    pub profile: Arc<Profile>,
}

/// Options for [`spawn_with`].
pub struct Options {
    pub profile: Profile,
    pub peppers: Peppers,
    pub max_message_bytes: usize,
    /// JWT issuers and console (dashboard surface).
    pub dashboard: tollgate::dashboard::Dashboard,
    /// Gateway and console backend tokens, management budget.
    pub guard: tollgate::app::GuardParts,
    /// Cache sizes and the staleness bound.
    pub cache: CacheSettings,
    /// Heartbeat interval and expiry (tests of replica failure shorten them).
    pub replicas: tollgate::app::ReplicaSettings,
    /// Rate-share exchange; off unless a test turns it on (then it drives
    /// exchanges itself with `Running::exchange_shares`).
    pub rate_shares: tollgate::limits::shares::ShareSettings,
    /// The leak report endpoint; off unless a test turns it on.
    pub leak_reports: tollgate::leak_reports::LeakReportSettings,
    /// Where revocation events go; nowhere unless a test says.
    pub revocation_events: Option<Arc<dyn tollgate::manage::revocation_events::RevocationEvents>>,
    /// Connection workers (`app::Parts::connection_workers`); 0 (the test's
    /// runtime serves) unless a test says.
    pub connection_workers: usize,
    /// Connections the gRPC port holds at once (`app::Parts::max_connections`).
    pub max_connections: usize,
}

impl Options {
    pub fn new(profile: Profile) -> Self {
        Self {
            profile,
            peppers: peppers(),
            max_message_bytes: 64 * 1024,
            dashboard: Default::default(),
            guard: Default::default(),
            cache: CacheSettings::default(),
            replicas: Default::default(),
            rate_shares: tollgate::limits::shares::ShareSettings {
                exchange_interval_ms: 0,
                ..Default::default()
            },
            leak_reports: Default::default(),
            revocation_events: None,
            connection_workers: 0,
            max_connections: 4096,
        }
    }
}

/// A Tollgate on Postgres at `conn` with the named profile, ready (health SERVING).
pub async fn spawn(conn: &PgConnectOptions, profile_name: &str) -> Tollgate {
    spawn_with(conn, Options::new(profile(profile_name))).await
}

pub async fn spawn_with(conn: &PgConnectOptions, opts: Options) -> Tollgate {
    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pool(conn).await));
    spawn_on_store(store, opts).await
}

pub async fn spawn_on_store(store: Arc<dyn Store>, opts: Options) -> Tollgate {
    let profile = Arc::new(opts.profile);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = app::start(
        Parts {
            profile: profile.clone(),
            peppers: opts.peppers,
            store,
            operator_token: Some(OPERATOR_TOKEN.to_string().into()),
            guard: opts.guard,
            dashboard: opts.dashboard,
            cache: opts.cache,
            max_message_bytes: opts.max_message_bytes,
            last_used_flush: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            clock: Clock::system(),
            envoy: Default::default(),
            rate_shares: opts.rate_shares,
            ready_gate: None,
            replicas: opts.replicas,
            revocation: Default::default(),
            leak_reports: opts.leak_reports,
            revocation_events: opts.revocation_events,
            connection_workers: opts.connection_workers,
            max_connections: opts.max_connections,
        },
        listener,
    )
    .await
    .unwrap();
    let channel = Endpoint::from_shared(format!("http://{}", running.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut t = Tollgate {
        running,
        auth: AuthServiceClient::new(channel.clone()),
        tenants: TenantServiceClient::new(channel.clone()),
        health: HealthClient::new(channel.clone()),
        channel,
        profile,
    };
    t.wait_for_health(ServingStatus::Serving).await;
    t
}

impl Tollgate {
    /// Waits on the health Watch stream (a signal, not a sleep) for `status`.
    pub async fn wait_for_health(&mut self, status: ServingStatus) {
        self.wait_for_service("", status).await
    }

    /// Waits on the health Watch stream of `service` for `status`.
    pub async fn wait_for_service(&mut self, service: &str, status: ServingStatus) {
        let mut stream = self
            .health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(update) = stream.message().await.unwrap() {
            if update.status == status as i32 {
                return;
            }
        }
        panic!("health stream ended before reaching {status:?}");
    }

    /// The overall health status (readiness) right now.
    pub async fn health_status(&mut self) -> ServingStatus {
        self.service_status("").await
    }

    /// The health status of `service` right now (`database`: the feed).
    pub async fn service_status(&mut self, service: &str) -> ServingStatus {
        let r = self
            .health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        ServingStatus::try_from(r.status).unwrap()
    }

    pub async fn create_tenant(&mut self, id: &str, plan: &str) -> pb::Tenant {
        self.tenants
            .create_tenant(op(pb::CreateTenantRequest {
                tenant_id: id.into(),
                name: format!("Tenant {id}"),
                plan: plan.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .tenant
            .unwrap()
    }

    /// Creates a key; returns (full secret, record).
    pub async fn create_key(&mut self, tenant: &str) -> (String, pb::ApiKey) {
        self.create_key_with(pb::CreateKeyRequest {
            tenant_id: tenant.into(),
            name: "test key".into(),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    pub async fn create_key_with(
        &mut self,
        req: pb::CreateKeyRequest,
    ) -> Result<(String, pb::ApiKey), tonic::Status> {
        let r = self.auth.create_key(op(req)).await?.into_inner();
        Ok((r.api_key, r.key.unwrap()))
    }

    /// Authenticate with the raw key.
    pub async fn authenticate(&mut self, api_key: &str) -> pb::AuthenticateResponse {
        self.authenticate_with(pb::AuthenticateRequest {
            api_key: api_key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    pub async fn authenticate_with(
        &mut self,
        req: pb::AuthenticateRequest,
    ) -> Result<pb::AuthenticateResponse, tonic::Status> {
        Ok(self.auth.authenticate(req).await?.into_inner())
    }

    pub async fn revoke(&mut self, key_id: &str) -> pb::ApiKey {
        self.auth
            .revoke_key(op(pb::RevokeKeyRequest {
                key_id: key_id.into(),
                reason: "test".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
    }

    /// Subscribe before the write, then await the event with [`wait_for`].
    pub fn invalidations(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
        self.running.applied_invalidations()
    }
}

/// Waits until this instance has applied an invalidation matching `pred`.
pub async fn wait_for(
    rx: &mut tokio::sync::broadcast::Receiver<Invalidation>,
    pred: impl Fn(&Invalidation) -> bool,
) {
    loop {
        match rx.recv().await {
            Ok(e) if pred(&e) => return,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("invalidation feed closed: {e}"),
        }
    }
}

/// The denial reason of a response ("" when allowed).
pub fn reason(r: &pb::AuthenticateResponse) -> &str {
    r.denial.as_ref().map(|d| d.reason.as_str()).unwrap_or("")
}

/// Wraps a message with operator credentials.
pub fn op<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {OPERATOR_TOKEN}").parse().unwrap(),
    );
    r
}

/// The field violations of an INVALID_ARGUMENT status.
pub fn violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// A TCP proxy in front of Postgres that a test can cut (existing
/// connections dropped, new ones refused), hold (bytes silently kept back:
/// a link gone quiet, no error) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    held: tokio::sync::watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let (held, held_rx) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let held = held_rx.clone();
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        let (client_r, client_w) = client.into_split();
                        let (server_r, server_w) = server.into_split();
                        tokio::join!(
                            pump(client_r, server_w, held.clone()),
                            pump(server_r, client_w, held)
                        );
                    }
                });
                conns2.lock().unwrap().push(task);
            }
        });
        Proxy {
            addr,
            up,
            held,
            conns,
            accept,
        }
    }

    /// Every proxied connection goes quiet: nothing is delivered either
    /// way and no error is raised, as with a silent partition.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Connect options for `conn`'s database, through this proxy.
    pub fn options(&self, conn: &PgConnectOptions) -> PgConnectOptions {
        conn.clone()
            .host(&self.addr.ip().to_string())
            .port(self.addr.port())
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.held.send_replace(false);
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to`, holding bytes back while `held` is true.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if held.wait_for(|h| !*h).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Where Postgres listens for `conn` (tests proxy to it).
pub fn pg_addr(conn: &PgConnectOptions) -> SocketAddr {
    use std::net::ToSocketAddrs;
    (conn.get_host(), conn.get_port())
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
}
