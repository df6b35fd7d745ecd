//! Real parts for the benchmarks: a fresh database, `tollgate serve`
//! processes on free ports, seeded tenants and keys.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::Connection;
use tokio::task::JoinSet;
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tollgate::grpc::pb::tenant_service_client::TenantServiceClient;
use tollgate::grpc::pb::{
    CreateKeyRequest, CreateTenantRequest, LimitSpec, RevokeKeyRequest, TenantOverrides,
};
use tonic::transport::Channel;
use tonic::Request;

pub const OPERATOR_TOKEN: &str = "bench-operator-token-0123456789abcdef";
pub const PEPPER: &str = "bench-pepper-0123456789abcdef0123456789abcdef";

/// Where the benchmarked processes come from (shared by every scenario).
#[derive(Debug, clap::Args)]
pub struct FixtureOpts {
    /// The `tollgate` binary [default: next to this one].
    #[arg(long)]
    pub tollgate: Option<PathBuf>,
    /// Postgres to create each run's fresh database in.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

impl FixtureOpts {
    /// A fresh, migrated database and the binary to run on it.
    pub async fn fixture(&self) -> anyhow::Result<Fixture> {
        let bin = match &self.tollgate {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no parent directory")?
                .join("tollgate"),
        };
        Fixture::new(bin, &self.database_url).await
    }
}

/// One fresh database and the `tollgate` binary to run on it.
pub struct Fixture {
    bin: PathBuf,
    database_url: String,
}

impl Fixture {
    /// Creates a fresh database next to `admin_url`'s and migrates it.
    pub async fn new(bin: PathBuf, admin_url: &str) -> anyhow::Result<Self> {
        let name = format!(
            "tollgate_bench_{}_{}",
            std::process::id(),
            chrono::Utc::now().timestamp()
        );
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        // Same server, user and options; only the database differs.
        let mut url = reqwest::Url::parse(admin_url).context("DATABASE_URL is not a URL")?;
        url.set_path(&name);
        let database_url = url.to_string();
        let fixture = Self { bin, database_url };
        let status = fixture.command(&["migrate"]).status()?;
        if !status.success() {
            bail!("tollgate migrate failed: {status}");
        }
        Ok(fixture)
    }

