//! A Tollgate with the console on (a generated signing key), and clients.
#![allow(dead_code)]

use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use tonic::transport::Channel;
use tonic::Request;

use crate::common::{pool, profile, spawn_on_store, Options, Tollgate};
use tollgate::dashboard::{Dashboard, JwtSettings};
use tollgate::grpc::pb;
use tollgate::grpc::pb::console_service_client::ConsoleServiceClient;
use tollgate::store::{PostgresStore, Store};

pub const PASSWORD: &str = "correct horse battery staple";

pub struct Console {
    pub t: Tollgate,
    pub console: ConsoleServiceClient<Channel>,
    pub pool: sqlx::PgPool,
}

/// A Tollgate on the `msgflash` profile with the console on.
pub async fn spawn_console(conn: &PgConnectOptions) -> Console {
    let pg = pool(conn).await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pg.clone()));
    let mut opts = Options::new(profile("msgflash"));
    // `dev = true`: a generated console signing key.
    opts.dashboard = Dashboard::configure(&JwtSettings::default(), &store, true).unwrap();
    let t = spawn_on_store(store, opts).await;
    let console = ConsoleServiceClient::new(t.channel.clone());
    Console {
        t,
        console,
        pool: pg,
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
    /// Signs up `email` as owner of a new tenant `tenant`.
    pub async fn sign_up(&mut self, email: &str, tenant: &str) -> pb::SignUpResponse {
        self.console
            .sign_up(pb::SignUpRequest {
                email: email.into(),
                password: PASSWORD.into(),
                tenant_name: format!("Tenant {tenant}"),
                tenant_id: tenant.into(),
            })
            .await
            .unwrap()
            .into_inner()
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
