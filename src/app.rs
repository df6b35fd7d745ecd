//! Assembles a running Tollgate: store, caches, decision pipeline, gRPC
//! server, health, and the background tasks (invalidations, last-used).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::access::Access;
use crate::authz::{Authenticator, RequestCounts, UsageRecorder};
use crate::cache::{CacheSettings, Caches};
use crate::clock::Clock;
use crate::console::Console;
use crate::crypto::jwks::RefreshStats;
use crate::crypto::Peppers;
use crate::dashboard::Dashboard;
use crate::forward_auth::{ForwardAuth, ForwardAuthServer};
use crate::grpc::auth_api::AuthApi;
use crate::grpc::budget::{Budget, ManagementSettings};
use crate::grpc::caller::{CallerGuard, CallerTokens};
use crate::grpc::console_api::ConsoleApi;
use crate::grpc::envoy::{AuthorizationServer, EnvoyAuthz, EnvoySettings};
use crate::grpc::operator::StaticToken;
use crate::grpc::pb::auth_service_server::AuthServiceServer;
use crate::grpc::pb::console_service_server::ConsoleServiceServer;
use crate::grpc::pb::revocation_service_server::RevocationServiceServer;
use crate::grpc::pb::tenant_service_server::TenantServiceServer;
use crate::grpc::pb::{ENVOY_FILE_DESCRIPTOR_SET, FILE_DESCRIPTOR_SET};
use crate::grpc::ratelimit::{EnvoyRateLimit, RateLimitServiceServer};
use crate::grpc::revocation_api::RevocationApi;
use crate::grpc::tenant_api::TenantApi;
use crate::limits::shares::ShareSettings;
use crate::limits::{Limiter, ShareReport};
use crate::manage::Manager;
use crate::profile::Profile;
use crate::ratelimit::RateLimits;
use crate::readiness::{set_health, Follower};
use crate::store::{Invalidation, Store};

/// Public so the benchmark's no-op baseline serves in the very same shape.
pub mod workers;
pub use workers::per_core;

/// Everything a Tollgate instance is built from.
pub struct Parts {
    pub profile: Arc<Profile>,
    pub peppers: Peppers,
    pub store: Arc<dyn Store>,
    pub operator_token: Option<SecretString>,
    /// Other callers' credentials and the management budget.
    pub guard: GuardParts,
    /// JWT issuers and console (dashboard surface); default: none.
    pub dashboard: Dashboard,
    pub cache: CacheSettings,
    pub max_message_bytes: usize,
    pub last_used_flush: Duration,
    /// How long in-flight calls may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// TLS (and client certificate checking) for the gRPC port.
    pub tls: Option<Arc<crate::tls::Reloading>>,
    pub clock: Clock,
    /// The Envoy ext_authz adapter's settings.
    pub envoy: EnvoySettings,
    /// Rate-limit share exchange between replicas (`limits::shares`).
    pub rate_shares: ShareSettings,
    /// Readiness also waits for this to turn true (start-up migrations
    /// still running); `None`: no such wait.
    pub ready_gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// Heartbeat interval and expiry.
    pub replicas: ReplicaSettings,
    /// Automatic revocation sweeps (`manage::revocation`).
    pub revocation: crate::manage::revocation::SweepSettings,
    /// The GitHub secret-scanning endpoint (`leak_reports`); off unless
    /// `listen` is set.
    pub leak_reports: crate::leak_reports::LeakReportSettings,
    /// Where policy revocations and leak reports are sent as events
    /// (`manage::revocation_events`); `None`: nowhere but the audit log,
    /// the change feed, the metrics and the log.
    pub revocation_events: Option<Arc<dyn crate::manage::revocation_events::RevocationEvents>>,
    /// Current-thread runtimes (one thread each) that serve the gRPC
    /// port's connections (`workers`); 0: the calling runtime serves them.
    pub connection_workers: usize,
    /// Connections the gRPC port holds at once, TLS handshakes included;
    /// one more is closed on arrival and counted.
    pub max_connections: usize,
}