    /// The same database, served by another `tollgate` binary (an older
    /// build to compare with, in the same rounds).
    pub fn with_binary(&self, bin: PathBuf) -> Self {
        Self {
            bin,
            database_url: self.database_url.clone(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("TOLLGATE_PEPPER", PEPPER)
            .env("TOLLGATE_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("TOLLGATE_LOG_LEVEL", "warn")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `tollgate serve` with `env` added, and waits until it is ready.
    pub async fn spawn(&self, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        let proc = self.start_at(name, env, free_port()?, free_port()?)?;
        proc.wait_ready().await?;
        Ok(proc)
    }

    /// Starts `tollgate serve` on the given ports without waiting for it
    /// (a replica started again where its clients already point).
    pub fn start_at(
        &self,
        name: &str,
        env: &[(&str, &str)],
        grpc: SocketAddr,
        metrics: SocketAddr,
    ) -> anyhow::Result<Proc> {
        let mut cmd = self.command(&["serve"]);
        cmd.env("TOLLGATE_LISTEN", grpc.to_string())
            .env("TOLLGATE_METRICS_LISTEN", metrics.to_string())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc::new(name, child, grpc, Some(metrics)))
    }

    /// The fresh database's URL.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The same database with another `tollgate` binary (a baseline build).
    pub fn with_bin(&self, bin: PathBuf) -> Self {
        Self {
            bin,
            database_url: self.database_url.clone(),
        }
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

impl Proc {
    pub fn new(name: &str, child: Child, addr: SocketAddr, metrics: Option<SocketAddr>) -> Self {
        Self {
            name: name.to_owned(),
            child,
            addr,
            metrics,
        }
    }

    pub fn target(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Polls the gRPC health service until it says SERVING (60 s at most).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(ch) = Channel::from_shared(self.target())?.connect().await {
                let status = HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status);
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not become ready in 60 s", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id (for reading its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no returned leases.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sums every sample of metric `name` (e.g. a histogram's `_count`)
    /// in this process's Prometheus scrape.
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let addr = self.metrics.context("no metrics port")?;
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .text()
            .await?;
        metric_sum(&text, name).with_context(|| format!("{} exports no {name}", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sums the samples of `name` (any labels) in a Prometheus text scrape;
/// `None` when there is none (a renamed metric must not read as zero).
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(None, |sum, x| Some(sum.unwrap_or(0.0) + x))
}

/// A free loopback port (bound, then released).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub fn op<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {OPERATOR_TOKEN}").parse().expect("ascii"),
    );
    r
}

/// A created key: the secret and its id.
#[derive(Clone)]
pub struct Seeded {
    pub key: String,
    pub key_id: String,
}

pub fn limit(scope: &str, period: &str, limit: u64) -> LimitSpec {
    LimitSpec {
        scope: scope.into(),
        period: period.into(),
        limit,
        ..Default::default()
    }
}

/// Creates `tenants` tenants on the enterprise plan with `limits` as
/// overrides, and `keys_per_tenant` keys in each, 16 calls at a time.
pub async fn seed(
    target: &str,
    prefix: &str,
    tenants: usize,
    keys_per_tenant: usize,
    limits: Vec<LimitSpec>,
) -> anyhow::Result<Vec<Seeded>> {
    let ch = Channel::from_shared(target.to_owned())?.connect().await?;
    let mut tenant_client = TenantServiceClient::new(ch.clone());
    let mut ids = Vec::new();
    for t in 0..tenants {
        let id = format!("{prefix}-{t}");
        tenant_client
            .create_tenant(op(CreateTenantRequest {
                tenant_id: id.clone(),
                name: id.clone(),
                plan: "enterprise".into(),
                subscription_status: "active".into(),
                overrides: Some(TenantOverrides {
                    limits: limits.clone(),
                    ..Default::default()
                }),
            }))
            .await
            .with_context(|| format!("creating tenant {id}"))?;
        ids.push(id);
    }
    let jobs: Vec<(String, usize)> = (0..keys_per_tenant)
        .flat_map(|k| ids.iter().map(move |t| (t.clone(), k)))
        .collect();
    let mut out = Vec::with_capacity(jobs.len());
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
    let mut set = JoinSet::new();
    for _ in 0..16 {
        let (jobs, mut client) = (jobs.clone(), AuthServiceClient::new(ch.clone()));
        set.spawn(async move {
            let mut made = Vec::new();
            loop {
                let Some((tenant_id, k)) = jobs.lock().expect("not poisoned").pop() else {
                    return anyhow::Ok(made);
                };
                let r = client
                    .create_key(op(CreateKeyRequest {
                        tenant_id,
                        name: format!("bench key {k}"),
                        scopes: vec!["read".into(), "write".into()],
                        ..Default::default()
                    }))
                    .await?
                    .into_inner();
                made.push(Seeded {
                    key: r.api_key,
                    key_id: r.key.map(|k| k.key_id).unwrap_or_default(),
                });
            }
        });
    }
    while let Some(made) = set.join_next().await {
        out.extend(made??);
    }
    Ok(out)
}

/// Revokes `key_id` through `client`.
pub async fn revoke(client: &mut AuthServiceClient<Channel>, key_id: &str) -> anyhow::Result<()> {
    client
        .revoke_key(op(RevokeKeyRequest {
            key_id: key_id.to_owned(),
            reason: "benchmark".into(),
            ..Default::default()
        }))
        .await?;
    Ok(())
}

/// Starts this binary as a baseline server (`subcommand`, `--listen` on a
/// free port, then `args`) and waits for its `listening on` line.
pub fn spawn_self<S: AsRef<std::ffi::OsStr>>(
    name: &str,
    subcommand: &str,
    args: &[S],
) -> anyhow::Result<Proc> {
    use std::io::BufRead;
    let addr = free_port()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([subcommand, "--listen", &addr.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("listening on") {
        bail!("{name} did not start: {line:?}");
    }
    Ok(Proc::new(name, child, addr, None))
}
