//! The whole matrix: every RPC as every kind of caller.

use super::*;
use tollgate::grpc::pb::revocation_service_client::RevocationServiceClient;

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
/// PERMISSION_DENIED, `N` NOT_FOUND, `I` INVALID_ARGUMENT, `F`
/// FAILED_PRECONDITION (admitted, then refused by the profile: the default
/// profile takes no legacy keys, so only the operator reaches that check).
/// Adding an RPC is one line here and one arm in [`call`].
#[rustfmt::skip]
const MATRIX: &[(Rpc, &str, &str)] = &[
    //                                           anon bog key gw  back view dev adm own own>B ext op
    (Rpc::Authenticate, "", /*                */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::CheckQuota, "by api_key", /*        */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::CheckQuota, "by tenant_id", /*      */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::CheckQuota, "by key_id", /*         */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::GetUsage, "by tenant_id", /*        */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::GetUsage, "by key_id", /*           */ "U   U   U   .   P    .    .   .   .   N     U   ."),
    (Rpc::CreateKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::RevokeKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::GetKey, "", /*                      */ "U   U   U   P   P    .    .   .   .   N     U   ."),
    (Rpc::ListKeys, "", /*                    */ "U   U   U   P   P    .    .   .   .   N     U   ."),
    (Rpc::RotateKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::UpdateKey, "", /*                   */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::ImportKeys, "", /*                  */ "U   U   U   P   P    P    P   P   P   P     U   F"),
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
    (Rpc::UpdateUser, "role", /*              */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::DeleteUser, "", /*                  */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::ListAuditEvents, "", /*             */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::SignInWithProvider, "unknown provider", "I   I   I   I   I    I    I   I   I   I     I   I"),
    (Rpc::EnvoyCheck, "", /*                  */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::HealthCheck, "", /*                 */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::HealthWatch, "", /*                 */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::Reflection, "", /*                  */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::ReflectionAlpha, "", /*             */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::ShouldRateLimit, "by api_key", /*   */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    // No limit of this profile matches it: it spends nothing, so anyone may
    // ask (a matched profile descriptor needs the gateway: tests/ratelimit.rs).
    (Rpc::ShouldRateLimit, "unmatched", /*    */ ".   .   .   .   .    .    .   .   .   .     .   ."),
    (Rpc::ShouldRateLimit, "by tenant_id", /* */ "U   U   U   .   P    P    P   P   P   P     U   ."),
    (Rpc::ShouldRateLimit, "by key_id", /*    */ "U   U   U   .   P    P    P   P   P   P     U   ."),
    (Rpc::ListPolicyRevocations, "", /*       */ "U   U   U   P   P    P    P   .   .   N     U   ."),
    (Rpc::SetRevocationPolicy, "", /*         */ "U   U   U   P   P    P    P   P   P   P     U   ."),
    (Rpc::ReportLeakedKeys, "", /*            */ "U   U   U   P   P    P    P   P   P   P     U   ."),
];

fn symbol(code: Code) -> String {
    match code {
        Code::Ok => ".".into(),
        Code::Unauthenticated => "U".into(),
        Code::PermissionDenied => "P".into(),
        Code::NotFound => "N".into(),
        Code::InvalidArgument => "I".into(),
        Code::FailedPrecondition => "F".into(),
        other => format!("{other:?}"),
    }
}

/// A console client connected from its own loopback address (127.0.1.x):
/// sign-ups and token requests are throttled per address, and the matrix
/// is about who is admitted, not how often.
async fn fresh_address(fx: &Fixture, n: u32) -> ConsoleServiceClient<Channel> {
    let local = std::net::Ipv4Addr::new(127, 0, 1, (n % 250) as u8 + 1);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", fx.t.running.local_addr()))
            .unwrap()
            .local_address(Some(local.into()))
            .connect()
            .await
            .unwrap();
    ConsoleServiceClient::new(channel)
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
        (Rpc::GetUsage, "by tenant_id") => code(
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    tenant_id: tenant,
                    ..Default::default()
                },
            ))
            .await,
        ),
        // Quotas and per-key request counts: only of the caller's own keys.
        (Rpc::GetUsage, "by key_id") => code(
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    key_id: key,
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
        (Rpc::ImportKeys, _) => code(
            auth.import_keys(with(
                b,
                pb::ImportKeysRequest {
                    tenant_id: tenant,
                    keys: vec![pb::ImportedKey {
                        sha256_hex: format!("{n:064x}"),
                        name: format!("imported {n}"),
                        ..Default::default()
                    }],
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
            fresh_address(fx, n)
                .await
                .sign_up(with(
                    b,
                    pb::SignUpRequest {
                        email: format!("signup{n}@example.com"),
                        password: PASSWORD.into(),
                        tenant_name: "Signed up".into(),
                        client_address: String::new(),
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
            fresh_address(fx, n)
                .await
                .request_email_verification(with(
                    b,
                    pb::RequestEmailVerificationRequest {
                        email: format!("nobody{n}@example.com"),
                        client_address: String::new(),
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
            fresh_address(fx, n)
                .await
                .request_password_reset(with(
                    b,
                    pb::RequestPasswordResetRequest {
                        email: format!("nobody{n}@example.com"),
                        client_address: String::new(),
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
        (Rpc::UpdateUser, _) | (Rpc::DeleteUser, _) => {
            // A fresh viewer of the aimed-at tenant, made by the operator.
            let email = format!("target{n}@example.com");
            console
                .create_user(op(pb::CreateUserRequest {
                    tenant_id: tenant.clone(),
                    email: email.clone(),
                    password: PASSWORD.into(),
                    role: "viewer".into(),
                }))
                .await
                .unwrap();
            let user_id = console
                .list_users(op(pb::ListUsersRequest {
                    tenant_id: tenant.clone(),
                }))
                .await
                .unwrap()
                .into_inner()
                .users
                .into_iter()
                .find(|u| u.email == email)
                .expect("the user just made")
                .user_id;
            if rpc == Rpc::UpdateUser {
                code(
                    console
                        .update_user(with(
                            b,
                            pb::UpdateUserRequest {
                                tenant_id: tenant,
                                user_id,
                                update_mask: vec!["role".into()],
                                role: "developer".into(),
                                ..Default::default()
                            },
                        ))
                        .await,
                )
            } else {
                code(
                    console
                        .delete_user(with(
                            b,
                            pb::DeleteUserRequest {
                                tenant_id: tenant,
                                user_id,
                            },
                        ))
                        .await,
                )
            }
        }
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
        // Open like Login: every caller reaches the checks of the request
        // itself (no provider is configured here: INVALID_ARGUMENT).
        (Rpc::SignInWithProvider, _) => code(
            console
                .sign_in_with_provider(with(
                    b,
                    pb::SignInWithProviderRequest {
                        provider: "google".into(),
                        id_token: "not.an.id-token".into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        (Rpc::ListPolicyRevocations, _) => code(
            RevocationServiceClient::new(fx.t.channel.clone())
                .list_policy_revocations(with(
                    b,
                    pb::ListPolicyRevocationsRequest {
                        tenant_id: tenant,
                        ..Default::default()
                    },
                ))
                .await,
        ),
        (Rpc::SetRevocationPolicy, _) => code(
            RevocationServiceClient::new(fx.t.channel.clone())
                .set_revocation_policy(with(
                    b,
                    pb::SetRevocationPolicyRequest {
                        tenant_id: tenant,
                        policy: None,
                    },
                ))
                .await,
        ),
        (Rpc::ReportLeakedKeys, _) => code(
            RevocationServiceClient::new(fx.t.channel.clone())
                .report_leaked_keys(with(
                    b,
                    pb::ReportLeakedKeysRequest {
                        reporter: "matrix".into(),
                        tokens: vec![pb::LeakedToken {
                            token: "not-one-of-ours".into(),
                            ..Default::default()
                        }],
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
        (Rpc::ShouldRateLimit, variant) => {
            use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
            use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
            use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
            use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
            let (k, v) = match variant {
                "by api_key" => ("api_key", fx.a_secret.clone()),
                "by tenant_id" => ("tenant_id", tenant),
                "by key_id" => ("key_id", key),
                _ => ("remote_address", "192.0.2.1".to_string()),
            };
            let ask = RateLimitRequest {
                domain: "edge".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![Entry {
                        key: k.into(),
                        value: v,
                    }],
                    ..Default::default()
                }],
                hits_addend: 0,
            };
            let r = RateLimitServiceClient::new(fx.t.channel.clone())
                .should_rate_limit(with(b, ask))
                .await;
            if let Ok(r) = &r {
                assert_eq!(r.get_ref().statuses.len(), 1, "answered: {r:?}");
            }
            code(r)
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
    served.push("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit".into());
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
