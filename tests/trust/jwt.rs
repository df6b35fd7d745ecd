//! JWT trust: JWKS fetching, issuers' tenants, surfaces' issuers.

use super::*;

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
    let failed = stats.wait_until(|s| s.failed() > 0);
    tokio::time::timeout(std::time::Duration::from_secs(10), failed)
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
