//! Verification rules, one algorithm and one attack at a time.

use std::sync::Arc;

use chrono::{Duration, Utc};
use serde_json::json;

use super::*;
use crate::crypto::jwks::parse_jwks;

#[path = "../../../tests/support/jwt_keys.rs"]
mod keys;
use keys::{claims, hs256_with, unsigned, TestKey};

const ISS: &str = "https://idp.example.com/";
const AUD: &str = "dashboard";

fn issuer_with(keys: Vec<VerifyingKey>) -> Verifier {
    let rules = IssuerRules::new(ISS, vec![AUD.into()]);
    Verifier::new(vec![Arc::new(Issuer::new(rules, KeySet::new(keys)))]).unwrap()
}

fn verifier_for(key: &TestKey) -> Verifier {
    let vk = if key.secret.is_empty() {
        VerifyingKey::from_pem(
            Some(key.kid.clone()),
            key.alg,
            key.public_pem.as_bytes(),
            &[],
        )
        .unwrap()
    } else {
        VerifyingKey::hmac(Some(key.kid.clone()), &key.secret, &[]).unwrap()
    };
    issuer_with(vec![vk])
}

fn verify(v: &Verifier, token: &str) -> Result<VerifiedToken, TokenError> {
    v.verify(token, Utc::now())
}

#[test]
fn every_algorithm_verifies_with_its_key() {
    let keys = [
        TestKey::hs(Algorithm::HS256, "h256"),
        TestKey::hs(Algorithm::HS384, "h384"),
        TestKey::hs(Algorithm::HS512, "h512"),
        TestKey::rsa(Algorithm::RS256, "rs"),
        TestKey::rsa(Algorithm::PS256, "ps"),
        TestKey::es256("e256"),
        TestKey::es384("e384"),
        TestKey::ed25519("ed"),
    ];
    for key in &keys {
        let v = verifier_for(key);
        let t = verify(&v, &key.sign(&claims(ISS, AUD, "acme", 60)))
            .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
        assert_eq!(t.tenant_id, "acme");
        assert_eq!(t.subject, "user-1");
        assert_eq!(t.scopes, ["read", "write"]);
    }
}

#[test]
fn every_algorithm_verifies_from_a_jwks() {
    let keys = [
        TestKey::rsa(Algorithm::RS256, "rs"),
        TestKey::rsa(Algorithm::PS256, "ps"),
        TestKey::es256("e256"),
        TestKey::es384("e384"),
        TestKey::ed25519("ed"),
    ];
    let doc = keys::jwks(&keys.iter().collect::<Vec<_>>());
    let set = parse_jwks(doc.as_bytes(), &[]).unwrap();
    assert_eq!(set.len(), 5);
    let v = issuer_with(set.into_keys());
    for key in &keys {
        verify(&v, &key.sign(&claims(ISS, AUD, "acme", 60)))
            .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
    }
}

#[test]
fn expired_and_not_yet_valid_tokens_are_refused_with_leeway() {
    let key = TestKey::es256("k");
    let v = verifier_for(&key);
    // 30 s leeway: expired 10 s ago still passes, 31 s ago does not.
    assert!(verify(&v, &key.sign(&claims(ISS, AUD, "acme", -10))).is_ok());
    assert_eq!(
        verify(&v, &key.sign(&claims(ISS, AUD, "acme", -31))),
        Err(TokenError::Expired)
    );
    let mut c = claims(ISS, AUD, "acme", 600);
    c["nbf"] = json!(keys::now() + 120);
    assert_eq!(
        verify(&v, &key.sign(&c)),
        Err(TokenError::Invalid("not yet valid"))
    );
    // The injected clock decides, not the system clock.
    let later = Utc::now() + Duration::seconds(700);
    assert_eq!(
        v.verify(&key.sign(&claims(ISS, AUD, "acme", 600)), later),
        Err(TokenError::Expired)
    );
}

#[test]
fn wrong_issuer_audience_and_missing_claims_are_invalid() {
    let key = TestKey::ed25519("k");
    let v = verifier_for(&key);
    let invalid = |c: serde_json::Value| verify(&v, &key.sign(&c)).unwrap_err();
    assert_eq!(
        invalid(claims("https://evil.example.com/", AUD, "acme", 60)),
        TokenError::Invalid("unknown issuer")
    );
    assert_eq!(
        invalid(claims(ISS, "other", "acme", 60)),
        TokenError::Invalid("wrong audience")
    );
    let mut c = claims(ISS, AUD, "acme", 60);
    c.as_object_mut().unwrap().remove("tenant_id");
    assert_eq!(invalid(c), TokenError::Invalid("no tenant claim"));
    let mut c = claims(ISS, AUD, "acme", 60);
    c.as_object_mut().unwrap().remove("exp");
    assert!(matches!(invalid(c), TokenError::Invalid(_)));
    let mut c = claims(ISS, AUD, "acme", 60);
    c.as_object_mut().unwrap().remove("sub");
    assert!(matches!(invalid(c), TokenError::Invalid(_)));
}