/// How replicas find each other and share quotas (`[replicas]` in the
/// config file, `TOLLGATE_REPLICAS__*` in the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSettings {
    /// How often a replica announces itself, reports the quota units it
    /// consumed and gives back the leases of counters it did not use since
    /// the last beat.
    pub heartbeat_interval_ms: u64,
    /// A replica silent this long is gone: the others stop sharing rate
    /// limits with it and reclaim its quota holdings (as consumed).
    pub heartbeat_expiry_seconds: u32,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 5_000,
            heartbeat_expiry_seconds: 15,
        }
    }
}

impl ReplicaSettings {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(1))
    }
}

/// Who may call besides the operator, and how much management work runs
/// at once (see [`crate::access`] for what each caller may do).
#[derive(Clone, Default)]
pub struct GuardParts {
    /// The gateway identity's bearer token (quota and usage by id).
    pub gateway_token: Option<SecretString>,
    /// The console backend's bearer token (Login's `client_address`).
    pub console_backend_token: Option<SecretString>,
    /// Slots and timeout of management and console calls.
    pub management: ManagementSettings,
}

impl std::fmt::Debug for GuardParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardParts")
            .field(
                "gateway_token",
                &self.gateway_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "console_backend_token",
                &self.console_backend_token.as_ref().map(|_| "<redacted>"),
            )
            .field("management", &self.management)
            .finish()
    }
}

/// A started instance.
pub struct Running {
    addr: SocketAddr,
    clock: Clock,
    caches: Arc<Caches>,
    manager: Arc<Manager>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    usage: Arc<UsageRecorder>,
    store: Arc<dyn Store>,
    applied: broadcast::Sender<Invalidation>,
    authz: Arc<Authenticator>,
    replica_id: uuid::Uuid,
    replicas: ReplicaSettings,
    reporter: tonic_health::server::HealthReporter,
    shutdown_grace: Duration,
    jwks: Vec<(String, Arc<RefreshStats>)>,
    envoy: EnvoySettings,
    forward_auth: Option<ForwardAuthServer>,
    request_counts: Arc<RequestCounts>,
    leak_reports_addr: Option<SocketAddr>,
    /// Ends the connection workers when dropped, after everything else.
    workers: Option<workers::Lifetime>,
}

/// One beat's quota upkeep: report this replica's use and (if the store
/// just answered the heartbeat) give back idle leases, then reclaim the
/// holdings of replicas whose heartbeat expired (as consumed: see
/// `limits::quota`).
async fn settle_leases(
    quotas: &crate::limits::quota::Quotas,
    store: &dyn Store,
    expiry: u32,
    store_answered: bool,
) {
    if let Err(e) = quotas.report(store_answered).await {
        tracing::warn!(error = %e, "could not report quota use; will retry");
    }
    match store.reclaim_quota_leases(quotas.replica(), expiry).await {
        Ok(0) => {}
        Ok(units) => {
            tracing::info!(
                units,
                "reclaimed the quota leases of replicas whose heartbeat expired (counted as consumed)"
            );
            metrics::counter!(crate::telemetry::QUOTA_LEASE_UNITS, "direction" => "reclaimed")
                .increment(units);
        }
        Err(e) => tracing::warn!(error = %e, "could not reclaim expired quota leases"),
    }
}

/// One exchange of rate shares, its outcome in the metrics and the log.
async fn exchange_shares(limiter: &Limiter, replica_id: uuid::Uuid, stale_after_secs: u32) {
    match limiter.exchange_shares(replica_id, stale_after_secs).await {
        Ok(r) => {
            metrics::counter!(crate::telemetry::SHARE_EXCHANGES, "result" => "ok").increment(1);
            metrics::gauge!(crate::telemetry::SHARED_CELLS).set(r.published as f64);
            metrics::gauge!(crate::telemetry::REPLICAS).set(f64::from(r.replicas));
        }
        Err(e) => {
            metrics::counter!(crate::telemetry::SHARE_EXCHANGES, "result" => "error").increment(1);
            tracing::warn!(error = %e, "rate share exchange failed; keeping the current shares");
        }
    }
}

/// Health name for liveness probes: SERVING from start to shutdown, even
/// while the database is unreachable (a restart would not help, and cached
/// decisions are still served).
pub const LIVENESS: &str = "liveness";

