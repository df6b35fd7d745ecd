//! `tollgate`: parse the command line, load config, start. No logic here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;

use tollgate::app::{self, Parts};
use tollgate::clock::Clock;
use tollgate::config::{FlagOverrides, Settings};
use tollgate::crypto::{Pepper, Peppers};
use tollgate::dashboard::Dashboard;
use tollgate::manage::{CreateKeyInput, CreateTenantInput};
use tollgate::remote;
use tollgate::store::{MemoryStore, PostgresStore, Store};

/// mimalloc, not glibc malloc: per-thread heaps without arena locks
/// (BENCHMARKS.md §2 has the measurement).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes mimalloc return the memory freed since, instead of on a later
/// allocation of the same thread (`tollgate::memory`).
fn give_back_freed() {
    // SAFETY: mi_collect takes no pointers and may be called at any time
    // from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "gRPC authorization service: API keys in, decisions out"
)]
struct Cli {
    /// TOML config file. Environment (`TOLLGATE_*`, `DATABASE_URL`) and flags override it.
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Runtime threads: 0 = one worker per core (multi-thread runtime); 1 =
    /// one current-thread runtime (least CPU per request, one core at most);
    /// N = N workers. Read before the config file, so flag or env only.
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_WORKER_THREADS",
        default_value_t = 0
    )]
    worker_threads: usize,
    /// Current-thread runtimes, one thread each, that serve the gRPC
    /// port's connections (dealt round-robin as they are accepted): default
    /// one per core, none when `--worker-threads` is 1; 0 = the main
    /// runtime serves them. Flag or env only.
    #[arg(long, global = true, env = "TOLLGATE_CONNECTION_WORKERS")]
    connection_workers: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run with an in-memory store, the default profile and a demo tenant.
    Dev(Common),
    /// Run against Postgres.
    Serve {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        db: Db,
        /// File holding the key pepper (env TOLLGATE_PEPPER or TOLLGATE_PEPPER_FILE).
        #[arg(long)]
        pepper_file: Option<PathBuf>,
    },
    /// Apply database migrations and exit.
    Migrate(Db),
    /// Ask a running server's health (grpc.health.v1); exit 0 only when SERVING.
    Health {
        #[command(flatten)]
        connect: remote::Connect,
        /// Health name: "" (readiness) or "liveness".
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Tenants on a running server (operator token).
    Tenants {
        #[command(flatten)]
        operator: remote::Operator,
        #[command(subcommand)]
        command: remote::Tenants,
    },
    /// API keys on a running server (operator token).
    Keys {
        #[command(flatten)]
        operator: remote::Operator,
        #[command(subcommand)]
        command: remote::Keys,
    },
    /// Console users on a running server (operator token).
    Users {
        #[command(flatten)]
        operator: remote::Operator,
        #[command(subcommand)]
        command: remote::Users,
    },
}

impl Cli {
    /// The connection workers to start (see the flag).
    fn connection_workers(&self) -> usize {
        match (self.connection_workers, self.worker_threads) {
            (Some(n), _) => n,
            (None, 1) => 0,
            (None, _) => app::per_core(),
        }
    }
}

/// The operator commands: a gRPC client of a running server, no config.
/// Returns what to print on stdout.
async fn remote_command(command: &Command) -> Result<String, remote::CliError> {
    match command {
        Command::Health { connect, service } => remote::health(connect, service).await,
        Command::Tenants { operator, command } => operator.tenants(command).await,
        Command::Keys { operator, command } => operator.keys(command).await,
        Command::Users { operator, command } => operator.users(command).await,
        Command::Dev(_) | Command::Serve { .. } | Command::Migrate(_) => {
            Err(remote::CliError::Usage("not an operator command".into()))
        }
    }
}

#[derive(Args)]
struct Common {
    /// gRPC listen address [env TOLLGATE_LISTEN; default 127.0.0.1:50051].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Profile TOML [env TOLLGATE_PROFILE; default: embedded default profile].
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Operator token for management calls [env TOLLGATE_OPERATOR_TOKEN].
    #[arg(long)]
    operator_token: Option<String>,
}

#[derive(Args)]
struct Db {
    /// Postgres URL [env DATABASE_URL].
    #[arg(long)]
    database_url: Option<String>,
}

fn flags(common: Option<&Common>, db: Option<&Db>, pepper_file: Option<PathBuf>) -> FlagOverrides {
    FlagOverrides {
        listen: common.and_then(|c| c.listen),
        profile: common.and_then(|c| c.profile.clone()),
        operator_token: common.and_then(|c| c.operator_token.clone()),
        database_url: db.and_then(|d| d.database_url.clone()),
        pepper_file,
    }
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down");
}

