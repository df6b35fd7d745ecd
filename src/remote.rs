//! The operator command line: `tollgate tenants|keys|users|health …` call a
//! running server over gRPC, so routine operations need neither grpcurl nor
//! the protos. Tables for people, `--json` for scripts. A created or rotated
//! key's secret is printed once, to stdout, and nowhere else.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::grpc::pb;
use crate::grpc::pb::auth_service_client::AuthServiceClient;
use crate::grpc::pb::console_service_client::ConsoleServiceClient;
use crate::grpc::pb::tenant_service_client::TenantServiceClient;

/// Where the server is and how to reach it.
#[derive(Args, Debug, Clone)]
pub struct Connect {
    /// Server address: `host:port` or a URL (`https://…` for TLS).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: String,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[arg(long, global = true, env = "TOLLGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --key-file.
    #[arg(long, global = true, env = "TOLLGATE_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, global = true, env = "TOLLGATE_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Name the server certificate must carry; default: the address's host.
    #[arg(long, global = true)]
    pub server_name: Option<String>,
    /// Longest wait for the connection and for each call.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout_seconds: u64,
}

/// Management calls: a server address and the operator token.
#[derive(Args, Debug)]
pub struct Operator {
    #[command(flatten)]
    pub connect: Connect,
    /// The operator token [env TOLLGATE_OPERATOR_TOKEN].
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_OPERATOR_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print JSON (one object per command) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Tenants {
    /// Create a tenant.
    Create {
        /// [A-Za-z0-9_-]{1,64}; generated when left out.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: String,
        /// A plan of the server's profile; default: the profile's default plan.
        #[arg(long)]
        plan: Option<String>,
    },
    /// Show one tenant.
    Get { tenant_id: String },
    /// Change a tenant's name, plan or subscription status (only those given).
    Update {
        tenant_id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        plan: Option<String>,
        /// active, trialing, past_due, canceled or suspended.
        #[arg(long)]
        status: Option<String>,
    },
    /// List tenants (every page).
    List,
}

#[derive(Subcommand, Debug)]
pub enum Keys {
    /// Create a key; its secret is printed once, to stdout.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// One of the profile's environments; default: its first.
        #[arg(long)]
        environment: Option<String>,
        /// Repeat or separate with commas; default: the plan's scopes.
        #[arg(long, value_delimiter = ',')]
        scope: Vec<String>,
        /// Lifetime in seconds; 0 = never expires; default: the profile's.
        #[arg(long)]
        ttl_seconds: Option<i64>,
    },
    /// List a tenant's keys (every page).
    List {
        #[arg(long)]
        tenant: String,
        /// Include revoked keys.
        #[arg(long)]
        all: bool,
    },
    /// Show one key (never its secret).
    Get { key_id: String },
    /// Revoke a key: refused at once, on every replica.
    Revoke {
        key_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Replace a key; the new secret is printed once, to stdout.
    Rotate {
        key_id: String,
        /// How long the old key keeps working.
        #[arg(long, default_value_t = 0)]
        grace_seconds: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum Users {
    /// Add a console user to a tenant. The password is read from a file
    /// (`-` for stdin), never from the command line, where `ps` would show it.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
        /// owner, admin, developer or viewer.
        #[arg(long)]
        role: String,
        /// File holding the initial password (one line); `-` reads stdin.
        #[arg(long)]
        password_file: PathBuf,
    },
    /// List a tenant's console users.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Change a user's role, or disable / re-enable it (only those given).
    Update {
        #[arg(long)]
        tenant: String,
        user_id: String,
        /// owner, admin, developer or viewer.
        #[arg(long)]
        role: Option<String>,
        /// A disabled user cannot log in or refresh.
        #[arg(long)]
        disabled: Option<bool>,
    },
    /// Delete a user.
    Delete {
        #[arg(long)]
        tenant: String,
        user_id: String,
    },
}

/// What went wrong, said once on stderr by the caller.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{}", describe(.0))]
    Call(Status),
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        CliError::Call(s)
    }
}

/// A status as a person reads it: code, message, then each field violation.
fn describe(status: &Status) -> String {
    use tonic_types::StatusExt;
    let mut out = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for v in bad.field_violations {
            let _ = write!(out, "\n  {}: {}", v.field, v.description);
        }
    }
    if status.code() == Code::Unauthenticated {
        out.push_str("\n  (set --token or TOLLGATE_OPERATOR_TOKEN to the server's operator token)");
    }
    out
}