/// Starts serving on `listener`. Readiness is NOT_SERVING until the
/// invalidation feed is live, and again once it has been down longer than
/// the staleness bound (`crate::readiness`).
pub async fn start(mut parts: Parts, listener: TcpListener) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    let (jwks_tasks, jwks) = parts.dashboard.start_refreshers();
    let caches = Arc::new(Caches::new(&parts.cache));
    let usage = Arc::new(UsageRecorder::default());
    let request_counts = Arc::new(RequestCounts::default());
    let authz = Arc::new(
        Authenticator::new(
            parts.profile.clone(),
            parts.peppers.clone(),
            parts.store.clone(),
            caches.clone(),
            usage.clone(),
            parts.clock.clone(),
        )
        .with_jwt(parts.dashboard.verifier.clone())
        .with_request_counts(request_counts.clone()),
    );
    let mut manager = Manager::new(
        parts.profile.clone(),
        parts.peppers.clone(),
        parts.store.clone(),
        parts.clock.clone(),
    )
    .with_caches(caches.clone());
    if let Some(sink) = parts.revocation_events.take() {
        manager = manager.with_revocation_events(sink);
    }
    let manager = Arc::new(manager);
    let tokens = CallerTokens {
        operator: StaticToken::new(parts.operator_token.as_ref()),
        gateway: StaticToken::new(parts.guard.gateway_token.as_ref()),
        console_backend: StaticToken::new(parts.guard.console_backend_token.as_ref()),
    };
    let budget = Budget::new(&parts.guard.management);
    let console_parts = parts.dashboard.console.take();
    let console_issuer = console_parts
        .as_ref()
        .filter(|c| c.signer.is_some())
        .map(|c| c.settings.issuer.clone());
    let callers = CallerGuard::new(
        tokens,
        parts.dashboard.verifier.clone(),
        console_issuer,
        parts.clock.clone(),
    )
    .with_verified_email_required(
        console_parts
            .as_ref()
            .is_some_and(|c| c.settings.require_verified_email),
    );
    let callers = match console_parts.as_ref() {
        Some(c) => callers.with_console_users(c.store.clone()),
        None => callers,
    };
    let console = console_parts.as_ref().and_then(|c| {
        let signer = c.signer.clone()?;
        Some(Arc::new(
            Console::new(
                parts.profile.clone(),
                c.store.clone(),
                signer,
                c.settings.clone(),
                parts.clock.clone(),
            )
            .with_providers(parts.dashboard.providers.clone()),
        ))
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let shutdown_reporter = reporter.clone();

    // Rate shares: a replica exchanges once (after the migrations, as a
    // counted replica) before it is ready, so it never serves a cell that
    // is hot elsewhere at the even share it would start from; then every
    // interval.
    // One id per replica: its heartbeat row, quota holdings and share rows.
    let replica_id = authz.limiter().quotas().replica();
    let limiter = authz.limiter().clone();
    limiter.configure_shares(&parts.rate_shares);
    let stale_after_secs = parts.replicas.heartbeat_expiry_seconds;
    let exchange = (parts.rate_shares.exchange_interval_ms > 0).then(|| {
        let (exchanged, gate) = tokio::sync::watch::channel(false);
        let mut migrated = parts.ready_gate.take();
        let store = parts.store.clone();
        let limiter = limiter.clone();
        let period = Duration::from_millis(parts.rate_shares.exchange_interval_ms);
        let task = tokio::spawn(async move {
            if let Some(m) = migrated.as_mut() {
                let _ = m.wait_for(|done| *done).await;
            }
            if let Ok(n) = store.heartbeat(replica_id, stale_after_secs).await {
                limiter.set_replicas(n);
            }
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                exchange_shares(&limiter, replica_id, stale_after_secs).await;
                let _ = exchanged.send(true);
            }
        });
        (task, gate)
    });
    let (exchange, ready_gate) = match exchange {
        Some((task, gate)) => (Some(task), Some(gate)),
        None => (None, parts.ready_gate.take()),
    };

    let (tx, events) = mpsc::channel(1024);
    parts.store.watch(tx);
    let (applied, _) = broadcast::channel(1024);
    let invalidations = tokio::spawn(
        Follower {
            events,
            caches: caches.clone(),
            store: parts.store.clone(),
            reporter: reporter.clone(),
            ready_gate,
            announce: applied.clone(),
            max_staleness: Duration::from_secs(parts.cache.max_staleness_seconds),
        }
        .run(),
    );

    let store = parts.store.clone();
    let flush_usage = usage.clone();
    let period = parts.last_used_flush;
    let upkeep = caches.clone();
    let flush_counts = request_counts.clone();
    let counts_clock = parts.clock.clone();
    let last_used = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            upkeep.maintain();
            if let Err(e) = flush_usage.flush(store.as_ref()).await {
                tracing::warn!(error = %e, "could not record last use of keys; will retry");
            }
            if let Err(e) = flush_counts.flush(store.as_ref(), counts_clock.now()).await {
                tracing::warn!(error = %e, "could not record per-key request counts; will retry");
            }
        }
    });

    // Replicas find each other through a heartbeat table and divide rate
    // limits among themselves; each beat also settles quota leases.
    let beat_store = parts.store.clone();
    let replicas = parts.replicas;
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(replicas.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some((size, idle)) = beat_store.pool_stats() {
                metrics::gauge!(crate::telemetry::DB_POOL_CONNECTIONS, "state" => "idle")
                    .set(idle as f64);
                metrics::gauge!(crate::telemetry::DB_POOL_CONNECTIONS, "state" => "in_use")
                    .set(f64::from(size) - idle as f64);
            }
            let beat = beat_store.heartbeat(replica_id, stale_after_secs).await;
            match &beat {
                Ok(n) => {
                    limiter.set_replicas(*n);
                    metrics::gauge!(crate::telemetry::REPLICAS).set(f64::from(*n));
                }
                Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
            }
            let quotas = limiter.quotas();
            settle_leases(quotas, beat_store.as_ref(), stale_after_secs, beat.is_ok()).await;
        }
    });

    // Every replica sweeps: the store skips keys another sweeper holds, so
    // each key is revoked (and audited, and published) once. The first
    // sweep is one interval after start, not at once (a rolling restart
    // does not make every replica sweep together).
    let sweeper = (parts.revocation.sweep_interval_seconds > 0).then(|| {
        let manager = manager.clone();
        let period = Duration::from_secs(parts.revocation.sweep_interval_seconds);
        let batch = parts.revocation.sweep_batch;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let report = manager.sweep_revocations(batch).await;
                tracing::info!(
                    revoked = report.revoked.len(),
                    tenants = report.tenants_swept,
                    failed_tenants = report.failed_tenants,
                    "revocation sweep done"
                );
            }
        })
    });

    let leak_reports = crate::leak_reports::serve(&parts.leak_reports, manager.clone()).await?;
    let leak_reports_addr = leak_reports.as_ref().map(|e| e.addr);
    let leak_tasks = leak_reports.map(|e| e.tasks).unwrap_or_default();

    let reflection = reflection_builder()
        .build_v1()
        .map_err(std::io::Error::other)?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(std::io::Error::other)?;
    let max = parts.max_message_bytes;
    let authz_handle = authz.clone();
    let envoy = AuthorizationServer::new(EnvoyAuthz::new(
        authz.clone(),
        parts.clock.clone(),
        &parts.envoy,
    ))
    .max_decoding_message_size(max);
    let ratelimit = RateLimitServiceServer::new(EnvoyRateLimit::new(
        RateLimits::new(authz.clone(), parts.clock.clone()),
        callers.clone(),
    ))
    .max_decoding_message_size(max);
    let access = Arc::new(Access::new(parts.store.clone()));
    let auth = AuthServiceServer::new(AuthApi {
        authz,
        manager: manager.clone(),
        guard: callers.clone(),
        access: access.clone(),
    })
    .max_decoding_message_size(max);
    let tenants = TenantServiceServer::new(TenantApi {
        manager: manager.clone(),
        guard: callers.clone(),
        access: access.clone(),
    })
    .max_decoding_message_size(max);
    let revocation = RevocationServiceServer::new(RevocationApi {
        manager: manager.clone(),
        guard: callers.clone(),
        access,
    })
    .max_decoding_message_size(max);

    let console_api = ConsoleServiceServer::new(ConsoleApi {
        console,
        store: console_parts.map(|c| c.store),
        guard: callers.clone(),
    })
    .max_decoding_message_size(max);

    let (shutdown, signal) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(budget.wrap(auth))
        .add_service(budget.wrap(tenants))
        .add_service(envoy)
        .add_service(budget.wrap(console_api))
        .add_service(ratelimit)
        .add_service(budget.wrap(revocation));
    let stop = async move {
        let _ = signal.await;
    };
    let slots = crate::net::Slots::new(
        parts.max_connections.max(1),
        "grpc",
        crate::telemetry::GRPC_CONNECTIONS_REFUSED,
    );
    let (server, workers) = if parts.connection_workers > 0 {
        let (accept, lifetime) = workers::serve(
            router,
            listener,
            parts.tls,
            parts.connection_workers,
            slots,
            stop,
        )?;
        (tokio::spawn(accept), Some(lifetime))
    } else {
        let server = match parts.tls {
            Some(tls) => tokio::spawn(
                router
                    .serve_with_incoming_shutdown(crate::tls::incoming(listener, tls, slots), stop),
            ),
            None => tokio::spawn(router.serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    crate::net::accept_slotted(listener, slots),
                    Ok::<_, std::io::Error>,
                ),
                stop,
            )),
        };
        (server, None)
    };
    Ok(Running {
        addr,
        clock: parts.clock,
        caches,
        manager,
        shutdown: Some(shutdown),
        server,
        background: [invalidations, last_used, heartbeat]
            .into_iter()
            .chain(exchange)
            .chain(sweeper)
            .chain(leak_tasks)
            .chain(jwks_tasks)
            .collect(),
        authz: authz_handle,
        replica_id,
        replicas,
        reporter: shutdown_reporter,
        shutdown_grace: parts.shutdown_grace,
        jwks,
        usage,
        request_counts,
        store: parts.store,
        applied,
        envoy: parts.envoy,
        forward_auth: None,
        leak_reports_addr,
        workers,
    })
}

