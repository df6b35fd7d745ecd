//! What each fuzz target feeds its input to. Shared by the coverage-guided
//! targets in `fuzz/` (cargo fuzz) and by `tests/fuzz_corpus.rs`, which runs
//! every input kept in `fuzz/corpus/` as a regression test. A target
//! "fails" only by panicking: every input must get an answer or a typed
//! error.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

use tollgate::authz::{Authenticator, UsageRecorder};
use tollgate::cache::{CacheSettings, Caches};
use tollgate::clock::Clock;
use tollgate::crypto::jwt::{Issuer, IssuerRules, KeySet, Verifier, VerifyingKey};
use tollgate::crypto::{Pepper, Peppers};
use tollgate::grpc::envoy::{EnvoyAuthz, EnvoySettings};
use tollgate::profile::Profile;
use tollgate::store::MemoryStore;

/// The shipped profiles, by name, parsed once.
pub fn shipped_profiles() -> &'static [Profile] {
    static PROFILES: OnceLock<Vec<Profile>> = OnceLock::new();
    PROFILES.get_or_init(|| {
        // Relative to this file, so the fuzz crate finds them too.
        [
            include_str!("../../profiles/default.toml"),
            include_str!("../../profiles/msgflash.toml"),
            include_str!("../../profiles/mailsage.toml"),
            include_str!("../../profiles/msgine.toml"),
            include_str!("../../profiles/messagesmart.toml"),
        ]
        .iter()
        .map(|text| Profile::from_toml(text).unwrap())
        .collect()
    })
}

/// A well-formed key of each shipped profile, generated once per process.
/// The corpus holds `$KEY` in their place: no key literal is committed
/// (secret scanners find our keys by their checksum, and rightly so).
fn generated_keys() -> &'static [String] {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    KEYS.get_or_init(|| {
        shipped_profiles()
            .iter()
            .map(|p| {
                let env = &p.key_format.environments()[0];
                p.key_format.generate(env).expose().to_string()
            })
            .collect()
    })
}

/// The key parser of every shipped profile: `Ok` only for a well-formed key
/// of that profile, which must then re-parse to itself. `$KEY` in the input
/// stands for that profile's generated key.
pub fn key_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (profile, key) in shipped_profiles().iter().zip(generated_keys()) {
        let text = text.replace("$KEY", key);
        let text = text.as_str();
        if let Ok(parsed) = profile.key_format.parse(text) {
            assert_eq!(parsed.expose(), text);
            assert!(profile.key_format.has_environment(parsed.environment()));
        }
    }
}

const ISSUER: &str = "https://issuer.fuzz/";
const AUDIENCE: &str = "fuzz";
const HS_SECRET: &[u8] = b"fuzz-hs256-secret-0123456789abcdef";

fn verifier() -> &'static Arc<Verifier> {
    static VERIFIER: OnceLock<Arc<Verifier>> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let rules = IssuerRules::new(ISSUER, vec![AUDIENCE.into()]);
        let keys = vec![
            VerifyingKey::hmac(Some("hs".into()), HS_SECRET, &[]).unwrap(),
            VerifyingKey::hmac(None, HS_SECRET, &[]).unwrap(),
        ];
        Arc::new(Verifier::new(vec![Arc::new(Issuer::new(rules, KeySet::new(keys)))]).unwrap())
    })
}

/// JWT header and claims handling: any string as a token, with the input's
/// own header and claims when it holds `header.claims` as JSON, signed with
/// the configured secret so the claims checks are reached too.
pub fn jwt_verify(data: &[u8]) {
    let now = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = verifier().verify(text, now);
    let _ = verifier().verify_from(text, now, Some(ISSUER));
    if let Some((header, claims)) = text.split_once('\n') {
        let token = sign_hs256(header, claims);
        let _ = verifier().verify(&token, now);
    }
}

fn sign_hs256(header: &str, claims: &str) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!("{}.{}", b64.encode(header), b64.encode(claims));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HS_SECRET).unwrap();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        b64.encode(mac.finalize().into_bytes())
    )
}

/// The default profile from TOML: any text must parse or be refused with a
/// typed error, never panic.
pub fn profile_load(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(profile) = Profile::from_toml(text) {
            // A profile that loads answers every question about itself.
            let _ = profile.surface(&profile.default_surface).unwrap();
            let _ = profile.plan(&profile.default_plan).unwrap();
        }
    }
}

struct EnvoyFixture {
    runtime: tokio::runtime::Runtime,
    adapters: Vec<EnvoyAuthz>,
}

fn envoy() -> &'static EnvoyFixture {
    static FIXTURE: OnceLock<EnvoyFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let adapters = shipped_profiles()
            .iter()
            .map(|profile| {
                let _guard = runtime.enter();
                let pepper =
                    Pepper::new(1, b"fuzz-pepper-0123456789abcdef-0123456789".to_vec()).unwrap();
                let clock = Clock::system();
                let authz = Authenticator::new(
                    Arc::new(profile.clone()),
                    Peppers::new(pepper, vec![]).unwrap(),
                    Arc::new(MemoryStore::new()),
                    Arc::new(Caches::new(&CacheSettings::default())),
                    Arc::new(UsageRecorder::default()),
                    clock.clone(),
                )
                .with_jwt(verifier().clone());
                EnvoyAuthz::new(Arc::new(authz), clock, &EnvoySettings::default())
            })
            .collect();
        EnvoyFixture { runtime, adapters }
    })
}

/// The ext_authz request mapping: the input's lines are `h <name>:<value>`
/// (a request header; `$KEY` in a value stands for the profile's generated
/// key), `c <key>=<value>` (a route's context extension),
/// `p <path>`, `m <method>` or `i <id>`; the request goes through the whole
/// `Check` of every shipped profile (in-memory store). Any answer or typed
/// error is fine; an allow is impossible (no key is stored).
pub fn envoy_check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut http = HttpRequest::default();
    let mut extensions = HashMap::new();
    for line in text.lines() {
        let Some((kind, rest)) = line.split_once(' ') else {
            continue;
        };
        match kind {
            "h" => {
                if let Some((name, value)) = rest.split_once(':') {
                    http.headers.insert(name.to_string(), value.to_string());
                }
            }
            "c" => {
                if let Some((key, value)) = rest.split_once('=') {
                    extensions.insert(key.to_string(), value.to_string());
                }
            }
            "p" => http.path = rest.to_string(),
            "m" => http.method = rest.to_string(),
            "i" => http.id = rest.to_string(),
            _ => {}
        }
    }
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(http),
                ..Default::default()
            }),
            context_extensions: extensions,
            ..Default::default()
        }),
    };
    let fixture = envoy();
    for (adapter, key) in fixture.adapters.iter().zip(generated_keys()) {
        let mut request = request.clone();
        if let Some(http) = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
        {
            for value in http.headers.values_mut() {
                *value = value.replace("$KEY", key);
            }
        }
        let answer = fixture
            .runtime
            .block_on(adapter.check(tonic::Request::new(request)));
        if let Ok(response) = answer {
            let status = response.into_inner().status.unwrap_or_default();
            assert_ne!(status.code, 0, "nothing is stored, so nothing is allowed");
        }
    }
}

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus runner.
pub const TARGETS: [(&str, Target); 4] = [
    ("key_parse", key_parse),
    ("jwt_verify", jwt_verify),
    ("envoy_check", envoy_check),
    ("profile_load", profile_load),
];