/// Pool settings and the parsed database URL, from the one configuration.
fn pool_config(
    settings: &Settings,
) -> anyhow::Result<(PgPoolOptions, sqlx::postgres::PgConnectOptions)> {
    let url = settings.database_url.as_ref().context(
        "configuration field `database_url`: is required (--database-url or DATABASE_URL)",
    )?;
    let opts: sqlx::postgres::PgConnectOptions = url.expose_secret().parse().map_err(|_| {
        anyhow::anyhow!("configuration field `database_url`: is not a valid Postgres URL")
    })?;
    let opts = match settings.database.statement_timeout_ms {
        0 => opts,
        ms => opts.options([("statement_timeout", ms.to_string())]),
    };
    let pool = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .min_connections(settings.database.min_connections)
        .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms));
    Ok((pool, opts))
}

/// The store on `pool`: decision-path queries bounded by the statement
/// timeout, the change history kept as configured.
fn store_on(pool: sqlx::PgPool, settings: &Settings) -> PostgresStore {
    let query_timeout = match settings.database.statement_timeout_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    // A silent link is noticed within probe_every + probe_timeout; both
    // stay within a third of the staleness bound, so the bound (counted
    // from the last confirmed probe) is what holds, not the detection time.
    let third = Duration::from_secs(settings.cache.max_staleness_seconds) / 3;
    let defaults = tollgate::store::postgres::FeedSettings::default();
    let floor = Duration::from_millis(100);
    PostgresStore::new(pool)
        .with_query_timeout(query_timeout)
        .with_feed(tollgate::store::postgres::FeedSettings {
            retention: Duration::from_secs(settings.database.change_retention_seconds),
            probe_every: defaults.probe_every.min(third).max(floor),
            probe_timeout: query_timeout
                .unwrap_or(defaults.probe_timeout)
                .min(third)
                .max(floor),
        })
}

/// A pool that connects on first use, so `serve` starts (NOT_SERVING) while
/// the database is unreachable and becomes ready when it answers.
fn connect_lazy(settings: &Settings) -> anyhow::Result<PostgresStore> {
    let (pool, opts) = pool_config(settings)?;
    Ok(store_on(pool.connect_lazy_with(opts), settings))
}

/// Says so when a newer release has migrated the database: this binary
/// serves on (migrations only add), but is older than its schema.
fn note_newer_migrations(newer: &[i64]) {
    if !newer.is_empty() {
        tracing::warn!(
            versions = ?newer,
            "the database has migrations a newer release applied; serving on its schema"
        );
    }
}

/// Applies migrations, retrying with backoff while the database is unreachable.
async fn migrate_with_retry(store: &PostgresStore) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(250);
    loop {
        match store.migrate().await {
            Ok(newer) => {
                note_newer_migrations(&newer);
                return Ok(());
            }
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_unreachable(&e) => {
                let why = unreachable_because(&store.pool().connect_options(), e).await;
                tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64,
                    "database unreachable; retrying migrations");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(anyhow::anyhow!(e).context("migration failed")),
        }
    }
}

/// Whether the database cannot be reached right now (retry), rather than
/// refusing what we asked (fail): refused or dropped connections, a pooler
/// in front of a restarting server that accepts and closes at once (a
/// protocol error), and a server starting up or shutting down (SQLSTATE
/// class 57P: `cannot_connect_now`, `admin_shutdown`, …; class 08:
/// connection exceptions).
fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        _ => false,
    }
}

/// Connects now (`migrate`: a Job that fails fast and is retried by Kubernetes).
async fn connect(settings: &Settings) -> anyhow::Result<PostgresStore> {
    let (pool, opts) = pool_config(settings)?;
    match pool.connect_with(opts.clone()).await {
        Ok(pool) => Ok(store_on(pool, settings)),
        Err(e) => Err(anyhow::anyhow!(unreachable_because(&opts, e).await)),
    }
}