/// Reflection describes every service on the port (Tollgate's, Envoy's
/// ext_authz and rate-limit service, health) and the `google.rpc` error details that
/// INVALID_ARGUMENT and other statuses carry, so grpcurl needs no proto
/// files. A file in more than one set is served from the first.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(ENVOY_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        // Both reflection versions run on the port: each lists both.
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

impl Running {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the leak report endpoint listens, when it is on.
    pub fn leak_reports_addr(&self) -> Option<SocketAddr> {
        self.leak_reports_addr
    }

    /// This instance's clock (tests move it).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// This instance's caches (tests and metrics read them).
    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    /// The management operations, for in-process setup (dev mode).
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// JWKS refresh counters, by issuer (tests wait on them).
    pub fn jwks_refreshes(&self, issuer: &str) -> Option<&Arc<RefreshStats>> {
        self.jwks.iter().find(|(i, _)| i == issuer).map(|(_, s)| s)
    }

    /// Invalidations as this instance applies them (after its caches are
    /// updated and health is set): a signal for tests and tools.
    pub fn applied_invalidations(&self) -> broadcast::Receiver<Invalidation> {
        self.applied.subscribe()
    }

    /// Announces this replica now and returns how many are live (tests use
    /// it instead of waiting for the next heartbeat).
    pub async fn heartbeat(&self) -> crate::error::Result<u32> {
        let n = self
            .store
            .heartbeat(self.replica_id, self.replicas.heartbeat_expiry_seconds)
            .await?;
        self.authz.limiter().set_replicas(n);
        Ok(n)
    }