impl Connect {
    /// A connected channel, or why not.
    pub async fn channel(&self) -> Result<Channel, CliError> {
        let tls = self.ca_file.is_some() || self.addr.starts_with("https://");
        let url = if self.addr.contains("://") {
            self.addr.clone()
        } else if tls {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        };
        let fail = |message: String| CliError::Connect {
            addr: self.addr.clone(),
            message,
        };
        let timeout = Duration::from_secs(self.timeout_seconds.max(1));
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| CliError::Usage(format!("--addr {}: {e}", self.addr)))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if tls {
            let mut config = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_file {
                config = config.ca_certificate(Certificate::from_pem(read(ca, "--ca-file")?));
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                config = config.identity(Identity::from_pem(
                    read(cert, "--cert-file")?,
                    read(key, "--key-file")?,
                ));
            }
            if let Some(name) = &self.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| fail(e.to_string()))?;
        }
        endpoint.connect().await.map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let _ = write!(message, ": {s}");
                source = s.source();
            }
            fail(message)
        })
    }
}

/// Every item of a paged list: calls `page` with each next-page token (empty
/// first) until the server returns an empty one.
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// A password from a file or stdin (`-`): the first line, without its end.
fn read_password(path: &PathBuf) -> Result<String, CliError> {
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| CliError::Usage(format!("--password-file -: {e}")))?;
        text
    } else {
        String::from_utf8(read(path, "--password-file")?).map_err(|_| {
            CliError::Usage(format!("--password-file {}: not UTF-8", path.display()))
        })?
    };
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        return Err(CliError::Usage(
            "--password-file: the password is empty".into(),
        ));
    }
    Ok(password)
}

fn read(path: &PathBuf, flag: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

/// `tollgate health`: exit status 0 only when `service` is SERVING.
pub async fn health(connect: &Connect, service: &str) -> Result<String, CliError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = connect.channel().await?;
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner()
        .status;
    let name = ServingStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    if status == ServingStatus::Serving as i32 {
        Ok(name.to_string())
    } else {
        Err(CliError::Usage(format!(
            "{} health{}: {name}",
            connect.addr,
            if service.is_empty() {
                String::new()
            } else {
                format!(" of {service:?}")
            }
        )))
    }
}

