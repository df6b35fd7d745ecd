//! The four reference products: their documented headers, codes and bodies.

use super::*;

/// What each reference product documents for a credential it refuses.
struct Expected {
    profile: &'static str,
    plan: &'static str,
    /// How a client sends the key, per the product's docs.
    header: (&'static str, &'static str),
    unknown: (&'static str, u32, serde_json::Value),
    malformed_code: &'static str,
    missing_code: &'static str,
}

fn reference_products() -> Vec<Expected> {
    use serde_json::json;
    vec![
        Expected {
            profile: "msgflash",
            plan: "free",
            header: ("x-api-key", ""),
            unknown: (
                "UNAUTHORIZED",
                401,
                json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or revoked API key"}}),
            ),
            malformed_code: "UNAUTHORIZED",
            missing_code: "UNAUTHORIZED",
        },
        Expected {
            profile: "mailsage",
            plan: "free",
            header: ("Authorization", "Bearer "),
            unknown: (
                "invalid_api_key",
                401,
                json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"}),
            ),
            malformed_code: "invalid_api_key",
            missing_code: "invalid_api_key",
        },
        Expected {
            profile: "msgine",
            plan: "developer",
            header: ("X-Api-Key", ""),
            unknown: (
                "unauthorized",
                401,
                json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}}),
            ),
            malformed_code: "unauthorized",
            missing_code: "unauthorized",
        },
        Expected {
            profile: "messagesmart",
            plan: "default",
            header: ("X-API-Key", ""),
            unknown: (
                "api_key_invalid",
                401,
                json!({"success": false, "error": {
                    "code": "api_key_invalid", "message": "API key is invalid.", "httpStatus": 401}}),
            ),
            malformed_code: "api_key_invalid",
            missing_code: "api_key_missing",
        },
    ]
}

fn with_header(name: &str, value: String) -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        headers: [(name.to_string(), value)].into(),
        ..Default::default()
    }
}

#[sqlx::test]
async fn each_reference_product_gets_its_documented_header_codes_and_bodies(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    for e in reference_products() {
        let mut t = spawn(&conn, e.profile).await;
        let tenant = format!("t-{}", e.profile);
        t.create_tenant(&tenant, e.plan).await;
        let (secret, _) = t.create_key(&tenant).await;
        let (header, scheme) = e.header;

        let ok = t
            .authenticate_with(with_header(header, format!("{scheme}{secret}")))
            .await
            .unwrap();
        assert!(ok.allowed, "{}: {ok:?}", e.profile);

        // Well-formed, valid checksum, but never issued.
        let stranger = t.profile.key_format.generate("live");
        let r = t
            .authenticate_with(with_header(
                header,
                format!("{scheme}{}", stranger.expose()),
            ))
            .await
            .unwrap();
        let d = r.denial.unwrap();
        assert_eq!(d.reason, "KEY_UNKNOWN", "{}", e.profile);
        assert_eq!((d.code.as_str(), d.http_status), (e.unknown.0, e.unknown.1));
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body, e.unknown.2, "{}", e.profile);

        // One character changed: the checksum catches it before any lookup.
        let mut typo = secret.clone().into_bytes();
        let last = typo.len() - 1;
        typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
        let typo = String::from_utf8(typo).unwrap();
        let d = t
            .authenticate_with(with_header(header, format!("{scheme}{typo}")))
            .await
            .unwrap()
            .denial
            .unwrap();
        assert_eq!(d.reason, "CREDENTIAL_MALFORMED", "{}", e.profile);
        assert_eq!(d.code, e.malformed_code);

        let d = t
            .authenticate_with(pb::AuthenticateRequest::default())
            .await
            .unwrap()
            .denial
            .unwrap();
        assert_eq!(d.reason, "CREDENTIAL_MISSING", "{}", e.profile);
        assert_eq!(d.code, e.missing_code);
        assert_eq!(d.http_status, 401);
    }
}

#[sqlx::test]
async fn msgflash_refuses_an_api_key_sent_as_a_bearer_token(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    t.create_tenant("acme", "free").await;
    let (secret, _) = t.create_key("acme").await;
    let r = t
        .authenticate_with(with_header("authorization", format!("Bearer {secret}")))
        .await
        .unwrap();
    let d = r.denial.unwrap();
    assert_eq!(d.reason, "WRONG_CREDENTIAL_FOR_SURFACE");
    assert_eq!(d.http_status, 401);
}
