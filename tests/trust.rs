//! Trust boundaries (DESIGN.md §7) over real gRPC against real Postgres:
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
    for (tenant, email) in [(A, "owner@a.example"), (B, "owner@b.example")] {
        console
            .sign_up(pb::SignUpRequest {
                email: email.into(),
                password: PASSWORD.into(),
                tenant_name: format!("Tenant {tenant}"),
                tenant_id: tenant.into(),
            })
            .await
            .unwrap();
        // No key cap, no limits: the matrix creates keys freely.
        t.tenants
            .update_tenant(op(pb::UpdateTenantRequest {
                tenant_id: tenant.into(),
                update_mask: vec!["plan".into()],
                plan: "enterprise".into(),
                ..Default::default()
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

/// The columns of the matrix: who calls, and which tenant they aim at.
const CALLERS: [&str; 12] = [
    "anonymous",
    "bogus bearer",
    "api key as bearer",
    "gateway",
    "console backend",
    "viewer of A",
    "developer of A",
    "admin of A",
    "owner of A",
    "owner of A on B",
    "external issuer JWT",
    "operator",
];

/// The whole matrix, one row per RPC (and request shape), one column per
/// caller of [`CALLERS`]: `.` OK, `U` UNAUTHENTICATED, `P`
/// PERMISSION_DENIED, `N` NOT_FOUND, `I` INVALID_ARGUMENT. Adding an RPC
/// is one line here and one arm in [`call`].
#[rustfmt::skip]
const MATRIX: &[(Rpc, &str, &str)] = &[
    //                                           anon bog key gw  back view dev adm own own>B ext op
    (Rpc::Authenticate, "", /*                */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::CheckQuota, "by api_key", /*        */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::CheckQuota, "by tenant_id", /*      */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::CheckQuota, "by key_id", /*         */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::GetUsage, "", /*                    */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::CreateKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::RevokeKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::GetKey, "", /*                      */ "U   U   U   P   P    .    .   .   .   N     U   ."),
    (Rpc::ListKeys, "", /*                    */ "U   U   U   P   P    .    .   .   .   N     U   ."),
    (Rpc::RotateKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::UpdateKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::CreateTenant, "", /*                */ "U   U   U   P   P    P    P   P   P   P     U   ."),
    (Rpc::GetTenant, "", /*                   */ "U   U   U   P   P    .    .   .   .   N     U   ."),
    (Rpc::UpdateTenant, "name", /*            */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::ListTenants, "", /*                 */ "U   U   U   P   P    P    P   P   P   P     U   ."),
    (Rpc::SignUp, "", /*                      */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::Login, "", /*                       */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::Refresh, "", /*                     */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::Logout, "", /*                      */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::RequestEmailVerification, "", /*    */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::VerifyEmail, "bad token", /*        */ "I   I   I   I   I    I    I   I   I   I     I   I"),
    (Rpc::RequestPasswordReset, "", /*        */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::ResetPassword, "bad token", /*      */ "I   I   I   I   I    I    I   I   I   I     I   I"),
    (Rpc::GetJwks, "", /*                     */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::CreateUser, "", /*                  */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::ListUsers, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::ListAuditEvents, "", /*             */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::EnvoyCheck, "", /*                  */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::HealthCheck, "", /*                 */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::HealthWatch, "", /*                 */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::Reflection, "", /*                  */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::ReflectionAlpha, "", /*             */ ".   .   .   .   .    .    .   .   .   .     .   ."),
];

fn symbol(code: Code) -> String {
    match code {
        Code::Ok => ".".into(),
        Code::Unauthenticated => "U".into(),
        Code::PermissionDenied => "P".into(),
        Code::NotFound => "N".into(),
        Code::InvalidArgument => "I".into(),
        other => format!("{other:?}"),
    }
}

/// Makes `rpc` as caller column `who`; the answer's code.
async fn call(fx: &mut Fixture, rpc: Rpc, variant: &str, who: usize) -> Code {
    let bearer: Option<String> = match CALLERS[who] {
        "anonymous" => None,
        "bogus bearer" => Some("not-a-token-of-anyone-0123456789".into()),
        "api key as bearer" => Some(fx.a_secret.clone()),
        "gateway" => Some(GATEWAY_TOKEN.into()),
        "console backend" => Some(BACKEND_TOKEN.into()),
        "viewer of A" => Some(fx.viewer.clone()),
        "developer of A" => Some(fx.developer.clone()),
        "admin of A" => Some(fx.admin.clone()),
        "owner of A" | "owner of A on B" => Some(fx.owner.clone()),
        "external issuer JWT" => Some(fx.partner.clone()),
        "operator" => Some(OPERATOR_TOKEN.into()),
        other => panic!("no caller {other}"),
    };
    let b = bearer.as_deref();
    let on_b = CALLERS[who] == "owner of A on B";
    let (tenant, key) = if on_b {
        (B.to_string(), fx.b_key.clone())
    } else {
        (A.to_string(), fx.a_key.clone())
    };
    let n = fx.next();
    let auth = &mut fx.t.auth.clone();
    let tenants = &mut fx.t.tenants.clone();
    let console = &mut fx.console.clone();
    match (rpc, variant) {
        (Rpc::Authenticate, _) => code(
            auth.authenticate(with(
                b,
                pb::AuthenticateRequest {
                    api_key: fx.a_secret.clone(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::CheckQuota, "by api_key") => code(
            auth.check_quota(with(
                b,
                pb::CheckQuotaRequest {
                    api_key: fx.a_secret.clone(),
                    dry_run: true,
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::CheckQuota, "by tenant_id") => code(
            auth.check_quota(with(
                b,
                pb::CheckQuotaRequest {
                    tenant_id: tenant,
                    dry_run: true,
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::CheckQuota, "by key_id") => code(
            auth.check_quota(with(
                b,
                pb::CheckQuotaRequest {
                    key_id: key,
                    dry_run: true,
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::GetUsage, _) => code(
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    tenant_id: tenant,
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::CreateKey, _) => code(
            auth.create_key(with(
                b,
                pb::CreateKeyRequest {
                    tenant_id: tenant,
                    name: format!("k{n}"),
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::RevokeKey, _) => {
            let key_id = fx.fresh_key(&tenant).await;
            code(
                auth.revoke_key(with(
                    b,
                    pb::RevokeKeyRequest {
                        key_id,
                        reason: "matrix".into(),
                        ..Default::default()
                    },
                ))
                .await,
            )
        }
        (Rpc::GetKey, _) => code(
            auth.get_key(with(
                b,
                pb::GetKeyRequest {
                    key_id: key,
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::ListKeys, _) => code(
            auth.list_keys(with(
                b,
                pb::ListKeysRequest {
                    tenant_id: tenant,
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::RotateKey, _) => {
            let key_id = fx.fresh_key(&tenant).await;
            code(
                auth.rotate_key(with(
                    b,
                    pb::RotateKeyRequest {
                        key_id,
                        ..Default::default()
                    },
                ))
                .await,
            )
        }
        (Rpc::UpdateKey, _) => code(
            auth.update_key(with(
                b,
                pb::UpdateKeyRequest {
                    key_id: key,
                    update_mask: vec!["name".into()],
                    name: format!("renamed {n}"),
                    ..Default::default()
                },
            ))
            .await,
        ),
        (Rpc::CreateTenant, _) => code(
            tenants
                .create_tenant(with(
                    b,
                    pb::CreateTenantRequest {
                        tenant_id: format!("new-{n}"),
                        name: "New".into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        (Rpc::GetTenant, _) => code(
            tenants
                .get_tenant(with(b, pb::GetTenantRequest { tenant_id: tenant }))
                .await,
        ),
        (Rpc::UpdateTenant, _) => code(
            tenants
                .update_tenant(with(
                    b,
                    pb::UpdateTenantRequest {
                        tenant_id: tenant,
                        update_mask: vec!["name".into()],
                        name: format!("Renamed {n}"),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        (Rpc::ListTenants, _) => code(
            tenants
                .list_tenants(with(b, pb::ListTenantsRequest::default()))
                .await,
        ),
        (Rpc::SignUp, _) => code(
            console
                .sign_up(with(
                    b,
                    pb::SignUpRequest {
                        email: format!("signup{n}@example.com"),
                        password: PASSWORD.into(),
                        tenant_name: "Signed up".into(),
                        tenant_id: format!("signed-up-{n}"),
                    },
                ))
                .await,
        ),
        (Rpc::Login, _) => code(
            console
                .login(with(
                    b,
                    pb::LoginRequest {
                        email: "owner@b.example".into(),
                        password: PASSWORD.into(),
                        client_address: String::new(),
                    },
                ))
                .await,
        ),
        (Rpc::Refresh, _) => {
            let refresh_token = fx.login("owner@b.example").await.refresh_token;
            code(
                console
                    .refresh(with(b, pb::RefreshRequest { refresh_token }))
                    .await,
            )
        }
        (Rpc::Logout, _) => {
            let refresh_token = fx.login("owner@b.example").await.refresh_token;
            code(
                console
                    .logout(with(b, pb::LogoutRequest { refresh_token }))
                    .await,
            )
        }
        (Rpc::RequestEmailVerification, _) => code(
            console
                .request_email_verification(with(
                    b,
                    pb::RequestEmailVerificationRequest {
                        email: "nobody@example.com".into(),
                    },
                ))
                .await,
        ),
        (Rpc::VerifyEmail, _) => code(
            console
                .verify_email(with(
                    b,
                    pb::VerifyEmailRequest {
                        token: "not-a-verification-token".into(),
                    },
                ))
                .await,
        ),
        (Rpc::RequestPasswordReset, _) => code(
            console
                .request_password_reset(with(
                    b,
                    pb::RequestPasswordResetRequest {
                        email: "nobody@example.com".into(),
                    },
                ))
                .await,
        ),
        (Rpc::ResetPassword, _) => code(
            console
                .reset_password(with(
                    b,
                    pb::ResetPasswordRequest {
                        token: "not-a-reset-token".into(),
                        new_password: "a new long enough password".into(),
                    },
                ))
                .await,
        ),
        (Rpc::GetJwks, _) => code(console.get_jwks(with(b, pb::GetJwksRequest {})).await),
        (Rpc::CreateUser, _) => code(
            console
                .create_user(with(
                    b,
                    pb::CreateUserRequest {
                        tenant_id: tenant,
                        email: format!("user{n}@example.com"),
                        password: PASSWORD.into(),
                        role: "viewer".into(),
                    },
                ))
                .await,
        ),
        (Rpc::ListUsers, _) => code(
            console
                .list_users(with(b, pb::ListUsersRequest { tenant_id: tenant }))
                .await,
        ),
        (Rpc::ListAuditEvents, _) => code(
            console
                .list_audit_events(with(
                    b,
                    pb::ListAuditEventsRequest {
                        tenant_id: tenant,
                        ..Default::default()
                    },
                ))
                .await,
        ),
        (Rpc::EnvoyCheck, _) => {
            let check = CheckRequest {
                attributes: Some(AttributeContext {
                    request: Some(Http {
                        http: Some(HttpRequest {
                            headers: [("x-api-key".to_string(), fx.a_secret.clone())].into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            };
            let r = AuthorizationClient::new(fx.t.channel.clone())
                .check(with(b, check))
                .await;
            if let Ok(r) = &r {
                assert_eq!(r.get_ref().status.as_ref().unwrap().code, 0, "allowed");
            }
            code(r)
        }
        (Rpc::HealthCheck, _) => code(
            fx.t.health
                .clone()
                .check(with(
                    b,
                    HealthCheckRequest {
                        service: String::new(),
                    },
                ))
                .await,
        ),
        (Rpc::HealthWatch, _) => {
            match fx
                .t
                .health
                .clone()
                .watch(with(
                    b,
                    HealthCheckRequest {
                        service: String::new(),
                    },
                ))
                .await
            {
                Ok(r) => match r.into_inner().message().await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                },
                Err(s) => s.code(),
            }
        }
        (Rpc::Reflection, _) => {
            use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::v1::ServerReflectionRequest;
            let ask = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut client = ServerReflectionClient::new(fx.t.channel.clone());
            match client
                .server_reflection_info(with(b, futures::stream::iter([ask])))
                .await
            {
                Ok(r) => match r.into_inner().message().await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                },
                Err(s) => s.code(),
            }
        }
        (Rpc::ReflectionAlpha, _) => {
            use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
            let ask = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut client = ServerReflectionClient::new(fx.t.channel.clone());
            match client
                .server_reflection_info(with(b, futures::stream::iter([ask])))
                .await
            {
                Ok(r) => match r.into_inner().message().await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                },
                Err(s) => s.code(),
            }
        }
        (rpc, variant) => panic!("no call for {rpc:?} {variant:?}: add an arm to `call`"),
    }
}

/// Every method of every service in `set` (an encoded FileDescriptorSet),
/// as gRPC paths.
fn methods_of(set: &[u8]) -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(set).unwrap();
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                out.push(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    out
}

#[test]
fn every_served_rpc_has_a_rule_and_a_row_in_the_matrix() {
    let mut served: Vec<String> = [
        tollgate::grpc::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .iter()
    .flat_map(|set| methods_of(set))
    .collect();
    served.push("/envoy.service.auth.v3.Authorization/Check".into());
    let rows: HashSet<Rpc> = MATRIX.iter().map(|(rpc, _, _)| *rpc).collect();
    for path in &served {
        let rpc = Rpc::from_path(path)
            .unwrap_or_else(|| panic!("{path} has no rule in src/access.rs (Rpc)"));
        assert!(rows.contains(&rpc), "{path} has no row in MATRIX");
    }
    for rpc in Rpc::ALL {
        assert!(rows.contains(rpc), "{rpc:?} has no row in MATRIX");
        assert!(
            served.iter().any(|p| p == rpc.path()),
            "{rpc:?} is not served"
        );
    }
    for (rpc, variant, cells) in MATRIX {
        assert_eq!(
            cells.split_whitespace().count(),
            CALLERS.len(),
            "{rpc:?} {variant}: one cell per caller"
        );
    }
}

#[sqlx::test]
async fn every_rpc_answers_every_kind_of_caller_as_the_table_says(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let mut wrong = Vec::new();
    let mut table = String::new();
    for (rpc, variant, cells) in MATRIX {
        let expected: Vec<&str> = cells.split_whitespace().collect();
        let mut got = Vec::new();
        for (who, want) in expected.iter().enumerate() {
            let answer = symbol(call(&mut fx, *rpc, variant, who).await);
            if answer != *want {
                wrong.push(format!(
                    "{rpc:?} {variant} as {}: expected {want}, got {answer}",
                    CALLERS[who]
                ));
            }
            got.push(answer);
        }
        table.push_str(&format!("{rpc:?} {variant}: {}\n", got.join(" ")));
    }
    assert!(
        wrong.is_empty(),
        "{}\n\nwhole matrix:\n{table}",
        wrong.join("\n")
    );
}

/// Units used this month by tenant `tenant` (the operator reads it).
async fn tenant_month_used(fx: &mut Fixture, tenant: &str) -> u64 {
    fx.t.auth
        .get_usage(op(pb::GetUsageRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .quotas
        .iter()
        .find(|q| q.name == "tenant_per_month")
        .map(|q| q.used)
        .unwrap_or(0)
}

#[sqlx::test]
async fn nobody_without_credentials_spends_or_probes_a_quota_by_id(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    // A back on a plan with limits: 10 a second per key, 10 000 a month.
    fx.t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: A.into(),
            update_mask: vec!["plan".into()],
            plan: "free".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let drain = |tenant_id: &str, key_id: &str, cost| pb::CheckQuotaRequest {
        tenant_id: tenant_id.into(),
        key_id: key_id.into(),
        cost,
        ..Default::default()
    };
    // The drain, by tenant and by key, and the probe for ids: all the same
    // refusal, whether the id exists or not; nothing spent.
    let mut auth = fx.t.auth.clone();
    for req in [
        drain(A, "", 9999),
        drain("no-such-tenant", "", 1),
        drain("", &fx.a_key, 10),
        drain("", &uuid::Uuid::new_v4().to_string(), 1),
    ] {
        let e = auth.check_quota(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{req:?}");
        let e = auth
            .get_usage(pb::GetUsageRequest {
                tenant_id: req.tenant_id.clone(),
                key_id: req.key_id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{req:?}");
    }
    assert_eq!(tenant_month_used(&mut fx, A).await, 0);
    assert!(fx.t.authenticate(&fx.a_secret.clone()).await.allowed);

    // The gateway may; a cost no limit could ever admit is a bad request.
    let gw = |m| with(Some(GATEWAY_TOKEN), m);
    let ok = auth.check_quota(gw(drain(A, "", 3))).await.unwrap();
    assert!(ok.into_inner().allowed);
    // (Used counts the replica's lease, so compare, don't count.)
    let spent = tenant_month_used(&mut fx, A).await;
    assert!(spent >= 3, "{spent}");
    let too_much = auth
        .check_quota(gw(drain(A, "", 10_001)))
        .await
        .unwrap_err();
    assert_eq!(violations(&too_much), ["cost"]);
    let too_much = auth
        .check_quota(gw(drain("", &fx.a_key, 11)))
        .await
        .unwrap_err();
    assert_eq!(violations(&too_much), ["cost"]);
    let by_key = pb::CheckQuotaRequest {
        api_key: fx.a_secret.clone(),
        cost: 11,
        ..Default::default()
    };
    assert_eq!(
        violations(&auth.check_quota(by_key).await.unwrap_err()),
        ["cost"]
    );
    assert_eq!(
        tenant_month_used(&mut fx, A).await,
        spent,
        "refusals spend nothing"
    );
    // The key itself needs no other credential.
    let own = pb::CheckQuotaRequest {
        api_key: fx.a_secret.clone(),
        cost: 2,
        ..Default::default()
    };
    assert!(auth.check_quota(own).await.unwrap().into_inner().allowed);
}

#[sqlx::test]
async fn another_tenants_key_or_tenant_is_not_found_exactly_like_a_missing_one(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let owner = fx.owner.clone();
    let missing = uuid::Uuid::new_v4().to_string();
    let mut auth = fx.t.auth.clone();
    let mut tenants = fx.t.tenants.clone();
    let mut console = fx.console.clone();
    let mut answers = Vec::new();
    for key_id in [fx.b_key.clone(), missing] {
        let b = Some(owner.as_str());
        let key = || key_id.clone();
        let all = [
            auth.get_key(with(
                b,
                pb::GetKeyRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.revoke_key(with(
                b,
                pb::RevokeKeyRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.rotate_key(with(
                b,
                pb::RotateKeyRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.update_key(with(
                b,
                pb::UpdateKeyRequest {
                    key_id: key(),
                    update_mask: vec!["name".into()],
                    name: "mine".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.check_quota(with(
                b,
                pb::CheckQuotaRequest {
                    key_id: key(),
                    dry_run: true,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        ];
        answers.push(
            all.into_iter()
                .map(|r| {
                    let e = r.unwrap_err();
                    (e.code(), e.message().to_string())
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(answers[0], answers[1], "B's key vs a missing key");
    assert!(answers[0].iter().all(|(c, _)| *c == Code::NotFound));

    let mut answers = Vec::new();
    for tenant_id in [B, "no-such-tenant"] {
        let b = Some(owner.as_str());
        let t = || tenant_id.to_string();
        let all = [
            tenants
                .get_tenant(with(b, pb::GetTenantRequest { tenant_id: t() }))
                .await
                .map(|_| ()),
            tenants
                .update_tenant(with(
                    b,
                    pb::UpdateTenantRequest {
                        tenant_id: t(),
                        update_mask: vec!["name".into()],
                        name: "pwned".into(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            auth.list_keys(with(
                b,
                pb::ListKeysRequest {
                    tenant_id: t(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.create_key(with(
                b,
                pb::CreateKeyRequest {
                    tenant_id: t(),
                    name: "x".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    tenant_id: t(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            console
                .list_users(with(b, pb::ListUsersRequest { tenant_id: t() }))
                .await
                .map(|_| ()),
        ];
        answers.push(
            all.into_iter()
                .map(|r| {
                    let e = r.unwrap_err();
                    (e.code(), e.message().to_string())
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(answers[0], answers[1], "tenant B vs a missing tenant");
    assert!(answers[0].iter().all(|(c, _)| *c == Code::NotFound));
    // And B's key is untouched.
    let b_key =
        fx.t.auth
            .get_key(op(pb::GetKeyRequest {
                key_id: fx.b_key.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
    assert_eq!((b_key.name.as_str(), b_key.revoked_at), ("test key", None));
}

#[sqlx::test]
async fn a_revoked_key_stays_revoked_on_a_replica_whose_clock_is_behind(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.create_tenant("acme", "free").await;
    let (secret, key) = t.create_key("acme").await;
    let mut rx = t.invalidations();
    t.revoke(&key.key_id).await;
    wait_for(&mut rx, |e| {
        matches!(e, tollgate::store::Invalidation::Key(_))
    })
    .await;
    // This replica's clock is an hour behind the database's.
    t.running
        .clock()
        .freeze_at(chrono::Utc::now() - chrono::Duration::hours(1));
    let r = t.authenticate(&secret).await;
    assert_eq!(reason(&r), "KEY_REVOKED");
    let q = t
        .auth
        .check_quota(pb::CheckQuotaRequest {
            api_key: secret,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.denial.unwrap().reason, "KEY_REVOKED");
}

#[sqlx::test]
async fn console_users_cannot_change_keys_while_the_subscription_is_inactive(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let owner = fx.owner.clone();
    let b = Some(owner.as_str());
    let mut auth = fx.t.auth.clone();
    for status in ["past_due", "canceled"] {
        fx.t.tenants
            .update_tenant(op(pb::UpdateTenantRequest {
                tenant_id: A.into(),
                update_mask: vec!["subscription_status".into()],
                subscription_status: status.into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let key = fx.fresh_key(A).await;
        let writes = [
            code(
                auth.create_key(with(
                    b,
                    pb::CreateKeyRequest {
                        name: "x".into(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.rotate_key(with(
                    b,
                    pb::RotateKeyRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.update_key(with(
                    b,
                    pb::UpdateKeyRequest {
                        key_id: key.clone(),
                        update_mask: vec!["name".into()],
                        name: "y".into(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.revoke_key(with(
                    b,
                    pb::RevokeKeyRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
        ];
        assert_eq!(writes, [Code::FailedPrecondition; 4], "{status}");
        // Reads go on; the operator is not paused.
        let reads = [
            code(
                auth.list_keys(with(b, pb::ListKeysRequest::default()))
                    .await,
            ),
            code(
                auth.get_key(with(
                    b,
                    pb::GetKeyRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
        ];
        assert_eq!(reads, [Code::Ok; 2], "{status}");
        let unchanged = auth
            .get_key(op(pb::GetKeyRequest {
                key_id: key.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_eq!(
            (unchanged.name.as_str(), unchanged.revoked_at),
            ("test key", None)
        );
        auth.revoke_key(op(pb::RevokeKeyRequest {
            key_id: key,
            ..Default::default()
        }))
        .await
        .unwrap();
    }
}

#[sqlx::test]
async fn only_the_console_backend_may_name_the_login_address(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let login = |i: u32| pb::LoginRequest {
        email: format!("nobody{i}@example.com"),
        password: "wrong password!!".into(),
        client_address: format!("198.51.100.{i}"),
    };
    // The backend names 22 addresses: each has one failure, none backs off.
    for i in 0..22 {
        let e = fx
            .console
            .login(with(Some(BACKEND_TOKEN), login(i)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "attempt {i}: {e:?}");
    }
    // The operator is not the console backend: its addresses are ignored,
    // so the peer's own counter backs off.
    let mut last = Code::Ok;
    for i in 100..122 {
        last = fx
            .console
            .login(with(Some(OPERATOR_TOKEN), login(i)))
            .await
            .unwrap_err()
            .code();
    }
    assert_eq!(last, Code::ResourceExhausted);
}

#[sqlx::test]
async fn a_flood_of_slow_management_calls_is_shed_while_decisions_answer(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture_with(
        &conn,
        GuardParts {
            management: tollgate::grpc::budget::ManagementSettings {
                max_in_flight: 2,
                timeout_ms: 4000,
            },
            ..GuardParts::default()
        },
    )
    .await;
    // Hold the keys table against writes (reads go on), so key creation waits.
    let mut lock = fx.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut auth = fx.t.auth.clone();
            tokio::spawn(async move {
                auth.create_key(op(pb::CreateKeyRequest {
                    tenant_id: A.into(),
                    name: "slow".into(),
                    ..Default::default()
                }))
                .await
                .map(|_| ())
            })
        })
        .collect();
    // Wait until both are stuck behind the lock (each holding a slot).
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while sqlx::query_scalar::<_, i64>(waiting)
            .fetch_one(&fx.pool)
            .await
            .unwrap()
            < 2
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both slow calls reach the database");
    // Both slots taken: the next management call is shed at once.
    let shed =
        fx.t.tenants
            .list_tenants(op(pb::ListTenantsRequest::default()))
            .await
            .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("management"), "{shed:?}");
    // Decisions never wait for a slot.
    let secret = fx.a_secret.clone();
    assert!(fx.t.authenticate(&secret).await.allowed);
    let q =
        fx.t.auth
            .check_quota(pb::CheckQuotaRequest {
                api_key: secret,
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap();
    assert!(q.into_inner().allowed);
    // The slow calls run out of time, typed, and free their slots.
    for call in slow {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    }
    lock.rollback().await.unwrap();
    fx.t.tenants
        .list_tenants(op(pb::ListTenantsRequest::default()))
        .await
        .unwrap();
}

#[sqlx::test]
async fn a_jwks_redirect_to_another_origin_is_not_followed_and_urls_stay_out_of_logs(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    logs::capture();
    // The other origin serves a key set an attacker would like trusted.
    let key = jwt_keys::TestKey::es256("evil");
    let elsewhere = jwks_server::JwksServer::start(jwt_keys::jwks(&[&key])).await;
    // The configured origin answers every fetch with a redirect there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let target = elsewhere.url();
    let redirector = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    let secret_path = "/tenant-jwks/s3cr3t-path?access_token=s3cr3t-query";
    let settings = JwtSettings {
        issuers: vec![IssuerSettings {
            issuer: "https://redirecting.example".into(),
            audiences: vec!["dashboard".into()],
            tenants: Some(IssuerTenants::Word("all".into())),
            jwks_url: Some(format!("http://{origin}{secret_path}")),
            allow_insecure_http: true,
            refresh_seconds: 1,
            min_refresh_seconds: 1,
            ..IssuerSettings::default()
        }],
        ..JwtSettings::default()
    };
    let mut opts = Options::new(profile("default"));
    opts.dashboard = Dashboard::new(&settings, None).unwrap();
    let t = spawn_with(&conn, opts).await;
    let stats = t
        .running
        .jwks_refreshes("https://redirecting.example")
        .unwrap()
        .clone();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while stats.failed() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the fetch ends (refused), without following the redirect");
    assert_eq!(stats.ok(), 0);
    assert_eq!(
        elsewhere.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other origin was never asked"
    );
    let logged = logs::text();
    assert!(logged.contains("JWKS refresh failed"), "{logged}");
    assert!(logged.contains(&origin.to_string()), "the host is named");
    for part in ["s3cr3t", "tenant-jwks", "access_token"] {
        assert!(!logged.contains(part), "{part} logged:\n{logged}");
    }
    redirector.abort();
}

#[sqlx::test]
async fn an_issuer_speaks_only_for_its_tenants_and_a_surface_takes_only_its_issuers(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let text = std::fs::read_to_string(format!(
        "{}/profiles/default.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace(
        "[surfaces.dashboard]\nbearer = \"jwt\"\n",
        "[surfaces.dashboard]\nbearer = \"jwt\"\njwt_issuers = [\"partner\"]\n\
         jwt_audiences = [\"partner-dashboard\"]\n\n\
         [surfaces.other_app]\nbearer = \"jwt\"\njwt_issuers = [\"other\"]\n",
    );
    let profile = tollgate::profile::Profile::from_toml(&text).unwrap();
    assert!(
        profile.surface("other_app").is_some(),
        "the profile edit applied"
    );
    const OTHER_SECRET: &[u8] = b"other-hs256-secret-0123456789abcdef0";
    let secret = |s: &[u8]| Some(String::from_utf8(s.to_vec()).unwrap().into());
    let settings = JwtSettings {
        issuers: vec![
            IssuerSettings {
                issuer: "partner".into(),
                audiences: vec!["partner-dashboard".into(), "partner-admin".into()],
                tenants: Some(IssuerTenants::List(vec![A.into()])),
                secret: secret(PARTNER_SECRET),
                ..IssuerSettings::default()
            },
            IssuerSettings {
                issuer: "other".into(),
                audiences: vec!["other-app".into()],
                tenants: Some(IssuerTenants::Map {
                    map: [("org-b".to_string(), B.to_string())].into(),
                }),
                secret: secret(OTHER_SECRET),
                ..IssuerSettings::default()
            },
        ],
        ..JwtSettings::default()
    };
    let mut opts = Options::new(profile);
    opts.dashboard = Dashboard::new(&settings, None).unwrap();
    let mut t = spawn_with(&conn, opts).await;
    t.create_tenant(A, "pro").await;
    t.create_tenant(B, "pro").await;
    let partner = |aud: &str, tenant: &str| {
        jwt_keys::hs256_with(
            PARTNER_SECRET,
            "p",
            &jwt_keys::claims("partner", aud, tenant, 600),
        )
    };
    let other = |tenant: &str| {
        jwt_keys::hs256_with(
            OTHER_SECRET,
            "o",
            &jwt_keys::claims("other", "other-app", tenant, 600),
        )
    };
    let cases = [
        (
            "partner for A",
            partner("partner-dashboard", A),
            "dashboard",
            A,
        ),
        (
            "partner for B",
            partner("partner-dashboard", B),
            "dashboard",
            "",
        ),
        (
            "partner, admin audience",
            partner("partner-admin", A),
            "dashboard",
            "",
        ),
        ("other, mapped org", other("org-b"), "other_app", B),
        ("other, a raw tenant id", other(A), "other_app", ""),
        ("other on the dashboard", other("org-b"), "dashboard", ""),
    ];
    for (what, token, surface, tenant) in cases {
        let r = t
            .authenticate_with(pb::AuthenticateRequest {
                token,
                surface: surface.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        if tenant.is_empty() {
            assert_eq!(reason(&r), "TOKEN_INVALID", "{what}");
        } else {
            assert!(r.allowed, "{what}: {r:?}");
            assert_eq!(r.principal.unwrap().tenant_id, tenant, "{what}");
        }
    }
}