    /// This replica's id (its heartbeat row and quota holdings).
    pub fn replica_id(&self) -> uuid::Uuid {
        self.replica_id
    }

    /// Reports quota use (and gives back idle leases if `give_back_idle`)
    /// now, as the next heartbeat would (tests use it instead of waiting);
    /// returns the units given back.
    pub async fn report_leases(&self, give_back_idle: bool) -> crate::error::Result<u64> {
        self.authz.limiter().quotas().report(give_back_idle).await
    }

    /// Exchanges rate shares with the other replicas now (tests use it
    /// instead of waiting for the next interval).
    pub async fn exchange_shares(&self) -> crate::error::Result<ShareReport> {
        Ok(self
            .authz
            .limiter()
            .exchange_shares(self.replica_id, self.replicas.heartbeat_expiry_seconds)
            .await?)
    }

    /// This instance's rate limiter (tests read the shares it enforces).
    pub fn limiter(&self) -> &Arc<Limiter> {
        self.authz.limiter()
    }

    /// Stops at once, as a crash would: no lease is returned, nothing is
    /// flushed, the replica is not removed from the heartbeat table.
    pub fn kill(self) {
        // Dropping without `shutdown` aborts everything (see `Drop`).
        drop(self);
    }

    /// Serves HTTP forward-auth (NGINX `auth_request`, Traefik
    /// ForwardAuth; `crate::forward_auth`) on `listener`, over TLS when
    /// `tls` is given, deciding exactly as Envoy's `Check` on the gRPC port.
    /// With `gateway_secret`, only requests carrying it are decided. At most
    /// `max_connections` are held open; one more is closed on arrival. It
    /// stops with this instance. Returns the address it listens on.
    pub fn serve_forward_auth(
        &mut self,
        listener: TcpListener,
        gateway_secret: Option<SecretString>,
        tls: Option<Arc<crate::tls::Reloading>>,
        max_connections: usize,
    ) -> std::io::Result<SocketAddr> {
        let envoy = EnvoyAuthz::new(self.authz.clone(), self.clock.clone(), &self.envoy);
        let health =
            tonic_health::server::HealthService::from_health_reporter(self.reporter.clone());
        let server = ForwardAuthServer::start(
            listener,
            tls,
            ForwardAuth::new(envoy, gateway_secret, health),
            max_connections,
        )?;
        let addr = server.local_addr();
        if let Some(previous) = self.forward_auth.replace(server) {
            previous.abort();
        }
        Ok(addr)
    }

