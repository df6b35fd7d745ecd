//! Trust boundaries (README.md, Security model) over real gRPC against real Postgres:
//! every RPC of every service, called as every kind of caller, answers
//! exactly as the table in `src/access.rs` says; and the attacks that
//! table stops (quota drain by id, existence oracles, console writes while
//! billing is inactive, a spoofed client address, a replica whose clock is
//! behind, a flood of slow management calls).

mod common;
#[allow(dead_code)]
#[path = "console/jwks_server.rs"]
mod jwks_server;
#[path = "support/jwt_keys.rs"]
mod jwt_keys;
#[path = "console/logs.rs"]
mod logs;

#[path = "trust/attacks.rs"]
mod attacks;
#[path = "trust/jwt.rs"]
mod jwt;
#[path = "trust/matrix.rs"]
mod matrix;

use std::collections::HashSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as Http};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use prost::Message;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;

use common::*;
use tollgate::access::Rpc;
use tollgate::app::GuardParts;
use tollgate::crypto::issuers::{IssuerSettings, IssuerTenants};
use tollgate::dashboard::{Dashboard, JwtSettings};
use tollgate::grpc::pb;
use tollgate::grpc::pb::console_service_client::ConsoleServiceClient;
use tollgate::store::{PostgresStore, Store};

const GATEWAY_TOKEN: &str = "test-gateway-token-0123456789";
const BACKEND_TOKEN: &str = "test-console-backend-token-0123";
const PARTNER_SECRET: &[u8] = b"partner-hs256-secret-0123456789abcdef";
const PASSWORD: &str = "correct horse battery staple";
const A: &str = "tenant-a";
const B: &str = "tenant-b";

/// A Tollgate with the console on, an external issuer (`partner`), a
/// gateway token and a console backend token; tenants A (owner, admin,
/// developer, viewer) and B, each with a key.
struct Fixture {
    t: Tollgate,
    console: ConsoleServiceClient<Channel>,
    pool: sqlx::PgPool,
    a_secret: String,
    a_key: String,
    b_key: String,
    /// Console access tokens of A's users, by role.
    owner: String,
    admin: String,
    developer: String,
    viewer: String,
    partner: String,
    counter: u32,
}

fn with<T>(bearer: Option<&str>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(token) = bearer {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn fixture_with(conn: &PgConnectOptions, guard: GuardParts) -> Fixture {
    let pg = pool(conn).await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pg.clone()));
    let mut opts = Options::new(profile("default"));
    let jwt = JwtSettings {
        issuers: vec![IssuerSettings {
            issuer: "partner".into(),
            audiences: vec!["partner-dashboard".into()],
            tenants: Some(IssuerTenants::Word("all".into())),
            secret: Some(String::from_utf8(PARTNER_SECRET.to_vec()).unwrap().into()),
            ..IssuerSettings::default()
        }],
        ..JwtSettings::default()
    };
    opts.dashboard = Dashboard::configure(&jwt, &store, true).unwrap();
    opts.guard = guard;
    let mut t = spawn_on_store(store, opts).await;
    let mut console = ConsoleServiceClient::new(t.channel.clone());
    // The operator makes the tenants (ids are never the caller's choice
    // on SignUp) and their owners. No key cap, no limits: the matrix
    // creates keys freely.
    for (tenant, email) in [(A, "owner@a.example"), (B, "owner@b.example")] {
        t.tenants
            .create_tenant(op(pb::CreateTenantRequest {
                tenant_id: tenant.into(),
                name: format!("Tenant {tenant}"),
                plan: "enterprise".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        console
            .create_user(op(pb::CreateUserRequest {
                tenant_id: tenant.into(),
                email: email.into(),
                password: PASSWORD.into(),
                role: "owner".into(),
            }))
            .await
            .unwrap();
    }
    let (a_secret, a_key) = t.create_key(A).await;
    let (_, b_key) = t.create_key(B).await;
    let mut fx = Fixture {
        t,
        console,
        pool: pg,
        a_secret,
        a_key: a_key.key_id,
        b_key: b_key.key_id,
        owner: String::new(),
        admin: String::new(),
        developer: String::new(),
        viewer: String::new(),
        partner: jwt_keys::hs256_with(
            PARTNER_SECRET,
            "p1",
            &jwt_keys::claims("partner", "partner-dashboard", A, 600),
        ),
        counter: 0,
    };
    fx.owner = fx.login("owner@a.example").await.access_token;
    for role in ["admin", "developer", "viewer"] {
        let email = format!("{role}@a.example");
        fx.console
            .create_user(with(
                Some(&fx.owner),
                pb::CreateUserRequest {
                    tenant_id: String::new(),
                    email: email.clone(),
                    password: PASSWORD.into(),
                    role: role.into(),
                },
            ))
            .await
            .unwrap();
        let token = fx.login(&email).await.access_token;
        match role {
            "admin" => fx.admin = token,
            "developer" => fx.developer = token,
            _ => fx.viewer = token,
        }
    }
    fx
}

async fn fixture(conn: &PgConnectOptions) -> Fixture {
    fixture_with(
        conn,
        GuardParts {
            gateway_token: Some(GATEWAY_TOKEN.to_string().into()),
            console_backend_token: Some(BACKEND_TOKEN.to_string().into()),
            ..GuardParts::default()
        },
    )
    .await
}

impl Fixture {
    async fn login(&mut self, email: &str) -> pb::LoginResponse {
        self.console
            .login(pb::LoginRequest {
                email: email.into(),
                password: PASSWORD.into(),
                client_address: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    fn next(&mut self) -> u32 {
        self.counter += 1;
        self.counter
    }

    /// A key of `tenant` to spend (revoke, rotate).
    async fn fresh_key(&mut self, tenant: &str) -> String {
        self.t.create_key(tenant).await.1.key_id
    }
}
