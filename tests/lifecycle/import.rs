//! Key import at cut-over: each product's documented example key, raw or as
//! its SHA-256, brought into a tenant as a legacy key, accepted through the
//! product's own header where the profile accepts legacy keys; unknown
//! legacy-shaped keys still cost no query once the budget is spent; only
//! the operator may import.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Request};

use crate::common::*;
use crate::spy_store::SpyStore;
use tollgate::grpc::pb;
use tollgate::profile::Profile;
use tollgate::store::PostgresStore;

/// A shipped profile with legacy keys accepted (`[keys.legacy]`).
fn with_legacy(name: &str) -> Profile {
    let path = format!("{}/profiles/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap() + "\n[keys.legacy]\n";
    Profile::from_toml(&text).unwrap()
}

fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn raw(key: &str) -> pb::ImportedKey {
    pb::ImportedKey {
        api_key: key.into(),
        name: "from the old system".into(),
        ..Default::default()
    }
}

fn digest_of(key: &str) -> pb::ImportedKey {
    pb::ImportedKey {
        sha256_hex: sha256_hex(key),
        name: "digest only".into(),
        environment: "live".into(),
        ..Default::default()
    }
}

async fn import(
    t: &mut Tollgate,
    tenant: &str,
    keys: Vec<pb::ImportedKey>,
) -> Result<Vec<pb::ApiKey>, tonic::Status> {
    Ok(t.auth
        .import_keys(op(pb::ImportKeysRequest {
            tenant_id: tenant.into(),
            keys,
        }))
        .await?
        .into_inner()
        .keys)
}

/// The product, its plan, how its document sends the key, and two keys in
/// its documented example format.
struct Cutover {
    profile: &'static str,
    plan: &'static str,
    header: (&'static str, &'static str),
    example: &'static str,
    another: &'static str,
    unknown_code: &'static str,
}

fn products() -> Vec<Cutover> {
    vec![
        Cutover {
            profile: "msgflash",
            plan: "pro",
            header: ("x-api-key", ""),
            // The document's example key, verbatim.
            example: "msgf_live_a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2",
            another: "msgf_live_0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
            unknown_code: "UNAUTHORIZED",
        },
        Cutover {
            profile: "mailsage",
            plan: "pro",
            header: ("Authorization", "Bearer "),
            example: "ms_live_xxxxxxxxxxxxxxxxxxxx",
            another: "ms_live_Ab3dE5gH7jK9mN1pQ3sT",
            unknown_code: "invalid_api_key",
        },
        Cutover {
            profile: "msgine",
            plan: "business",
            header: ("X-Api-Key", ""),
            // The document elides the body ("msgine_live_abc123..."): completed.
            example: "msgine_live_abc123def456ghi789jkl012",
            another: "msgine_live_zyx987wvu654tsr321qpo000",
            unknown_code: "unauthorized",
        },
        Cutover {
            profile: "messagesmart",
            plan: "default",
            header: ("X-API-Key", ""),
            example: "ms_live_1a2b3c4d5e6f7g8h9i0j",
            another: "ms_live_0j9i8h7g6f5e4d3c2b1a",
            unknown_code: "api_key_invalid",
        },
    ]
}

async fn send(t: &mut Tollgate, header: (&str, &str), key: &str) -> pb::AuthenticateResponse {
    t.authenticate_with(pb::AuthenticateRequest {
        headers: [(header.0.to_string(), format!("{}{key}", header.1))].into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[sqlx::test]
async fn each_products_example_key_imported_raw_or_by_digest_passes_its_documented_header(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    for p in products() {
        let mut t = spawn_with(&conn, Options::new(with_legacy(p.profile))).await;
        let tenant = format!("old-{}", p.profile);
        t.create_tenant(&tenant, p.plan).await;

        let keys = import(&mut t, &tenant, vec![raw(p.example), digest_of(p.another)])
            .await
            .unwrap();
        assert_eq!(keys.len(), 2, "{}", p.profile);
        for k in &keys {
            assert_eq!(k.format, "legacy", "{}", p.profile);
            assert_eq!(k.environment, "live");
            assert!(
                k.hint.ends_with("_live_…"),
                "no secret in the hint: {}",
                k.hint
            );
        }

        // Both reach the same stored digest the decision path computes.
        for (key, record) in [(p.example, &keys[0]), (p.another, &keys[1])] {
            let r = send(&mut t, p.header, key).await;
            assert!(r.allowed, "{}: {key}: {r:?}", p.profile);
            let principal = r.principal.unwrap();
            assert_eq!(principal.key_id, record.key_id);
            assert_eq!(principal.tenant_id, tenant);
        }

        // A legacy-shaped key never imported is KEY_UNKNOWN, as documented.
        let mut stranger = p.example.to_string();
        stranger.replace_range(stranger.len() - 3.., "q7z");
        let d = send(&mut t, p.header, &stranger).await.denial.unwrap();
        assert_eq!(
            (d.reason.as_str(), d.code.as_str()),
            ("KEY_UNKNOWN", p.unknown_code)
        );

        // Importing a key twice changes nothing: the whole call is refused.
        let err = import(&mut t, &tenant, vec![raw("x"), raw(p.example)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let err = import(&mut t, &tenant, vec![digest_of(p.example)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{}: {err:?}", p.profile);

        // Where the profile does not accept legacy keys, they fail the
        // checksum gate (no lookup), and importing is refused.
        let mut strict = spawn(&conn, p.profile).await;
        let d = send(&mut strict, p.header, p.example).await.denial.unwrap();
        assert_eq!(d.reason, "CREDENTIAL_MALFORMED", "{}", p.profile);
        let err = import(&mut strict, &tenant, vec![raw(p.another)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
}

#[sqlx::test]
async fn a_flood_of_unknown_legacy_shaped_keys_costs_no_queries_once_the_budget_is_spent(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let spy = Arc::new(SpyStore::new(Arc::new(PostgresStore::new(
        pool(&conn).await,
    ))));
    let mut t = spawn_on_store(spy.clone(), Options::new(with_legacy("messagesmart"))).await;
    t.create_tenant("shop", "default").await;
    let example = "ms_live_1a2b3c4d5e6f7g8h9i0j";
    import(&mut t, "shop", vec![raw(example)]).await.unwrap();
    let mut loaded = t.running.caches().known_loaded();
    loaded.wait_for(|loaded| *loaded).await.unwrap();
    t.running.clock().freeze_at(chrono::Utc::now());
    let before = spy.key_reads();
    for i in 0..150 {
        let key = format!("ms_live_{:020x}", 0xdead_0000_u64 + i);
        let r = send(&mut t, ("X-API-Key", ""), &key).await;
        assert_eq!(reason(&r), "KEY_UNKNOWN");
    }
    // Each unknown key may cost a native and a legacy lookup while the
    // budget (100 per second, the clock frozen) lasts; then none.
    let spent = spy.key_reads() - before;
    assert!(spent <= 100, "{spent} lookups for 150 unknown keys");
    let after_flood = spy.key_reads();
    let r = send(&mut t, ("X-API-Key", ""), "ms_live_ffffffffffffffffffff").await;
    assert_eq!(reason(&r), "KEY_UNKNOWN");
    assert_eq!(
        spy.key_reads(),
        after_flood,
        "spent: refused without a lookup"
    );
    // The imported key is known: it is looked up although the budget is spent.
    assert!(send(&mut t, ("X-API-Key", ""), example).await.allowed);
}

#[sqlx::test]
async fn only_the_operator_may_import_keys(_p: PgPoolOptions, conn: PgConnectOptions) {
    use tollgate::app::GuardParts;
    let gateway = "gateway-token-0123456789abcdef";
    let backend = "console-backend-token-0123456789";
    let store: Arc<dyn tollgate::store::Store> = Arc::new(PostgresStore::new(pool(&conn).await));
    let mut opts = Options::new(with_legacy("messagesmart"));
    opts.dashboard = tollgate::dashboard::Dashboard::configure(
        &tollgate::dashboard::JwtSettings::default(),
        &store,
        true,
    )
    .unwrap();
    opts.guard = GuardParts {
        gateway_token: Some(gateway.to_string().into()),
        console_backend_token: Some(backend.to_string().into()),
        ..GuardParts::default()
    };
    let mut t = spawn_on_store(store, opts).await;
    t.create_tenant("shop", "default").await;
    // A console owner of their own tenant.
    let mut console =
        tollgate::grpc::pb::console_service_client::ConsoleServiceClient::new(t.channel.clone());
    let (email, password) = ("owner@old.test", "correct horse battery staple");
    console
        .sign_up(pb::SignUpRequest {
            email: email.into(),
            password: password.into(),
            tenant_name: "Old".into(),
            client_address: String::new(),
        })
        .await
        .unwrap();
    let login = console
        .login(pb::LoginRequest {
            email: email.into(),
            password: password.into(),
            client_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let request = |token: Option<&str>| {
        let mut r = Request::new(pb::ImportKeysRequest {
            tenant_id: "shop".into(),
            keys: vec![raw("ms_live_1a2b3c4d5e6f7g8h9i0j")],
        });
        if let Some(token) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        r
    };
    let mut auth = t.auth.clone();
    let code = |r: Result<tonic::Response<pb::ImportKeysResponse>, tonic::Status>| {
        r.map(|_| Code::Ok).unwrap_or_else(|e| e.code())
    };
    assert_eq!(
        code(auth.import_keys(request(None)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            auth.import_keys(request(Some("wrong-token-0123456789")))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(auth.import_keys(request(Some(gateway))).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(auth.import_keys(request(Some(backend))).await),
        Code::PermissionDenied
    );
    let owner = Some(login.access_token.as_str());
    assert_eq!(
        code(auth.import_keys(request(owner)).await),
        Code::PermissionDenied
    );
    // Nothing was imported by the refused calls.
    let keys = t
        .auth
        .list_keys(op(pb::ListKeysRequest {
            tenant_id: "shop".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.is_empty());
    assert_eq!(
        code(auth.import_keys(op(request(None).into_inner())).await),
        Code::Ok
    );
}