#[test]
fn tampered_unsigned_oversized_and_garbage_tokens_are_invalid() {
    let key = TestKey::rsa(Algorithm::RS256, "k");
    let v = verifier_for(&key);
    let token = key.sign(&claims(ISS, AUD, "acme", 60));
    // Swap the payload for one naming another tenant, keep the signature.
    let parts: Vec<&str> = token.split('.').collect();
    let forged = keys::claims(ISS, AUD, "victim", 60).to_string();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged),
        parts[2]
    );
    assert_eq!(
        verify(&v, &forged),
        Err(TokenError::Invalid("bad signature"))
    );
    assert!(matches!(
        verify(&v, &unsigned(&claims(ISS, AUD, "acme", 60))),
        Err(TokenError::Invalid(_))
    ));
    let mut big = claims(ISS, AUD, "acme", 60);
    big["pad"] = json!("x".repeat(MAX_TOKEN_BYTES));
    assert_eq!(
        verify(&v, &key.sign(&big)),
        Err(TokenError::Invalid("larger than 8 KiB"))
    );
    for garbage in ["", "a", "a.b", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30."] {
        assert!(verify(&v, garbage).is_err(), "{garbage:?}");
    }
}

#[test]
fn an_rsa_public_key_used_as_an_hmac_secret_is_refused() {
    let key = TestKey::rsa(Algorithm::RS256, "k");
    let v = verifier_for(&key);
    let token = hs256_with(
        key.public_pem.as_bytes(),
        "k",
        &claims(ISS, AUD, "acme", 60),
    );
    assert_eq!(
        verify(&v, &token),
        Err(TokenError::Invalid("algorithm not allowed for this key"))
    );
    // Same with no kid: no key of the issuer takes HS256.
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = None;
    let token = jsonwebtoken::encode(
        &header,
        &claims(ISS, AUD, "acme", 60),
        &jsonwebtoken::EncodingKey::from_secret(key.public_pem.as_bytes()),
    )
    .unwrap();
    assert!(verify(&v, &token).is_err());
    // An HMAC algorithm cannot be given a public key in config.
    assert!(
        VerifyingKey::from_pem(None, Algorithm::HS256, key.public_pem.as_bytes(), &[]).is_err()
    );
}

#[test]
fn an_es256_key_does_not_verify_es384_and_issuer_algorithms_narrow_keys() {
    let key = TestKey::es256("k");
    let pem = key.public_pem.as_bytes();
    assert!(VerifyingKey::from_pem(None, Algorithm::ES384, pem, &[]).is_err());
    // An issuer restricted to RS256 refuses PS256 from its RSA key.
    let rsa = TestKey::rsa(Algorithm::PS256, "r");
    let vk = VerifyingKey::from_pem(
        Some("r".into()),
        Algorithm::RS256,
        rsa.public_pem.as_bytes(),
        &[Algorithm::RS256],
    )
    .unwrap();
    let v = issuer_with(vec![vk]);
    assert!(verify(&v, &rsa.sign(&claims(ISS, AUD, "acme", 60))).is_err());
}

#[test]
fn the_kid_selects_the_key_and_an_unknown_kid_is_invalid() {
    let a = TestKey::es256("a");
    let b = TestKey::es256("b");
    let doc = keys::jwks(&[&a, &b]);
    let v = issuer_with(parse_jwks(doc.as_bytes(), &[]).unwrap().into_keys());
    assert!(verify(&v, &a.sign(&claims(ISS, AUD, "acme", 60))).is_ok());
    assert!(verify(&v, &b.sign(&claims(ISS, AUD, "acme", 60))).is_ok());
    // Without a kid every key of the right algorithm is tried.
    assert!(verify(&v, &b.sign_without_kid(&claims(ISS, AUD, "acme", 60))).is_ok());
    let c = TestKey::es256("c");
    assert_eq!(
        verify(&v, &c.sign(&claims(ISS, AUD, "acme", 60))),
        Err(TokenError::Invalid("unknown key id"))
    );
}

#[test]
fn scopes_come_from_the_configured_claim_or_scp() {
    let key = TestKey::hs(Algorithm::HS256, "k");
    let v = verifier_for(&key);
    let mut c = claims(ISS, AUD, "acme", 60);
    c.as_object_mut().unwrap().remove("scope");
    c["scp"] = json!(["keys:read", "keys:write"]);
    assert_eq!(
        verify(&v, &key.sign(&c)).unwrap().scopes,
        ["keys:read", "keys:write"]
    );
    c["scp"] = json!([1]);
    assert!(verify(&v, &key.sign(&c)).is_err());
}

#[test]
fn jwks_documents_skip_unusable_keys_and_refuse_malformed_ones() {
    let ed = TestKey::ed25519("ed");
    let doc = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        ed.jwk,
    ]});
    let set = parse_jwks(doc.to_string().as_bytes(), &[]).unwrap();
    assert_eq!(set.len(), 1);
    assert!(set.has_kid("ed"));
    let short = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "x", "x": "AAAA"}]});
    assert!(parse_jwks(short.to_string().as_bytes(), &[]).is_err());
    assert!(parse_jwks(b"{\"keys\": []}", &[]).is_err());
    assert!(parse_jwks(b"not json", &[]).is_err());
}

