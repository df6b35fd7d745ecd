//! The `tollgate` binary as an operator runs it: `dev`, `serve`, `migrate`,
//! and configuration mistakes that stop it at start with the field named.
//!
//! The child never inherits the outer environment (no stray `TOLLGATE_*` or
//! `DATABASE_URL`): only `PATH` and `HOME` pass through, plus what a test sets.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};

use common::{OPERATOR_TOKEN, PEPPER};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::mpsc;
use tollgate::grpc::pb;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// `tollgate <command line>` (split at spaces) with a clean environment.
fn tollgate(command_line: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(command_line.split_whitespace())
        .env_clear()
        .env("NO_COLOR", "1");
    for var in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    cmd
}

/// A config file holding `toml`, unique to this call.
fn config_file(toml: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tg-cli-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, toml).unwrap();
    path
}

/// The URL of database `name` on the server `DATABASE_URL` points at.
fn url_of_database(name: &str) -> String {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for these tests");
    let (url, query) = url.split_once('?').unwrap_or((&url, ""));
    let authority = url.find("://").expect("a URL") + 3;
    let base = match url[authority..].find('/') {
        Some(slash) => &url[..authority + slash],
        None => url,
    };
    match query {
        "" => format!("{base}/{name}"),
        q => format!("{base}/{name}?{q}"),
    }
}

/// The longest any test here waits for the child.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A running child whose stdout and stderr arrive line by line.
struct Process {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far, for assertions and failure messages.
    seen: Vec<String>,
}

impl Process {
    fn spawn(cmd: &mut Command) -> Process {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [stdout, stderr] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Process {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line (of either stream) for which `pick` returns a value.
    /// Panics with everything read if the process closes its output first,
    /// or prints no such line within 60 s.
    async fn read_until<T>(&mut self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let read = async {
            while let Some(line) = self.lines.recv().await {
                let found = pick(&line);
                self.seen.push(line);
                if found.is_some() {
                    return found;
                }
            }
            None
        };
        match tokio::time::timeout(WAIT, read).await {
            Ok(Some(found)) => found,
            Ok(None) => panic!("tollgate closed its output; it printed:\n{}", self.output()),
            Err(_) => panic!(
                "no such line in {WAIT:?}; tollgate printed:\n{}",
                self.output()
            ),
        }
    }

    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success(), "kill -TERM {pid} failed");
    }

    /// Reads the remaining output, then the exit status (within 60 s).
    async fn exit_status(&mut self) -> ExitStatus {
        let rest = async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line);
            }
        };
        if tokio::time::timeout(WAIT, rest).await.is_err() {
            panic!(
                "tollgate did not exit in {WAIT:?}; it printed:\n{}",
                self.output()
            );
        }
        self.child.wait().unwrap()
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn after<'a>(line: &'a str, label: &str) -> Option<&'a str> {
    line.split_once(label).map(|(_, rest)| rest.trim())
}

