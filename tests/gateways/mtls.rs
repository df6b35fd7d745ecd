//! The listener over mutual TLS, with NGINX as the TLS client.

use super::*;

/// A CA, and certificates it signed for the server (`localhost`) and the
/// gateway, as PEM files in `dir`: `ca.crt`, `server.{crt,key}`,
/// `client.{crt,key}`.
fn pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    // Distinct names: OpenSSL (NGINX) takes a leaf whose issuer name is its
    // own subject name for a self-signed certificate.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "forward-auth test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for (name, san) in [("server", "localhost"), ("client", "gateway")] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, san);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[sqlx::test]
async fn over_mutual_tls_only_a_gateway_with_a_trusted_certificate_gets_a_decision(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let dir = std::env::temp_dir().join(format!("tollgate-fa-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    pki(&dir);
    let tls = tollgate::tls::Reloading::start(tollgate::tls::TlsSettings {
        cert_file: dir.join("server.crt"),
        key_file: dir.join("server.key"),
        client_ca_file: Some(dir.join("ca.crt")),
        reload_seconds: 60,
    })
    .unwrap();
    // mTLS instead of a gateway secret.
    let mut t = spawn(&conn, "msgflash").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward_auth = t
        .running
        .serve_forward_auth(listener, None, Some(tls), 64)
        .unwrap();
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let upstream = Upstream::start().await;
    // The example's subrequest, over TLS, with or without a certificate.
    let plain = "proxy_pass http://tollgate_forward_auth/auth/nginx?$tollgate_policy;";
    let over_tls = |with_certificate: bool| {
        let d = dir.display();
        let mut to = format!(
            "proxy_pass https://tollgate_forward_auth/auth/nginx?$tollgate_policy;\n            proxy_ssl_trusted_certificate {d}/ca.crt;\n            proxy_ssl_verify on;\n            proxy_ssl_name localhost;"
        );
        if with_certificate {
            to.push_str(&format!(
                "\n            proxy_ssl_certificate {d}/client.crt;\n            proxy_ssl_certificate_key {d}/client.key;"
            ));
        }
        vec![(plain, to)]
    };
    let path = "/api/v1/messages/send";

    let trusted = Nginx::start_with("msgflash", forward_auth, upstream.addr, over_tls(true)).await;
    let r = trusted.get(path, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-tollgate-tenant-id"], json!(["acme"]));
    let r = trusted.get(path, &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"]["message"], "Missing API key");

    // Without a certificate the handshake fails: NGINX's failure status.
    let stranger =
        Nginx::start_with("msgflash", forward_auth, upstream.addr, over_tls(false)).await;
    let r = stranger.get(path, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream.hits(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