#[test]
fn short_hmac_secrets_and_duplicate_issuers_are_refused() {
    assert!(VerifyingKey::hmac(None, b"short", &[]).is_err());
    let rules = IssuerRules::new(ISS, vec![AUD.into()]);
    let one = Arc::new(Issuer::new(rules.clone(), KeySet::default()));
    let two = Arc::new(Issuer::new(rules, KeySet::default()));
    assert!(Verifier::new(vec![one, two]).is_err());
}

/// Every way a `Debug` or `Display` of some wrapper could spell out the
/// first bytes of `secret`: as a list of numbers (what a derived `Debug`
/// of `Vec<u8>` or `[u8]` prints, with or without brackets), hex, base64.
fn renderings_of(secret: &[u8]) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let head = &secret[..6];
    let numbers: Vec<String> = head.iter().map(u8::to_string).collect();
    vec![
        numbers.join(", "),
        numbers.join(","),
        hex::encode(head),
        hex::encode_upper(head),
        STANDARD.encode(head),
        URL_SAFE_NO_PAD.encode(head),
    ]
}

#[test]
fn debug_output_holds_no_key_material() {
    let key = TestKey::hs(Algorithm::HS256, "k");
    let vk = VerifyingKey::hmac(Some("k".into()), &key.secret, &[]).unwrap();
    // The check itself works: a derived Debug of a struct holding the
    // secret is caught.
    #[derive(Debug)]
    #[allow(dead_code)]
    struct Derived<'a>(&'a [u8], Vec<u8>);
    let derived = format!("{:?}", Derived(&key.secret, key.secret.clone()));
    assert!(
        renderings_of(&key.secret)
            .iter()
            .any(|r| derived.contains(r.as_str())),
        "{derived}"
    );
    let v = verifier_for(&key);
    for shown in [
        format!("{vk:?}"),
        format!("{vk:#?}"),
        format!("{v:?}"),
        format!("{:?}", v.issuers()[0].keys()),
    ] {
        for rendering in renderings_of(&key.secret) {
            assert!(!shown.contains(&rendering), "{rendering} in {shown}");
        }
        assert!(shown.contains("VerifyingKey"), "{shown}");
    }
    let t = verify(&v, &key.sign(&claims(ISS, AUD, "acme", 60))).unwrap();
    assert!(!format!("{t:?}").contains("exp"));
}

/// The JWKS refresher under a paused clock: a flood of unknown `kid`s costs
/// one fetch per `min_gap`, never one per token.
#[tokio::test(start_paused = true)]
async fn unknown_kids_make_at_most_one_jwks_fetch_per_min_gap() {
    use crate::crypto::jwks::{http_client, JwksSource, RefreshPolicy, Refresher};
    use tokio::time::{Duration as Span, Instant};

    let known = TestKey::es256("known");
    let dir = std::env::temp_dir().join(format!("tg-jwks-gap-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(&file, keys::jwks(&[&known])).unwrap();
    let issuer = Arc::new(Issuer::new(
        IssuerRules::new(ISS, vec![AUD.into()]),
        KeySet::default(),
    ));
    let verifier = Verifier::new(vec![issuer.clone()]).unwrap();
    let gap = Span::from_secs(10);
    let refresher = Refresher::new(
        issuer,
        JwksSource::File(file),
        vec![],
        RefreshPolicy {
            every: Span::from_secs(3600),
            min_gap: gap,
            timeout: Span::from_secs(5),
        },
    );
    let stats = refresher.stats();
    let task = refresher.spawn(http_client(Span::from_secs(5)));
    // Virtual time: each wait is bounded, and an hour passes in no time.
    let fetches = |n: u64| {
        let stats = stats.clone();
        async move {
            let wait = stats.wait_until(|s| s.ok() + s.failed() >= n);
            tokio::time::timeout(Span::from_secs(600), wait)
                .await
                .is_ok()
        }
    };
    assert!(fetches(1).await, "the first fetch");
    let first = Instant::now();

    // Twenty tokens naming kids nobody published, all at once.
    for i in 0..20 {
        let stranger = TestKey::es256(&format!("stranger-{i}"));
        let token = stranger.sign(&claims(ISS, AUD, "acme", 60));
        assert_eq!(
            verify(&verifier, &token),
            Err(TokenError::Invalid("unknown key id"))
        );
    }
    assert!(fetches(2).await, "an unknown kid asks for a fetch");
    let second = Instant::now();
    assert_eq!(stats.ok(), 2, "one fetch for the first stranger");
    assert!(
        second - first >= gap,
        "fetched {:?} after the last",
        second - first
    );
    // The tokens that arrived meanwhile ask for one more look, a gap later.
    assert!(fetches(3).await);
    assert_eq!(stats.ok(), 3);
    assert!(
        Instant::now() - second >= gap,
        "{:?}",
        Instant::now() - second
    );
    // And nothing else until the regular refresh, an hour on.
    assert!(!fetches(4).await, "{} fetches", stats.ok());
    assert_eq!((stats.ok(), stats.failed()), (3, 0));
    task.abort();
    std::fs::remove_dir_all(dir).unwrap();
}
