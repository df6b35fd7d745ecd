//! A Tollgate with the console on (a generated signing key, open sign-up,
//! messages to a real signed-webhook receiver), and clients.
#![allow(dead_code)]

use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use tonic::transport::Channel;
use tonic::Request;

use crate::common::{op, pool, profile, spawn_on_store, Options, Tollgate};
use crate::mailbox::{Mailbox, WEBHOOK_SECRET};
use tollgate::console::settings::{ConsoleSettings, SignupPolicy};
use tollgate::dashboard::{Dashboard, JwtSettings};
use tollgate::grpc::pb;
use tollgate::grpc::pb::console_service_client::ConsoleServiceClient;
use tollgate::store::{PostgresStore, Store};

pub const PASSWORD: &str = "correct horse battery staple";
/// The console backend's token (`console_backend_token`).
pub const CONSOLE_BACKEND_TOKEN: &str = "console-backend-token-0123456789";

pub struct Console {
    pub t: Tollgate,
    pub console: ConsoleServiceClient<Channel>,
    pub pool: sqlx::PgPool,
    /// Receives the console's signed messages.
    pub mail: Mailbox,
}

/// An owner made the invite way, and what reached their mailbox.
pub struct Owner {
    pub tenant_id: String,
    pub user_id: String,
    pub verification_token: String,
}

/// A Tollgate on the `msgflash` profile with the console on, sign-up open
/// and a webhook receiver for its messages.
pub async fn spawn_console(conn: &PgConnectOptions) -> Console {
    spawn_console_with(conn, |_| {}).await
}

/// As [`spawn_console`], with the console settings adjusted by `adjust`.
pub async fn spawn_console_with(
    conn: &PgConnectOptions,
    adjust: impl FnOnce(&mut ConsoleSettings),
) -> Console {
    spawn_console_with_jwt(conn, |jwt| adjust(&mut jwt.console)).await
}

/// As [`spawn_console`], with the whole `[jwt]` section (external issuers
/// beside the console) adjusted by `adjust`.
pub async fn spawn_console_with_jwt(
    conn: &PgConnectOptions,
    adjust: impl FnOnce(&mut JwtSettings),
) -> Console {
    let mail = Mailbox::start().await;
    let mut settings = ConsoleSettings {
        signup: Some(SignupPolicy::Open),
        ..ConsoleSettings::default()
    };
    settings.delivery.webhook_url = Some(mail.url());
    settings.delivery.webhook_secret = Some(WEBHOOK_SECRET.to_string().into());
    let mut jwt = JwtSettings {
        console: settings,
        ..JwtSettings::default()
    };
    adjust(&mut jwt);
    let pg = pool(conn).await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pg.clone()));
    let mut opts = Options::new(profile("msgflash"));
    opts.guard.console_backend_token = Some(CONSOLE_BACKEND_TOKEN.to_string().into());
    // `dev = true`: a generated console signing key.
    opts.dashboard = Dashboard::configure(&jwt, &store, true).unwrap();
    let t = spawn_on_store(store, opts).await;
    let console = ConsoleServiceClient::new(t.channel.clone());
    Console {
        t,
        console,
        pool: pg,
        mail,
    }
}

/// A message with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

impl Console {
    /// Signs up `email` (open sign-up): a new tenant with a generated id.
    /// Returns the owner, from the verification message that reached the
    /// mailbox (the response itself says nothing).
    pub async fn sign_up(&mut self, email: &str) -> Owner {
        let r = self
            .console
            .sign_up(pb::SignUpRequest {
                email: email.into(),
                password: PASSWORD.into(),
                tenant_name: format!("Tenant of {email}"),
                client_address: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r, pb::SignUpResponse {});
        let email = email.trim().to_lowercase();
        let m = self.mail.next_for("email_verification", &email).await;
        self.owner_from(&email, m.tenant_id(), m.token()).await
    }

    /// The invite way: the operator creates tenant `tenant` and adds
    /// `email` as its owner.
    pub async fn add_owner(&mut self, email: &str, tenant: &str) -> Owner {
        self.t.create_tenant(tenant, "free").await;
        self.console
            .create_user(op(pb::CreateUserRequest {
                tenant_id: tenant.into(),
                email: email.into(),
                password: PASSWORD.into(),
                role: "owner".into(),
            }))
            .await
            .unwrap();
        let m = self.mail.next_for("email_verification", email).await;
        assert_eq!(m.tenant_id(), tenant);
        self.owner_from(email, m.tenant_id(), m.token()).await
    }

    async fn owner_from(&mut self, email: &str, tenant_id: String, token: String) -> Owner {
        let users = self
            .console
            .list_users(op(pb::ListUsersRequest {
                tenant_id: tenant_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .users;
        let user = users.iter().find(|u| u.email == email).expect("listed");
        Owner {
            tenant_id,
            user_id: user.user_id.clone(),
            verification_token: token,
        }
    }

    /// Asks for a password reset of `email` and returns the token that
    /// reached the mailbox.
    pub async fn reset_token(&mut self, email: &str) -> String {
        let r = self
            .console
            .request_password_reset(pb::RequestPasswordResetRequest {
                email: email.into(),
                client_address: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r, pb::RequestPasswordResetResponse {});
        self.mail.next_for("password_reset", email).await.token()
    }

    pub async fn login_as(
        &mut self,
        email: &str,
        password: &str,
    ) -> Result<pb::LoginResponse, tonic::Status> {
        Ok(self
            .console
            .login(pb::LoginRequest {
                email: email.into(),
                password: password.into(),
                client_address: String::new(),
            })
            .await?
            .into_inner())
    }

    pub async fn login(&mut self, email: &str) -> pb::LoginResponse {
        self.login_as(email, PASSWORD).await.unwrap()
    }

    pub async fn refresh(&mut self, token: &str) -> Result<pb::LoginResponse, tonic::Status> {
        Ok(self
            .console
            .refresh(pb::RefreshRequest {
                refresh_token: token.into(),
            })
            .await?
            .into_inner())
    }

    /// Rows in a table (to check that a refused call wrote nothing).
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}