impl Operator {
    fn request<T>(&self, msg: T) -> Result<Request<T>, CliError> {
        let token = self
            .token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                CliError::Usage(
                    "no operator token: set --token or TOLLGATE_OPERATOR_TOKEN".to_string(),
                )
            })?;
        let mut r = Request::new(msg);
        let value = format!("Bearer {token}").parse().map_err(|_| {
            CliError::Usage("the operator token is not a valid header value".into())
        })?;
        r.metadata_mut().insert("authorization", value);
        Ok(r)
    }

    fn out(&self, value: Value, table: String) -> String {
        if self.json {
            value.to_string()
        } else {
            table
        }
    }

    /// Runs a `tenants` command; returns what to print on stdout.
    pub async fn tenants(&self, cmd: &Tenants) -> Result<String, CliError> {
        let mut client = TenantServiceClient::new(self.connect.channel().await?);
        match cmd {
            Tenants::Create { id, name, plan } => {
                let t = client
                    .create_tenant(self.request(pb::CreateTenantRequest {
                        tenant_id: id.clone().unwrap_or_default(),
                        name: name.clone(),
                        plan: plan.clone().unwrap_or_default(),
                        ..Default::default()
                    })?)
                    .await?
                    .into_inner()
                    .tenant
                    .unwrap_or_default();
                Ok(self.out(tenant_json(&t), tenants_table(&[t])))
            }
            Tenants::Get { tenant_id } => {
                let t = client
                    .get_tenant(self.request(pb::GetTenantRequest {
                        tenant_id: tenant_id.clone(),
                    })?)
                    .await?
                    .into_inner()
                    .tenant
                    .unwrap_or_default();
                Ok(self.out(tenant_json(&t), tenants_table(&[t])))
            }
            Tenants::Update {
                tenant_id,
                name,
                plan,
                status,
            } => {
                let mask: Vec<String> = [
                    ("name", name.is_some()),
                    ("plan", plan.is_some()),
                    ("subscription_status", status.is_some()),
                ]
                .into_iter()
                .filter(|(_, given)| *given)
                .map(|(field, _)| field.to_string())
                .collect();
                if mask.is_empty() {
                    return Err(CliError::Usage(
                        "nothing to change: give --name, --plan or --status".into(),
                    ));
                }
                let t = client
                    .update_tenant(self.request(pb::UpdateTenantRequest {
                        tenant_id: tenant_id.clone(),
                        update_mask: mask,
                        name: name.clone().unwrap_or_default(),
                        plan: plan.clone().unwrap_or_default(),
                        subscription_status: status.clone().unwrap_or_default(),
                        overrides: None,
                    })?)
                    .await?
                    .into_inner()
                    .tenant
                    .unwrap_or_default();
                Ok(self.out(tenant_json(&t), tenants_table(&[t])))
            }
            Tenants::List => {
                let all = all_pages(|page_token| {
                    let mut client = client.clone();
                    let request = self.request(pb::ListTenantsRequest {
                        page_size: 500,
                        page_token,
                    });
                    async move {
                        let page = client.list_tenants(request?).await?.into_inner();
                        Ok((page.tenants, page.next_page_token))
                    }
                })
                .await?;
                let value = json!({"tenants": all.iter().map(tenant_json).collect::<Vec<_>>()});
                Ok(self.out(value, tenants_table(&all)))
            }
        }
    }

    /// Runs a `keys` command; returns what to print on stdout.
    pub async fn keys(&self, cmd: &Keys) -> Result<String, CliError> {
        let mut client = AuthServiceClient::new(self.connect.channel().await?);
        match cmd {
            Keys::Create {
                tenant,
                name,
                environment,
                scope,
                ttl_seconds,
            } => {
                let r = client
                    .create_key(self.request(pb::CreateKeyRequest {
                        tenant_id: tenant.clone(),
                        name: name.clone(),
                        environment: environment.clone().unwrap_or_default(),
                        scopes: scope.clone(),
                        ttl_seconds: *ttl_seconds,
                        limits: vec![],
                        labels: Default::default(),
                    })?)
                    .await?
                    .into_inner();
                Ok(self.with_secret(&r.api_key, &r.key.unwrap_or_default(), None))
            }
            Keys::List { tenant, all } => {
                let keys = all_pages(|page_token| {
                    let mut client = client.clone();
                    let request = self.request(pb::ListKeysRequest {
                        tenant_id: tenant.clone(),
                        page_size: 500,
                        page_token,
                        include_revoked: *all,
                        label_selector: Default::default(),
                    });
                    async move {
                        let page = client.list_keys(request?).await?.into_inner();
                        Ok((page.keys, page.next_page_token))
                    }
                })
                .await?;
                let value = json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()});
                Ok(self.out(value, keys_table(&keys)))
            }
            Keys::Get { key_id } => {
                let k = client
                    .get_key(self.request(pb::GetKeyRequest {
                        key_id: key_id.clone(),
                        tenant_id: String::new(),
                    })?)
                    .await?
                    .into_inner()
                    .key
                    .unwrap_or_default();
                Ok(self.out(key_json(&k), keys_table(&[k])))
            }
            Keys::Revoke { key_id, reason } => {
                let k = client
                    .revoke_key(self.request(pb::RevokeKeyRequest {
                        key_id: key_id.clone(),
                        reason: reason.clone(),
                        tenant_id: String::new(),
                    })?)
                    .await?
                    .into_inner()
                    .key
                    .unwrap_or_default();
                Ok(self.out(key_json(&k), keys_table(&[k])))
            }
            Keys::Rotate {
                key_id,
                grace_seconds,
            } => {
                let r = client
                    .rotate_key(self.request(pb::RotateKeyRequest {
                        key_id: key_id.clone(),
                        grace_seconds: *grace_seconds,
                        tenant_id: String::new(),
                    })?)
                    .await?
                    .into_inner();
                Ok(self.with_secret(
                    &r.api_key,
                    &r.key.unwrap_or_default(),
                    r.previous_key.as_ref(),
                ))
            }
        }
    }

    /// A new key and its secret (the only time it is shown).
    fn with_secret(&self, secret: &str, key: &pb::ApiKey, previous: Option<&pb::ApiKey>) -> String {
        if self.json {
            let mut v = json!({"api_key": secret, "key": key_json(key)});
            if let Some(p) = previous {
                v["previous_key"] = key_json(p);
            }
            return v.to_string();
        }
        let mut keys = vec![key.clone()];
        keys.extend(previous.cloned());
        format!(
            "{}\nAPI key (shown once; Tollgate keeps only a digest):\n{secret}",
            keys_table(&keys)
        )
    }

    /// Runs a `users` command; returns what to print on stdout.
    pub async fn users(&self, cmd: &Users) -> Result<String, CliError> {
        let mut client = ConsoleServiceClient::new(self.connect.channel().await?);
        match cmd {
            Users::Create {
                tenant,
                email,
                role,
                password_file,
            } => {
                let password = read_password(password_file)?;
                client
                    .create_user(self.request(pb::CreateUserRequest {
                        tenant_id: tenant.clone(),
                        email: email.clone(),
                        password,
                        role: role.clone(),
                    })?)
                    .await?;
                // The server answers the same whether or not the address
                // already had an account (no existence oracle): say so.
                Ok(self.out(
                    json!({"requested": email}),
                    format!("user {email} requested in tenant {tenant}; `tollgate users list --tenant {tenant}` shows it"),
                ))
            }
            Users::Update {
                tenant,
                user_id,
                role,
                disabled,
            } => {
                let mut mask = Vec::new();
                if role.is_some() {
                    mask.push("role".to_string());
                }
                if disabled.is_some() {
                    mask.push("disabled".to_string());
                }
                if mask.is_empty() {
                    return Err(CliError::Usage(
                        "nothing to change: give --role or --disabled".into(),
                    ));
                }
                let u = client
                    .update_user(self.request(pb::UpdateUserRequest {
                        tenant_id: tenant.clone(),
                        user_id: user_id.clone(),
                        update_mask: mask,
                        role: role.clone().unwrap_or_default(),
                        disabled: disabled.unwrap_or_default(),
                    })?)
                    .await?
                    .into_inner()
                    .user
                    .unwrap_or_default();
                Ok(self.out(user_json(&u), users_table(&[u])))
            }
            Users::Delete { tenant, user_id } => {
                client
                    .delete_user(self.request(pb::DeleteUserRequest {
                        tenant_id: tenant.clone(),
                        user_id: user_id.clone(),
                    })?)
                    .await?;
                Ok(self.out(
                    json!({"deleted": user_id}),
                    format!("deleted user {user_id}"),
                ))
            }
            Users::List { tenant } => {
                let users = client
                    .list_users(self.request(pb::ListUsersRequest {
                        tenant_id: tenant.clone(),
                    })?)
                    .await?
                    .into_inner()
                    .users;
                let value = json!({"users": users.iter().map(user_json).collect::<Vec<_>>()});
                Ok(self.out(value, users_table(&users)))
            }
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// RFC 3339, or "" when unset.
fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn opt_time(t: Option<&prost_types::Timestamp>) -> Value {
    match time(t) {
        s if s.is_empty() => Value::Null,
        s => Value::String(s),
    }
}

fn tenant_json(t: &pb::Tenant) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "name": t.name,
        "plan": t.plan,
        "subscription_status": t.subscription_status,
        "created_at": opt_time(t.created_at.as_ref()),
        "updated_at": opt_time(t.updated_at.as_ref()),
    })
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({
        "key_id": k.key_id,
        "tenant_id": k.tenant_id,
        "name": k.name,
        "environment": k.environment,
        "scopes": k.scopes,
        "hint": k.hint,
        "created_at": opt_time(k.created_at.as_ref()),
        "expires_at": opt_time(k.expires_at.as_ref()),
        "revoked_at": opt_time(k.revoked_at.as_ref()),
        "last_used_at": opt_time(k.last_used_at.as_ref()),
        "revoke_reason": k.revoke_reason,
        "replaced_by": k.replaced_by,
    })
}