/// Why the database at `opts` cannot be used, in words one can act on: the
/// host and port, and the cause. A pool only says it timed out, so the
/// cause then comes from one direct connection attempt.
async fn unreachable_because(opts: &sqlx::postgres::PgConnectOptions, e: sqlx::Error) -> String {
    use sqlx::ConnectOptions;
    let at = match opts.get_socket() {
        Some(dir) => format!("{} (socket in {})", opts.get_host(), dir.display()),
        None => format!("{}:{}", opts.get_host(), opts.get_port()),
    };
    let cause = match e {
        sqlx::Error::PoolTimedOut => match opts.connect().await {
            Ok(_) => {
                return format!("Postgres at {at} did not answer in time (pool acquire timeout)")
            }
            Err(inner) => inner,
        },
        other => other,
    };
    match cause {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => format!(
            "cannot connect to Postgres at {at}: connection refused (is PostgreSQL running \
             there, and do DATABASE_URL's host and port name it?)"
        ),
        sqlx::Error::Io(io) => format!("cannot connect to Postgres at {at}: {io}"),
        sqlx::Error::Database(db) => format!(
            "Postgres at {at} refused the connection: {} (the role and database in \
             DATABASE_URL must exist; see README.md, Running against Postgres)",
            db.message()
        ),
        other => format!("cannot connect to Postgres at {at}: {other}"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (flags, dev) = match &cli.command {
        Command::Dev(c) => (flags(Some(c), None, None), true),
        Command::Serve {
            common,
            db,
            pepper_file,
        } => (flags(Some(common), Some(db), pepper_file.clone()), false),
        Command::Migrate(db) => (flags(None, Some(db), None), false),
        remote => {
            println!("{}", remote_command(remote).await?);
            return Ok(());
        }
    };
    let settings = Settings::load(cli.config.as_deref(), &flags)?;
    settings.validate()?;
    let tracer =
        tollgate::telemetry::init(&settings.log_level, settings.log_format, settings.otlp()?)
            .map_err(|e| anyhow::anyhow!("configuration field {e}"))?;
    let result = serve_or_migrate(cli, settings, dev).await;
    if let Some(t) = tracer {
        // Flush spans still batched; the exporter runs on its own thread.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    result
}

async fn serve_or_migrate(cli: Cli, mut settings: Settings, dev: bool) -> anyhow::Result<()> {
    if let Command::Migrate(_) = cli.command {
        let store = connect(&settings).await?;
        let newer = store.migrate().await.context("migration failed")?;
        note_newer_migrations(&newer);
        tracing::info!("migrations applied");
        return Ok(());
    }

    if let Some(addr) = settings.metrics_listen {
        tollgate::telemetry::install_metrics(addr)
            .map_err(|e| anyhow::anyhow!("configuration field `metrics_listen`: {e}"))?;
        tracing::info!(%addr, "metrics on /metrics");
    }
    let profile = Arc::new(settings.load_profile()?);
    let mut generated_token = None;
    if dev && settings.operator_token.is_none() && settings.operator_token_file.is_none() {
        let token = random_secret();
        settings.operator_token = Some(SecretString::from(token.clone()));
        generated_token = Some(token);
    }
    let [operator_token, gateway_token, console_backend_token] = settings.load_caller_tokens()?;
    if operator_token.is_none() {
        tracing::warn!("no operator token configured: every management call will be refused");
    }
    // Start-up migrations run beside the server (health NOT_SERVING until
    // they are done), so a pod whose database is down still answers its
    // liveness probe; a migration that fails for good stops the process.
    let (migrated, ready_gate) = tokio::sync::watch::channel(false);
    let mut migrations = None;
    let (store, peppers): (Arc<dyn Store>, Peppers) = if dev {
        // Dev keys live only in memory, so a per-run random pepper is right.
        let pepper = Pepper::new(1, random_secret().into_bytes()).expect("64 bytes");
        (
            Arc::new(MemoryStore::new()),
            Peppers::new(pepper, vec![]).expect("one pepper"),
        )
    } else {
        let peppers = settings.load_peppers()?;
        let store = Arc::new(connect_lazy(&settings)?);
        if settings.database.migrate_on_start {
            let store = store.clone();
            migrations = Some(tokio::spawn(async move {
                migrate_with_retry(&store).await?;
                let _ = migrated.send(true);
                anyhow::Ok(())
            }));
        }
        (store, peppers)
    };

    let tls = match settings.tls.clone() {
        Some(t) => Some(tollgate::tls::Reloading::start(t)?),
        None => None,
    };
    let dashboard = Dashboard::configure(&settings.jwt, &store, dev)?;
    let revocation_events = settings
        .load_revocation_events()?
        .map(|w| Arc::new(w) as Arc<dyn tollgate::manage::revocation_events::RevocationEvents>);
    let listener = TcpListener::bind(settings.listen).await.with_context(|| {
        format!(
            "configuration field `listen`: cannot bind {}",
            settings.listen
        )
    })?;
    let running = app::start(
        Parts {
            profile: profile.clone(),
            peppers,
            store,
            operator_token,
            guard: app::GuardParts {
                gateway_token,
                console_backend_token,
                management: settings.management,
            },
            dashboard,
            cache: settings.cache.clone(),
            max_message_bytes: settings.max_message_bytes,
            last_used_flush: Duration::from_secs(settings.last_used_flush_seconds),
            shutdown_grace: Duration::from_secs(settings.shutdown_grace_seconds),
            tls,
            clock: Clock::system(),
            envoy: settings.envoy.clone(),
            rate_shares: settings.rate_shares.clone(),
            ready_gate: migrations.is_some().then_some(ready_gate),
            replicas: settings.replicas,
            revocation: settings.revocation,
            leak_reports: settings.leak_reports.clone(),
            revocation_events,
            connection_workers: cli.connection_workers(),
            max_connections: settings.max_connections,
        },
        listener,
    )
    .await?;
    let addr = running.local_addr();
    tracing::info!(%addr, profile = %profile.name, "tollgate listening");
    let mut running = running;
    if let Some(listen) = settings.forward_auth.listen {
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!("configuration field `forward_auth.listen`: cannot bind {listen}")
        })?;
        let tls = match settings.forward_auth.tls.clone() {
            Some(t) => Some(tollgate::tls::Reloading::start(t)?),
            None => None,
        };
        let secret = settings.load_forward_auth_secret()?;
        let addr = running.serve_forward_auth(
            listener,
            secret,
            tls,
            settings.forward_auth.max_connections,
        )?;
        tracing::info!(%addr, "forward-auth (NGINX auth_request, Traefik ForwardAuth) listening");
    }

    if dev {
        let tenant = running
            .manager()
            .create_tenant(CreateTenantInput {
                tenant_id: "demo".into(),
                name: "Demo tenant".into(),
                ..Default::default()
            })
            .await?;
        let key = running
            .manager()
            .create_key(CreateKeyInput {
                tenant_id: tenant.id.to_string(),
                name: "demo key".into(),
                ..Default::default()
            })
            .await?;
        print_dev_banner(
            addr,
            generated_token.as_deref(),
            tenant.id.as_str(),
            key.secret.expose(),
        );
    }
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let migration_failed = async move {
        let failure = match migrations {
            None => return std::future::pending().await,
            Some(m) => match m.await {
                Ok(Ok(())) => return std::future::pending().await,
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!(e).context("migration task"),
            },
        };
        let _ = failed_tx.send(failure);
    };
    running
        .serve_until(async {
            tokio::select! {
                () = shutdown_signal() => {}
                () = migration_failed => {}
            }
        })
        .await?;
    match failed_rx.await {
        Ok(e) => Err(e),
        Err(_) => Ok(()),
    }
}

/// The dev banner: ready-to-paste `export` lines and commands using them
/// (README.md's examples assume exactly these variables).
fn print_dev_banner(addr: std::net::SocketAddr, token: Option<&str>, tenant: &str, key: &str) {
    let token_line = match token {
        Some(t) => format!("export T={t}"),
        // A configured token is the operator's secret: not printed.
        None => "export T=\"$TOLLGATE_OPERATOR_TOKEN\"   # the operator token you configured"
            .to_string(),
    };
    println!(
        "\nTollgate dev mode: in-memory store, default profile, listening on {addr}\n\
         Demo tenant `{tenant}`; its API key (K) is shown once, here. Console messages\n\
         (email verification and password reset tokens) are printed here too.\n\
         Paste these lines into another shell:\n\n\
         export A={addr}\n\
         {token_line}\n\
         export K={key}\n\
         export H=\"authorization: Bearer $T\"\n\n\
         Then try (README.md has more):\n\
         grpcurl -plaintext -d \"{{\\\"api_key\\\": \\\"$K\\\"}}\" $A tollgate.v1.AuthService/Authenticate\n\
         grpcurl -plaintext -emit-defaults -d \"{{\\\"api_key\\\": \\\"$K\\\", \\\"dry_run\\\": true}}\" $A tollgate.v1.AuthService/CheckQuota\n\
         grpcurl -plaintext -H \"$H\" -d '{{\"tenant_id\": \"{tenant}\", \"name\": \"second\"}}' $A tollgate.v1.AuthService/CreateKey\n"
    );
}

fn main() -> ExitCode {
    tollgate::memory::set_give_back(give_back_freed);
    let cli = Cli::parse();
    let mut builder = match cli.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if cli.worker_threads > 1 {
        builder.worker_threads(cli.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