    /// Writes pending `last_used_at` values now.
    pub async fn flush_usage(&self) -> crate::error::Result<usize> {
        self.usage.flush(self.store.as_ref()).await
    }

    /// Writes the per-key request counts made so far, now (one store call);
    /// how many keys were written.
    pub async fn flush_request_counts(&self) -> crate::error::Result<usize> {
        self.request_counts
            .flush(self.store.as_ref(), self.clock.now())
            .await
    }

    /// Connections dealt to each connection worker so far (empty: the
    /// calling runtime serves the port).
    pub fn connections_per_worker(&self) -> Vec<u64> {
        self.workers.as_ref().map(|w| w.dealt()).unwrap_or_default()
    }

    /// Stops accepting calls, lets in-flight calls finish, writes pending
    /// usage, and stops the background tasks.
    pub async fn shutdown(mut self) -> Result<(), tonic::transport::Error> {
        set_health(&self.reporter, ServingStatus::NotServing).await;
        self.reporter
            .set_service_status(LIVENESS, ServingStatus::NotServing)
            .await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(forward_auth) = self.forward_auth.take() {
            forward_auth.shutdown(self.shutdown_grace).await;
        }
        let served = match tokio::time::timeout(self.shutdown_grace, &mut self.server).await {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.shutdown_grace.as_millis() as u64,
                    "in-flight calls did not finish in time; stopping them"
                );
                self.server.abort();
                Ok(Ok(()))
            }
        };
        for task in &self.background {
            task.abort();
        }
        if let Err(e) = self.usage.flush(self.store.as_ref()).await {
            tracing::warn!(error = %e, "could not record last use of keys at shutdown");
        }
        let now = self.clock.now();
        if let Err(e) = self.request_counts.flush(self.store.as_ref(), now).await {
            tracing::warn!(error = %e, "could not record per-key request counts at shutdown");
        }
        let returned = self.authz.limiter().quotas().return_all().await;
        tracing::info!(returned, "returned unused quota leases");
        if let Err(e) = self.store.leave(self.replica_id).await {
            tracing::warn!(error = %e, "could not leave the replica set");
        }
        match served {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "server task failed");
                Ok(())
            }
        }
    }

    /// Serves until `signal` resolves, then shuts down.
    pub async fn serve_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let mut this = self;
        tokio::select! {
            () = signal => {}
            r = &mut this.server => {
                return match r { Ok(r) => r, Err(_) => Ok(()) };
            }
        }
        this.shutdown().await
    }
}

impl Drop for Running {
    /// A `Running` dropped without `shutdown` stops at once (as `kill`), so
    /// its tasks do not outlive it holding database connections.
    fn drop(&mut self) {
        self.server.abort();
        if let Some(forward_auth) = &self.forward_auth {
            forward_auth.abort();
        }
        for task in &self.background {
            task.abort();
        }
    }
}