#[tokio::test]
async fn dev_mode_prints_a_working_key_and_operator_token() {
    let mut dev = Process::spawn(&mut tollgate("dev --listen 127.0.0.1:0"));
    let addr: SocketAddr = dev
        .read_until(|l| after(l, "listening on ").map(|a| a.parse().unwrap()))
        .await;
    let token = dev
        .read_until(|l| l.strip_prefix("export T=").map(str::to_owned))
        .await;
    let key = dev
        .read_until(|l| l.strip_prefix("export K=").map(str::to_owned))
        .await;
    assert!(token.len() >= 16, "{token:?}");
    assert!(key.starts_with("tg_live_"), "{key:?}");

    let mut auth = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = auth
        .authenticate(pb::AuthenticateRequest {
            api_key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed, "{r:?}");
    assert_eq!(r.principal.unwrap().tenant_id, "demo");

    let second_key = || pb::CreateKeyRequest {
        tenant_id: "demo".into(),
        name: "second".into(),
        ..Default::default()
    };
    let refused = auth.create_key(second_key()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let mut with_token = tonic::Request::new(second_key());
    let bearer = format!("Bearer {token}").parse().unwrap();
    with_token.metadata_mut().insert("authorization", bearer);
    let created = auth.create_key(with_token).await.unwrap().into_inner();
    assert!(created.api_key.starts_with("tg_live_"));
    assert_eq!(created.key.unwrap().tenant_id, "demo");

    // The banner is the only place the secrets appear: not in the log lines.
    let logs: Vec<&String> = dev.seen.iter().filter(|l| l.contains("INFO")).collect();
    assert!(!logs.is_empty(), "expected log lines:\n{}", dev.output());
    assert!(
        logs.iter()
            .all(|l| !l.contains(&key) && !l.contains(&token)),
        "{logs:?}"
    );
}

/// Runs `cmd`, which must exit non-zero before it listens; returns its output.
/// If it starts listening instead, fails at once (and kills it on drop).
async fn refused(cmd: &mut Command) -> String {
    let mut process = Process::spawn(cmd);
    while let Some(line) = process.lines.recv().await {
        let started = line.contains("tollgate listening");
        process.seen.push(line);
        assert!(!started, "tollgate started anyway:\n{}", process.output());
    }
    let status = process.child.wait().unwrap();
    assert!(!status.success(), "{status:?}\n{}", process.output());
    process.output()
}

#[tokio::test]
async fn an_unparseable_listen_address_in_the_config_file_is_refused_by_name() {
    let file = config_file("listen = \"nope\"\n");
    let stderr = refused(tollgate("dev").arg("--config").arg(&file)).await;
    assert!(stderr.contains("listen"), "{stderr}");
    std::fs::remove_file(file).unwrap();
}

/// Upper-case `TOLLGATE_*` names are the documented form (they were once
/// silently ignored, so this would start instead of failing).
#[tokio::test]
async fn a_bad_value_in_the_environment_is_refused_by_name() {
    let mut cmd = tollgate("dev --listen 127.0.0.1:0");
    let stderr = refused(cmd.env("TOLLGATE_MAX_MESSAGE_BYTES", "10")).await;
    assert!(stderr.contains("max_message_bytes"), "{stderr}");
}

#[tokio::test]
async fn serve_without_a_pepper_is_refused_by_name() {
    let url = url_of_database("postgres");
    let mut cmd = tollgate(&format!("serve --listen 127.0.0.1:0 --database-url {url}"));
    let stderr = refused(&mut cmd).await;
    assert!(stderr.contains("`pepper`"), "{stderr}");
}

#[tokio::test]
async fn a_misspelt_cache_setting_is_refused_by_name() {
    let file = config_file("[cache]\nttl_secs = 30\n");
    let mut cmd = tollgate("dev --listen 127.0.0.1:0 --config");
    let stderr = refused(cmd.arg(&file)).await;
    assert!(stderr.contains("ttl_secs"), "{stderr}");
    std::fs::remove_file(file).unwrap();
}

#[tokio::test]
async fn a_short_operator_token_is_refused_by_name_without_echoing_it() {
    let mut cmd = tollgate("dev --listen 127.0.0.1:0 --operator-token tiny-tok");
    let stderr = refused(&mut cmd).await;
    assert!(stderr.contains("`operator_token`"), "{stderr}");
    assert!(!stderr.contains("tiny-tok"), "{stderr}");
}

async fn public_tables(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A pool on an empty database, and `tollgate migrate` run on it.
async fn unmigrated(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) -> (sqlx::PgPool, impl Fn() -> std::process::Output) {
    let pool = pool_opts.connect_with(conn.clone()).await.unwrap();
    let url = url_of_database(conn.get_database().unwrap());
    let migrate = move || {
        tollgate(&format!("migrate --database-url {url}"))
            .output()
            .unwrap()
    };
    (pool, migrate)
}

#[sqlx::test(migrations = false)]
async fn migrate_creates_the_schema_and_running_it_again_changes_nothing(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (pool, migrate) = unmigrated(pool_opts, conn).await;
    let applied = "SELECT count(*) FROM _sqlx_migrations WHERE success";
    assert_eq!(public_tables(&pool).await, Vec::<String>::new());

    let first = migrate();
    assert!(first.status.success(), "{first:?}");
    let tables = public_tables(&pool).await;
    for table in ["tenants", "api_keys"] {
        assert!(tables.contains(&table.to_string()), "{tables:?}");
    }
    let migrations: i64 = sqlx::query_scalar(applied).fetch_one(&pool).await.unwrap();
    assert!(migrations >= 1);

    let again = migrate();
    assert!(again.status.success(), "{again:?}");
    // Postgres' NOTICEs ("relation \"_sqlx_migrations\" already exists,
    // skipping") are not news at INFO.
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("migrations applied"), "{said}");
    assert!(!said.contains("already exists"), "{said}");
    assert_eq!(public_tables(&pool).await, tables);
    let after: i64 = sqlx::query_scalar(applied).fetch_one(&pool).await.unwrap();
    assert_eq!(after, migrations);
}

#[sqlx::test(migrations = false)]
async fn a_database_a_newer_release_migrated_still_runs_this_release(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // A rolling upgrade's new replicas migrated; an old replica restarts
    // (or a rollback returns to the old release) on the newer schema.
    let (pool, migrate) = unmigrated(pool_opts, conn).await;
    assert!(migrate().status.success());
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99991231000001, 'from a newer release', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let older = migrate();
    assert!(older.status.success(), "{older:?}");
    let said = String::from_utf8_lossy(&older.stderr);
    assert!(
        said.contains("a newer release applied") && said.contains("99991231000001"),
        "{said}"
    );

    // A migration this release knows, changed since it was applied, still
    // stops it.
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = '\\x00' \
         WHERE version = (SELECT min(version) FROM _sqlx_migrations)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let changed = migrate();
    assert!(!changed.status.success(), "{changed:?}");
    assert!(
        String::from_utf8_lossy(&changed.stderr).contains("migration failed"),
        "{changed:?}"
    );
}

/// `tollgate serve` on `database_url` (JSON logs), once it listens, and a
/// health client on it.
async fn serve_listening(database_url: &str) -> (Process, HealthClient<tonic::transport::Channel>) {
    let (serve, channel) = serve_channel(database_url).await;
    (serve, HealthClient::new(channel))
}

/// `tollgate serve` on `database_url`, and a channel to it.
async fn serve_channel(database_url: &str) -> (Process, tonic::transport::Channel) {
    let pepper = std::str::from_utf8(PEPPER).unwrap();
    let mut serve = Process::spawn(
        tollgate(&format!(
            "serve --listen 127.0.0.1:0 --database-url {database_url}"
        ))
        .env("TOLLGATE_PEPPER", pepper)
        .env("TOLLGATE_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("TOLLGATE_LOG_FORMAT", "json"),
    );
    // The log line announcing the listener carries the bound address.
    let addr: SocketAddr = serve
        .read_until(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = &v["fields"];
            (fields["message"] == "tollgate listening")
                .then(|| fields["addr"].as_str().unwrap().parse().unwrap())
        })
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (serve, channel)
}

#[tokio::test]
async fn migrate_against_a_refused_port_says_where_and_that_the_connection_was_refused() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = refused(tollgate("migrate").env(
        "DATABASE_URL",
        format!("postgres://tollgate@{closed}/tollgate"),
    ))
    .await;
    assert!(
        output.contains(&format!(
            "cannot connect to Postgres at {closed}: connection refused"
        )),
        "{output}"
    );
    assert!(!output.contains("pool timed out"), "{output}");
}

#[sqlx::test(migrations = false)]
async fn migrate_with_a_missing_role_says_the_role_does_not_exist(
    _pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let url = format!(
        "postgres://no_such_role@{}:{}/{}",
        conn.get_host(),
        conn.get_port(),
        conn.get_database().unwrap_or("postgres")
    );
    let output = refused(tollgate("migrate").env("DATABASE_URL", url)).await;
    assert!(
        output.contains(r#"role "no_such_role" does not exist"#),
        "{output}"
    );
    assert!(output.contains("must exist"), "{output}");
}

/// `future`, or a failure naming `what` after [`WAIT`].
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Postgres "comes up" on `port`: connections to it are forwarded to the
/// server `conn` is on, until the task is dropped.
async fn postgres_comes_up_on(
    port: SocketAddr,
    conn: &PgConnectOptions,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(port).await.unwrap();
    let target = common::pg_addr(conn);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

#[sqlx::test(migrations = false)]
async fn serve_with_postgres_down_listens_alive_but_not_ready_while_migrations_retry(
    _pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // The empty database's server at a port nothing listens on (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut url = reqwest::Url::parse(&url_of_database(conn.get_database().unwrap())).unwrap();
    url.set_ip_host(port.ip()).unwrap();
    url.set_port(Some(port.port())).unwrap();
    let (mut serve, mut health) = serve_listening(url.as_str()).await;
    let retries = |serve: &Process| {
        serve
            .seen
            .iter()
            .filter(|l| l.contains("database unreachable; retrying migrations"))
            .count()
    };
    // The migrations fail and are retried (the log says so, with a delay).
    while retries(&serve) < 2 {
        serve
            .read_until(|l| l.contains("retrying").then_some(()))
            .await;
    }
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    // Meanwhile it is alive but not ready.
    let mut readiness = health.watch(status("")).await.unwrap().into_inner();
    let first = within("readiness", readiness.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.status,
        ServingStatus::NotServing as i32,
        "{}",
        serve.output()
    );
    let live = health.check(status("liveness")).await.unwrap().into_inner();
    assert_eq!(
        live.status,
        ServingStatus::Serving as i32,
        "{}",
        serve.output()
    );
    assert_eq!(
        public_tables(&common::pool(&conn).await).await,
        Vec::<String>::new()
    );

    // Postgres comes up: the next retry migrates, and readiness turns
    // SERVING without a restart.
    let _up = postgres_comes_up_on(port, &conn).await;
    let update = within("SERVING", async {
        loop {
            let update = readiness
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            if update.status != ServingStatus::NotServing as i32 {
                return update;
            }
        }
    })
    .await;
    assert_eq!(
        update.status,
        ServingStatus::Serving as i32,
        "{}",
        serve.output()
    );
    assert!(
        public_tables(&common::pool(&conn).await)
            .await
            .contains(&"api_keys".to_string()),
        "migrated"
    );
    let live = health.check(status("liveness")).await.unwrap().into_inner();
    assert_eq!(live.status, ServingStatus::Serving as i32);
}

#[sqlx::test(migrations = false)]
async fn serve_becomes_healthy_on_postgres_then_on_sigterm_reports_not_serving_and_exits_cleanly(
    _pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // An empty database: `serve` applies the migrations itself on start.
    let url = url_of_database(conn.get_database().unwrap());
    let (mut serve, mut health) = serve_listening(&url).await;
    let mut updates = health
        .watch(HealthCheckRequest {
            service: "tollgate.v1.AuthService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || {
        let update = within("a health update", updates.message()).await.unwrap();
        update.expect("health stream stays open").status
    };
    while next_status().await != ServingStatus::Serving as i32 {}

    // Watchers learn at once that this replica is leaving, then it exits.
    serve.sigterm();
    while next_status().await != ServingStatus::NotServing as i32 {}
    drop((updates, health));
    let status = serve.exit_status().await;
    assert!(status.success(), "{status:?}; output:\n{}", serve.output());
    let output = serve.output();
    assert!(output.contains("shutting down"), "{output}");
    let pepper = std::str::from_utf8(PEPPER).unwrap();
    assert!(!output.contains(pepper) && !output.contains(OPERATOR_TOKEN));
}

/// A pooler (PgBouncer, HAProxy) in front of a restarting Postgres accepts
/// connections and closes them at once: sqlx reports a protocol error, not
/// a refused connection. `serve` used to exit ("migration failed"); it
/// retries, as for any unreachable database.
#[tokio::test]
async fn serve_behind_a_pooler_that_accepts_and_closes_retries_migrations_instead_of_exiting() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let (mut serve, mut health) =
        serve_listening(&format!("postgres://tollgate@{addr}/tollgate")).await;
    for _ in 0..2 {
        serve
            .read_until(|l| {
                l.contains("database unreachable; retrying migrations")
                    .then_some(())
            })
            .await;
    }
    let live = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        live.status,
        ServingStatus::Serving as i32,
        "{}",
        serve.output()
    );
    assert!(
        !serve.output().contains("migration failed"),
        "{}",
        serve.output()
    );
}

/// The in-process shutdown test cannot show this (tonic serves each
/// connection in a task that outlives the server's), so the real binary:
/// a SIGTERM while a call waits on the database turns readiness
/// NOT_SERVING at once, lets the call commit and answer, and only then
/// does the process exit.
#[sqlx::test]
async fn on_sigterm_a_call_in_flight_commits_and_answers_before_the_process_exits(
    pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let url = url_of_database(conn.get_database().unwrap());
    let (mut serve, channel) = serve_channel(&url).await;
    let mut health = HealthClient::new(channel.clone());
    let mut updates = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || {
        let update = within("a health update", updates.message()).await.unwrap();
        update.expect("health stream stays open").status
    };
    while next_status().await != ServingStatus::Serving as i32 {}
    let mut tenants = pb::tenant_service_client::TenantServiceClient::new(channel.clone());
    tenants
        .create_tenant(common::op(pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            name: "Acme".into(),
            plan: "pro".into(),
            subscription_status: "active".into(),
            ..Default::default()
        }))
        .await
        .unwrap();

    // Hold the tenant row: the next CreateKey waits inside its transaction.
    let db = pool.connect_with(conn.clone()).await.unwrap();
    let mut lock = db.begin().await.unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *lock)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM tenants WHERE tenant_id = 'acme' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut auth = AuthServiceClient::new(channel);
    let in_flight = tokio::spawn(async move {
        auth.create_key(common::op(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "in flight".into(),
            ..Default::default()
        }))
        .await
    });
    let blocked_by_us = "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))";
    within("CreateKey waiting on our lock", async {
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
    .await;

    serve.sigterm();
    while next_status().await != ServingStatus::NotServing as i32 {}
    lock.rollback().await.unwrap();
    let created = within("the call in flight", in_flight)
        .await
        .unwrap()
        .expect("the call in flight was answered, not cut")
        .into_inner();
    assert!(!created.api_key.is_empty());
    let status = serve.exit_status().await;
    assert!(status.success(), "{status:?}; output:\n{}", serve.output());
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE name = 'in flight'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the key was committed");
}

/// A minimal OTLP/HTTP collector: answers 200 to every POST and hands over
/// each request (head and body) it received.
async fn otlp_collector() -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_lowercase();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= head_end + 4 + length {
                        break;
                    }
                }
                // Hand it over before answering: once the exporter has its
                // 200, the request is already here.
                let _ = tx.send(request).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn with_an_otlp_endpoint_request_spans_are_exported_and_flushed_on_sigterm() {
    let (collector, mut received) = otlp_collector().await;
    let mut cmd = tollgate("dev --listen 127.0.0.1:0");
    cmd.env(
        "TOLLGATE_OTLP_ENDPOINT",
        format!("http://{collector}/v1/traces"),
    );
    let mut dev = Process::spawn(&mut cmd);
    let addr: SocketAddr = dev
        .read_until(|l| after(l, "listening on ").map(|a| a.parse().unwrap()))
        .await;
    let key = dev
        .read_until(|l| l.strip_prefix("export K=").map(str::to_owned))
        .await;
    let mut auth = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = auth
        .authenticate(pb::AuthenticateRequest {
            api_key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed);
    dev.sigterm();
    let status = dev.exit_status().await;
    assert!(status.success(), "{}", dev.output());
    // The batch is flushed at shutdown at the latest.
    let mut exported = Vec::new();
    while let Ok(request) = received.try_recv() {
        exported.extend(request);
    }
    let text = String::from_utf8_lossy(&exported);
    assert!(text.starts_with("POST /v1/traces"), "{text}");
    assert!(text.contains("application/x-protobuf"));
    // The resource attribute itself, as OTLP encodes it ("tollgate" alone
    // is also the instrumentation scope's name).
    assert!(
        holds_attribute(&exported, "service.name", "tollgate"),
        "the service name is exported: {text}"
    );
    assert!(
        !holds_attribute(&exported, "service.name", "unknown_service"),
        "{text}"
    );
    assert!(
        text.contains("authenticate"),
        "the request's span is exported"
    );
    assert!(!text.contains(&key), "no secret in exported spans");
}

/// Whether `body` holds the OTLP `KeyValue { key, value: AnyValue {
/// string_value } }` in its protobuf encoding (field 1: key, field 2: the
/// value, whose field 1 is the string; short strings, one-byte lengths).
fn holds_attribute(body: &[u8], key: &str, value: &str) -> bool {
    assert!(key.len() < 128 && value.len() + 2 < 128);
    let mut encoded = vec![0x0a, key.len() as u8];
    encoded.extend_from_slice(key.as_bytes());
    encoded.extend_from_slice(&[0x12, value.len() as u8 + 2, 0x0a, value.len() as u8]);
    encoded.extend_from_slice(value.as_bytes());
    body.windows(encoded.len()).any(|w| w == encoded.as_slice())
}

/// Runs an operator command against `addr` with `token` in the environment;
/// returns (success, stdout, stderr).
fn operator_cli(addr: SocketAddr, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tollgate("");
    cmd.args(args).env("TOLLGATE_ADDR", addr.to_string());
    if let Some(token) = token {
        cmd.env("TOLLGATE_OPERATOR_TOKEN", token);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: not JSON:\n{stdout}"))
}

/// Routine operations took grpcurl and proto knowledge: `tollgate tenants`,
/// `keys` and `users` call a running server (address and operator token from
/// the environment or flags), with tables for people and `--json` for
/// scripts; a key's secret is printed once, to stdout only; bad input is
/// refused naming the field, and nothing changes without the token.
#[sqlx::test(migrations = false)]
async fn the_operator_cli_manages_tenants_keys_and_users_on_a_running_server(
    _pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // The console runs (for `users`) once it has a signing key.
    use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
    let pem = ed25519_dalek::SigningKey::from_bytes(&[7; 32])
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap();
    let key_file = config_file(&pem);
    let config = config_file(&format!(
        "[[jwt.console.signing_keys]]\nkid = \"k1\"\nprivate_key_file = {:?}\n",
        key_file.display().to_string()
    ));
    let url = url_of_database(conn.get_database().unwrap());
    let mut serve = Process::spawn(
        tollgate("serve --listen 127.0.0.1:0 --database-url")
            .arg(&url)
            .arg("--config")
            .arg(&config)
            .env("TOLLGATE_PEPPER", std::str::from_utf8(PEPPER).unwrap())
            .env("TOLLGATE_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("TOLLGATE_LOG_FORMAT", "json"),
    );
    let addr: SocketAddr = serve
        .read_until(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["fields"]["message"] == "tollgate listening")
                .then(|| v["fields"]["addr"].as_str()?.parse().ok())?
        })
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut ready = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    while ready.message().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}
    let token = Some(OPERATOR_TOKEN);
    let run = |args: &[&str]| operator_cli(addr, token, args);

    let (ok, out, err) = run(&["health"]);
    assert!(ok && out.trim() == "SERVING", "{out}{err}");

    // Tenants: a table for people, JSON for scripts.
    let (ok, out, err) = run(&[
        "tenants", "create", "--id", "acme", "--name", "Acme Inc", "--plan", "pro",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("TENANT ID") && lines[0].contains("PLAN"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("acme ") && lines[1].contains("Acme Inc"),
        "{out}"
    );
    let (ok, out, err) = run(&["tenants", "get", "acme", "--json"]);
    assert!(ok, "{err}");
    let t = json_of(&out);
    assert_eq!(
        (t["tenant_id"].as_str(), t["plan"].as_str()),
        (Some("acme"), Some("pro"))
    );
    let (ok, out, _) = run(&["tenants", "list", "--json"]);
    assert!(ok);
    assert_eq!(json_of(&out)["tenants"][0]["tenant_id"], "acme");

    // A key: its secret once, on stdout, and it works.
    let (ok, out, err) = run(&[
        "keys", "create", "--tenant", "acme", "--name", "ci", "--json",
    ]);
    assert!(ok, "{err}");
    let created = json_of(&out);
    let secret = created["api_key"].as_str().unwrap().to_owned();
    let key_id = created["key"]["key_id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tg_live_"), "{out}");
    assert!(!err.contains(&secret), "the secret is on stdout only");
    let mut auth = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut decide = async |key: &str| {
        auth.authenticate(pb::AuthenticateRequest {
            api_key: key.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    };
    assert!(decide(&secret).await.allowed);
    let (ok, out, err) = run(&["keys", "create", "--tenant", "acme", "--name", "people"]);
    assert!(ok, "{err}");
    let shown = out.lines().last().unwrap();
    assert!(
        shown.starts_with("tg_live_") && decide(shown).await.allowed,
        "{out}"
    );

    let (ok, out, _) = run(&["keys", "list", "--tenant", "acme"]);
    assert!(
        ok && out.contains(&key_id) && out.contains("active"),
        "{out}"
    );
    assert!(!out.contains(&secret), "a listing never shows a secret");
    let (ok, out, _) = run(&["keys", "get", &key_id, "--json"]);
    assert!(ok && !out.contains(&secret));
    assert_eq!(json_of(&out)["name"], "ci");

    // Rotate (the old key refused at once), then revoke the new one.
    let (ok, out, err) = run(&["keys", "rotate", &key_id, "--grace-seconds", "0", "--json"]);
    assert!(ok, "{err}");
    let rotated = json_of(&out);
    let new_secret = rotated["api_key"].as_str().unwrap().to_owned();
    let new_id = rotated["key"]["key_id"].as_str().unwrap().to_owned();
    assert_eq!(rotated["previous_key"]["key_id"], key_id.as_str());
    assert!(decide(&new_secret).await.allowed);
    assert!(!decide(&secret).await.allowed);
    let (ok, out, _) = run(&["keys", "revoke", &new_id, "--reason", "leaked", "--json"]);
    assert!(ok);
    assert_eq!(json_of(&out)["revoke_reason"], "leaked");
    assert!(!decide(&new_secret).await.allowed);
    // The rotated key has expired; only the revoked one is left out.
    let (_, out, _) = run(&["keys", "list", "--tenant", "acme", "--json"]);
    assert_eq!(json_of(&out)["keys"].as_array().unwrap().len(), 2, "{out}");
    let (_, out, _) = run(&["keys", "list", "--tenant", "acme"]);
    assert!(out.contains("expired") && !out.contains("revoked"), "{out}");
    let (_, out, _) = run(&["keys", "list", "--tenant", "acme", "--all", "--json"]);
    assert_eq!(json_of(&out)["keys"].as_array().unwrap().len(), 3, "{out}");

    // A tenant's plan and subscription.
    let (ok, out, err) = run(&[
        "tenants",
        "update",
        "acme",
        "--plan",
        "enterprise",
        "--status",
        "past_due",
        "--json",
    ]);
    assert!(ok, "{err}");
    let t = json_of(&out);
    assert_eq!(
        (
            t["plan"].as_str(),
            t["subscription_status"].as_str(),
            t["name"].as_str()
        ),
        (Some("enterprise"), Some("past_due"), Some("Acme Inc"))
    );
    let (ok, out, err) = run(&["tenants", "update", "acme"]);
    assert!(
        !ok && out.is_empty() && err.contains("nothing to change"),
        "{err}"
    );

    // Console users: one added by the operator, then changed and deleted.
    let (ok, out, err) = run(&["users", "list", "--tenant", "acme", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json_of(&out), serde_json::json!({"users": []}));
    // `users create` reads the password from a file, never from argv, and
    // never prints it.
    let password = "correct-horse-battery-staple-42";
    let password_file = config_file(&format!("{password}\n"));
    let empty_file = config_file("");
    let (ok, out, err) = run(&[
        "users",
        "create",
        "--tenant",
        "acme",
        "--email",
        "carol@example.com",
        "--role",
        "viewer",
        "--password-file",
        empty_file.to_str().unwrap(),
    ]);
    assert!(
        !ok && out.is_empty() && err.contains("--password-file: the password is empty"),
        "{err}"
    );
    for (email, role) in [
        ("alice@example.com", "owner"),
        ("bob@example.com", "developer"),
    ] {
        let (ok, out, err) = run(&[
            "users",
            "create",
            "--tenant",
            "acme",
            "--email",
            email,
            "--role",
            role,
            "--password-file",
            password_file.to_str().unwrap(),
        ]);
        assert!(ok && out.contains(email), "{out}{err}");
        assert!(
            !out.contains(password) && !err.contains(password),
            "{out}{err}"
        );
    }
    let (ok, out, _) = run(&["users", "list", "--tenant", "acme"]);
    assert!(
        ok && out.starts_with("USER ID")
            && out.contains("alice@example.com")
            && out.contains("bob@example.com")
            && !out.contains("carol@example.com"),
        "{out}"
    );
    let (_, out, _) = run(&["users", "list", "--tenant", "acme", "--json"]);
    let users = json_of(&out);
    let bob = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "bob@example.com");
    let user_id = bob.unwrap()["user_id"].as_str().unwrap().to_owned();
    let (ok, out, err) = run(&[
        "users",
        "update",
        "--tenant",
        "acme",
        &user_id,
        "--role",
        "admin",
        "--disabled",
        "true",
        "--json",
    ]);
    assert!(ok, "{err}");
    let u = json_of(&out);
    assert_eq!(
        (u["role"].as_str(), u["disabled"].as_bool()),
        (Some("admin"), Some(true))
    );
    let (ok, _, err) = run(&["users", "delete", "--tenant", "acme", &user_id]);
    assert!(ok, "{err}");
    let (_, out, _) = run(&["users", "list", "--tenant", "acme", "--json"]);
    assert_eq!(json_of(&out)["users"].as_array().unwrap().len(), 1, "{out}");
    assert!(!out.contains("bob@example.com"), "{out}");

    // Refusals: named fields, a nonzero exit, nothing on stdout, no change.
    let (ok, out, err) = run(&["keys", "create", "--tenant", "acme", "--name", ""]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(
        err.contains("InvalidArgument") && err.contains("name:"),
        "{err}"
    );
    let (ok, out, err) = operator_cli(
        addr,
        None,
        &["tenants", "create", "--id", "evil", "--name", "E"],
    );
    assert!(
        !ok && out.is_empty() && err.contains("TOLLGATE_OPERATOR_TOKEN"),
        "{err}"
    );
    let wrong = "not-the-operator-token-0123456789";
    let (ok, _, err) = operator_cli(
        addr,
        Some(wrong),
        &["tenants", "create", "--id", "evil", "--name", "E"],
    );
    assert!(
        !ok && err.contains("Unauthenticated") && !err.contains(wrong),
        "{err}"
    );
    let (_, out, _) = run(&["tenants", "list", "--json"]);
    assert_eq!(
        json_of(&out)["tenants"].as_array().unwrap().len(),
        1,
        "{out}"
    );

    // Flags win over the environment; an unreachable address says so.
    let (ok, _, err) = operator_cli(addr, token, &["tenants", "list", "--addr", "127.0.0.1:1"]);
    assert!(!ok && err.contains("cannot reach 127.0.0.1:1"), "{err}");
    drop(serve);
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(key_file);
}

/// A real OTLP/gRPC collector (opentelemetry-proto's `TraceService` on
/// tonic) that hands over every export request it receives.
async fn otlp_grpc_collector() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    >,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    struct Collector(tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>);
    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

/// OTLP export was HTTP only, while collectors listen for gRPC on 4317 by
/// default: with `otlp_protocol = "grpc"` spans go to a real gRPC collector
/// (TraceService/Export), carry the service name, and are flushed on SIGTERM.
#[tokio::test]
async fn with_an_otlp_grpc_endpoint_request_spans_are_exported_over_grpc() {
    let (collector, mut received) = otlp_grpc_collector().await;
    let mut cmd = tollgate("dev --listen 127.0.0.1:0");
    cmd.env("TOLLGATE_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("TOLLGATE_OTLP_PROTOCOL", "grpc");
    let mut dev = Process::spawn(&mut cmd);
    let addr: SocketAddr = dev
        .read_until(|l| after(l, "listening on ").map(|a| a.parse().unwrap()))
        .await;
    let key = dev
        .read_until(|l| l.strip_prefix("export K=").map(str::to_owned))
        .await;
    let mut auth = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = auth
        .authenticate(pb::AuthenticateRequest {
            api_key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed);
    dev.sigterm();
    assert!(dev.exit_status().await.success(), "{}", dev.output());

    // The batch is flushed at shutdown at the latest.
    let mut requests = Vec::new();
    while let Ok(request) = received.try_recv() {
        requests.push(request);
    }
    assert!(!requests.is_empty(), "nothing exported over gRPC");
    let services: Vec<String> = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .filter_map(|rs| rs.resource.as_ref())
        .flat_map(|res| &res.attributes)
        .filter(|kv| kv.key == "service.name")
        .map(|kv| format!("{:?}", kv.value))
        .collect();
    assert!(
        services.iter().all(|s| s.contains("tollgate")) && !services.is_empty(),
        "{services:?}"
    );
    let spans: Vec<&str> = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        spans.iter().any(|s| s.contains("authenticate")),
        "the request's span is exported: {spans:?}"
    );
    assert!(
        !format!("{requests:?}").contains(&key),
        "no secret in exported spans"
    );
}

/// Threads of process `pid` whose name starts with one of `prefixes`.
fn threads_named(pid: u32, prefixes: &[&str]) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
        .count()
}

/// Threads of process `pid` named as tokio names its runtime's threads.
fn runtime_threads(pid: u32) -> usize {
    threads_named(pid, &["tokio-rt-worker", "tokio-runtime-w"])
}

/// Connection worker threads (`--connection-workers`) of process `pid`.
fn connection_workers(pid: u32) -> usize {
    threads_named(pid, &["tollgate-conn-"])
}

/// Starts `tollgate dev` with `args` and `env`; returns it, once one
/// Authenticate with its demo key was allowed.
async fn dev_that_decides(args: &str, env: &[(&str, &str)]) -> Process {
    let mut cmd = tollgate(&format!("dev --listen 127.0.0.1:0 {args}"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut dev = Process::spawn(&mut cmd);
    let addr: SocketAddr = dev
        .read_until(|l| after(l, "listening on ").map(|a| a.parse().unwrap()))
        .await;
    let key = dev
        .read_until(|l| l.strip_prefix("export K=").map(str::to_owned))
        .await;
    let mut auth = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = auth
        .authenticate(pb::AuthenticateRequest {
            api_key: key,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed, "{args} {env:?}: {r:?}");
    dev
}

#[tokio::test]
async fn worker_threads_and_connection_workers_set_the_runtime_shape_and_each_shape_decides() {
    // 1: one current-thread runtime, so no worker threads (tokio's
    // blocking-pool threads carry the same name: compare with 3 workers),
    // and no connection workers.
    let dev = dev_that_decides("", &[("TOLLGATE_WORKER_THREADS", "1")]).await;
    let with_one = runtime_threads(dev.child.id());
    assert_eq!(connection_workers(dev.child.id()), 0);

    let dev = dev_that_decides("--worker-threads 3", &[]).await;
    let with_three = runtime_threads(dev.child.id());
    assert!(with_three >= 3, "{with_three} runtime threads");
    assert!(with_one + 2 <= with_three, "{with_one} vs {with_three}");

    // The default: one connection worker per core.
    let cores = std::thread::available_parallelism().unwrap().get();
    let dev = dev_that_decides("", &[]).await;
    assert_eq!(connection_workers(dev.child.id()), cores);
    let dev = dev_that_decides("", &[("TOLLGATE_CONNECTION_WORKERS", "3")]).await;
    assert_eq!(connection_workers(dev.child.id()), 3);
    let dev = dev_that_decides("--connection-workers 0", &[]).await;
    assert_eq!(connection_workers(dev.child.id()), 0);
}