fn user_json(u: &pb::ConsoleUser) -> Value {
    json!({
        "user_id": u.user_id,
        "tenant_id": u.tenant_id,
        "email": u.email,
        "role": u.role,
        "email_verified": u.email_verified,
        "disabled": u.disabled,
        "created_at": opt_time(u.created_at.as_ref()),
    })
}

fn users_table(users: &[pb::ConsoleUser]) -> String {
    let rows = users
        .iter()
        .map(|u| {
            vec![
                u.user_id.clone(),
                u.email.clone(),
                u.role.clone(),
                yes_no(u.email_verified),
                yes_no(u.disabled),
                time(u.created_at.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "USER ID", "EMAIL", "ROLE", "VERIFIED", "DISABLED", "CREATED",
        ],
        rows,
    )
}

fn tenants_table(tenants: &[pb::Tenant]) -> String {
    let rows = tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant_id.clone(),
                t.name.clone(),
                t.plan.clone(),
                t.subscription_status.clone(),
                time(t.created_at.as_ref()),
            ]
        })
        .collect();
    table(&["TENANT ID", "NAME", "PLAN", "STATUS", "CREATED"], rows)
}

fn keys_table(keys: &[pb::ApiKey]) -> String {
    let rows = keys
        .iter()
        .map(|k| {
            let now = chrono::Utc::now().timestamp();
            let state = if k.revoked_at.is_some() {
                "revoked"
            } else if k.expires_at.as_ref().is_some_and(|t| t.seconds <= now) {
                "expired"
            } else {
                "active"
            };
            vec![
                k.key_id.clone(),
                k.tenant_id.clone(),
                k.name.clone(),
                k.environment.clone(),
                k.scopes.join(","),
                k.hint.clone(),
                state.to_string(),
                time(k.expires_at.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "KEY ID", "TENANT", "NAME", "ENV", "SCOPES", "HINT", "STATE", "EXPIRES",
        ],
        rows,
    )
}

/// Left-aligned columns, two spaces apart; control characters shown as `?`
/// so a stored name cannot rewrite the operator's terminal.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for row in &rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_columns_and_neutralises_control_characters() {
        let t = table(
            &["ID", "NAME"],
            vec![
                vec!["a".into(), "x\u{1b}[2Jy".into()],
                vec!["long-id".into(), "n".into()],
            ],
        );
        assert_eq!(t, "ID       NAME\na        x?[2Jy\nlong-id  n");
    }
}
