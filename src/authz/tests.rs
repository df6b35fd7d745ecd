//! Decision pipeline unit tests against the in-memory store.
//!
//! Every test builds a [`Fixture`]: one store, clock and cache set shared by
//! an `Authenticator` and a `Manager`, loaded with a shipped profile. Writes
//! reach the caches through the store's invalidation feed, applied by
//! [`Fixture::sync`] as a replica's listener task applies it.

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex as AsyncMutex};

use super::*;
use crate::cache::CacheSettings;
use crate::crypto::Pepper;
use crate::domain::{
    KeyParseError, KeyUpdate, NewKey, SubscriptionStatus, TenantOverrides, TenantUpdate,
};
use crate::manage::{
    CreateKeyInput, CreateTenantInput, IssuedKey, Manager, UpdateKeyInput, UpdateTenantInput,
    MAX_TTL_SECONDS,
};
use crate::store::{
    Invalidation, KeyCap, KeyRef, MemoryStore, QuotaCounter, QuotaGrant, QuotaReport, QuotaTally,
    StoreError,
};

const MSGFLASH: &str = include_str!("../../profiles/msgflash.toml");
const MAILSAGE: &str = include_str!("../../profiles/mailsage.toml");
const MSGINE: &str = include_str!("../../profiles/msgine.toml");
const MESSAGESMART: &str = include_str!("../../profiles/messagesmart.toml");
const ALL_PROFILES: [&str; 4] = [MSGFLASH, MAILSAGE, MSGINE, MESSAGESMART];

// ------------------------------------------------------------------ fixture

type R<T> = Result<T, StoreError>;
type Time = DateTime<Utc>;
type Audit = crate::domain::console::AuditContext;
use crate::domain::revocation as rv;

/// The in-memory store, counting the reads the caches are meant to spare.
#[derive(Default)]
struct CountingStore {
    inner: MemoryStore,
    /// Key reads: one per statement (`find_key_by_digest` or
    /// `find_keys_by_digests`, however many digests it carries).
    key_lookups: AtomicUsize,
    tenant_reads: AtomicUsize,
    /// The digests of each `find_keys_by_digests` call, in call order.
    batches: std::sync::Mutex<Vec<Vec<KeyDigest>>>,
    /// Holds the next `find_keys_by_digests` call until opened.
    hold: std::sync::Mutex<Option<Arc<Hold>>>,
    /// While set, `find_keys_by_digests` fails with it (after any hold).
    failure: std::sync::Mutex<Option<StoreError>>,
}

/// A store call held until the test opens it.
#[derive(Default)]
struct Hold {
    /// Signalled when the held call has begun.
    entered: tokio::sync::Notify,
    open: tokio::sync::Notify,
}

impl CountingStore {
    /// The next batched key lookup waits until the returned hold is opened.
    fn hold_next_lookup(&self) -> Arc<Hold> {
        let hold = Arc::new(Hold::default());
        *self.hold.lock().unwrap() = Some(hold.clone());
        hold
    }

    fn batches(&self) -> Vec<Vec<KeyDigest>> {
        self.batches.lock().unwrap().clone()
    }
}

#[async_trait]
impl Store for CountingStore {
    async fn create_tenant(&self, t: Tenant, a: &Audit) -> R<Tenant> {
        self.inner.create_tenant(t, a).await
    }
    async fn get_tenant(&self, id: &TenantId) -> R<Option<Tenant>> {
        self.tenant_reads.fetch_add(1, SeqCst);
        self.inner.get_tenant(id).await
    }
    async fn update_tenant(
        &self,
        id: &TenantId,
        u: &TenantUpdate,
        now: Time,
        a: &Audit,
    ) -> R<Tenant> {
        self.inner.update_tenant(id, u, now, a).await
    }
    async fn list_tenants(&self, after: Option<&TenantId>, n: u32) -> R<Vec<Tenant>> {
        self.inner.list_tenants(after, n).await
    }
    async fn insert_key(&self, key: NewKey, cap: KeyCap<'_>, a: &Audit) -> R<KeyRecord> {
        self.inner.insert_key(key, cap, a).await
    }
    async fn insert_keys(&self, keys: Vec<NewKey>, a: &Audit) -> R<Vec<KeyRecord>> {
        self.inner.insert_keys(keys, a).await
    }
    async fn key_digests(&self) -> R<Vec<KeyDigest>> {
        self.inner.key_digests().await
    }
    async fn find_key_by_digest(&self, digest: &KeyDigest) -> R<Option<KeyRecord>> {
        self.key_lookups.fetch_add(1, SeqCst);
        self.inner.find_key_by_digest(digest).await
    }
    async fn find_keys_by_digests(&self, digests: &[KeyDigest]) -> R<Vec<KeyRecord>> {
        self.key_lookups.fetch_add(1, SeqCst);
        self.batches.lock().unwrap().push(digests.to_vec());
        let hold = self.hold.lock().unwrap().take();
        if let Some(hold) = hold {
            hold.entered.notify_one();
            hold.open.notified().await;
        }
        if let Some(e) = self.failure.lock().unwrap().clone() {
            return Err(e);
        }
        self.inner.find_keys_by_digests(digests).await
    }
    async fn get_key(&self, key: KeyRef<'_>) -> R<Option<KeyRecord>> {
        self.inner.get_key(key).await
    }
    async fn list_keys(
        &self,
        t: &TenantId,
        a: Option<KeyId>,
        n: u32,
        all: bool,
    ) -> R<Vec<KeyRecord>> {
        self.inner.list_keys(t, a, n, all).await
    }
    async fn revoke_key(
        &self,
        key: KeyRef<'_>,
        reason: &str,
        now: Time,
        a: &Audit,
    ) -> R<KeyRecord> {
        self.inner.revoke_key(key, reason, now, a).await
    }
    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        new: NewKey,
        until: Time,
        a: &Audit,
    ) -> R<(KeyRecord, KeyRecord)> {
        self.inner.rotate_key(old, new, until, a).await
    }
    async fn update_key(
        &self,
        key: KeyRef<'_>,
        u: &KeyUpdate,
        cap: KeyCap<'_>,
        now: Time,
        a: &Audit,
    ) -> R<KeyRecord> {
        self.inner.update_key(key, u, cap, now, a).await
    }
    async fn rehash_key(&self, id: KeyId, old: &KeyDigest, new: &KeyDigest, v: i32) -> R<()> {
        self.inner.rehash_key(id, old, new, v).await
    }
    async fn touch_keys(&self, used: &[(KeyId, Time)]) -> R<()> {
        self.inner.touch_keys(used).await
    }
    async fn add_request_counts(
        &self,
        hour: Time,
        counts: &[crate::domain::usage::KeyCounts],
    ) -> R<()> {
        self.inner.add_request_counts(hour, counts).await
    }
    async fn request_counts(
        &self,
        key: KeyId,
        days_from: Time,
        hours_from: Time,
    ) -> R<crate::domain::usage::RequestSeries> {
        self.inner.request_counts(key, days_from, hours_from).await
    }
    async fn lease_quota(
        &self,
        replica: uuid::Uuid,
        c: &QuotaCounter,
        chunk: u64,
        min: u64,
        limit: u64,
        consumed: i64,
    ) -> R<QuotaGrant> {
        self.inner
            .lease_quota(replica, c, chunk, min, limit, consumed)
            .await
    }
    async fn report_quota(
        &self,
        replica: uuid::Uuid,
        reports: &[QuotaReport],
    ) -> R<Vec<QuotaTally>> {
        self.inner.report_quota(replica, reports).await
    }
    async fn reclaim_quota_leases(&self, replica: uuid::Uuid, stale_after_secs: u32) -> R<u64> {
        self.inner
            .reclaim_quota_leases(replica, stale_after_secs)
            .await
    }
    async fn quota_used(&self, c: &QuotaCounter) -> R<u64> {
        self.inner.quota_used(c).await
    }
    async fn quota_consumed(&self, c: &QuotaCounter) -> R<u64> {
        self.inner.quota_consumed(c).await
    }
    async fn heartbeat(&self, replica: uuid::Uuid, stale_after_secs: u32) -> R<u32> {
        self.inner.heartbeat(replica, stale_after_secs).await
    }
    async fn leave(&self, replica: uuid::Uuid) -> R<()> {
        self.inner.leave(replica).await
    }
    fn watch(&self, tx: mpsc::Sender<Invalidation>) {
        self.inner.watch(tx)
    }
    async fn ping(&self) -> R<()> {
        self.inner.ping().await
    }
    async fn revocation_override(&self, t: &TenantId) -> R<Option<rv::PolicyOverride>> {
        self.inner.revocation_override(t).await
    }
    async fn set_revocation_override(
        &self,
        t: &TenantId,
        p: Option<&rv::PolicyOverride>,
        now: Time,
        a: &Audit,
    ) -> R<()> {
        self.inner.set_revocation_override(t, p, now, a).await
    }
    async fn policy_matches(
        &self,
        t: &TenantId,
        c: &rv::Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> R<Vec<rv::PolicyMatch>> {
        self.inner.policy_matches(t, c, after, limit).await
    }
    async fn revoke_by_policy(
        &self,
        t: &TenantId,
        c: &rv::Criteria,
        limit: u32,
        a: &Audit,
    ) -> R<Vec<rv::PolicyMatch>> {
        self.inner.revoke_by_policy(t, c, limit, a).await
    }
    async fn report_leak(
        &self,
        id: KeyId,
        revoke: bool,
        s: &rv::LeakSource,
        now: Time,
        a: &Audit,
    ) -> R<rv::LeakOutcome> {
        self.inner.report_leak(id, revoke, s, now, a).await
    }
}

/// A tenant that exists only so `sync` can publish a marker event.
const BARRIER: &str = "sync-barrier";

/// One replica: authenticator and manager over one store, clock and caches.
struct Fixture {
    profile: Arc<Profile>,
    store: Arc<CountingStore>,
    clock: Clock,
    caches: Arc<Caches>,
    usage: Arc<UsageRecorder>,
    auth: Authenticator,
    manager: Manager,
    invalidations: AsyncMutex<mpsc::Receiver<Invalidation>>,
}

fn peppers(current: i32, previous: &[i32]) -> Peppers {
    let pepper = |v: i32| Pepper::new(v, vec![v as u8; 32]).unwrap();
    let previous = previous.iter().map(|&v| pepper(v)).collect();
    Peppers::new(pepper(current), previous).unwrap()
}

impl Fixture {
    async fn new(profile: &str) -> Self {
        let profile = Arc::new(Profile::from_toml(profile).expect("a valid profile"));
        let store = Arc::new(CountingStore::default());
        let clock = Clock::default();
        let (tx, mut rx) = mpsc::channel(1024);
        store.watch(tx);
        assert_eq!(rx.recv().await, Some(Invalidation::Ready));
        let now = clock.now();
        let barrier = Tenant {
            id: TenantId::parse(BARRIER).unwrap(),
            name: BARRIER.into(),
            plan: profile.default_plan.clone(),
            status: SubscriptionStatus::Active,
            overrides: TenantOverrides::default(),
            created_at: now,
            updated_at: now,
        };
        store
            .create_tenant(barrier, &Audit::system())
            .await
            .unwrap();
        let manager = Manager::new(
            profile.clone(),
            peppers(1, &[]),
            store.clone(),
            clock.clone(),
        );
        let caches = Arc::new(Caches::new(&CacheSettings::default()));
        let usage = Arc::new(UsageRecorder::default());
        let auth = Authenticator::new(
            profile.clone(),
            peppers(1, &[]),
            store.clone(),
            caches.clone(),
            usage.clone(),
            clock.clone(),
        );
        let invalidations = AsyncMutex::new(rx);
        Self {
            profile,
            store,
            clock,
            caches,
            usage,
            auth,
            manager,
            invalidations,
        }
    }

    /// Another replica on the same store: its own peppers, cold caches.
    fn replica(&self, peppers: Peppers) -> Authenticator {
        let caches = Arc::new(Caches::new(&CacheSettings::default()));
        Authenticator::new(
            self.profile.clone(),
            peppers,
            self.store.clone(),
            caches,
            self.usage.clone(),
            self.clock.clone(),
        )
    }

    /// Applies every invalidation published so far: publishes a marker, then
    /// applies the feed in order up to it.
    async fn sync(&self) {
        let barrier = TenantId::parse(BARRIER).unwrap();
        let touch = TenantUpdate::default();
        self.store
            .update_tenant(&barrier, &touch, self.clock.now(), &Audit::system())
            .await
            .unwrap();
        let mut rx = self.invalidations.lock().await;
        while let Some(event) = rx.recv().await {
            self.caches.apply(&event);
            if event == Invalidation::Tenant(barrier.clone()) {
                return;
            }
        }
    }

    async fn tenant(&self, id: &str, plan: &str) {
        let input = CreateTenantInput {
            tenant_id: id.into(),
            name: id.into(),
            plan: plan.into(),
            ..Default::default()
        };
        self.manager.create_tenant(input).await.unwrap();
    }

    /// Changes one field of a tenant, then lets the change reach the caches.
    async fn update_tenant(&self, id: &str, field: &str, set: impl FnOnce(&mut UpdateTenantInput)) {
        let mut input = UpdateTenantInput {
            tenant_id: id.into(),
            update_mask: strings(&[field]),
            ..Default::default()
        };
        set(&mut input);
        self.manager.update_tenant(input).await.unwrap();
        self.sync().await;
    }

    async fn set_status(&self, id: &str, status: &str) {
        self.update_tenant(id, "subscription_status", |u| {
            u.subscription_status = status.into()
        })
        .await;
    }

    async fn set_plan(&self, id: &str, plan: &str) {
        self.update_tenant(id, "plan", |u| u.plan = plan.into())
            .await;
    }

    async fn set_allowed_scopes(&self, id: &str, scopes: &[&str]) {
        let overrides = Some(TenantOverrides {
            allowed_scopes: Some(strings(scopes)),
            ..Default::default()
        });
        self.update_tenant(id, "overrides", |u| u.overrides = overrides)
            .await;
    }

    async fn create_key(
        &self,
        tenant: &str,
        scopes: &[&str],
        ttl: Option<i64>,
    ) -> Result<IssuedKey> {
        self.manager
            .create_key(key_input(tenant, scopes, ttl))
            .await
    }

    async fn key(&self, tenant: &str) -> IssuedKey {
        self.create_key(tenant, &[], None).await.unwrap()
    }

    async fn revoke(&self, key: &IssuedKey) {
        self.manager
            .revoke_key(&id(key), "", "compromised")
            .await
            .unwrap();
        self.sync().await;
    }

    /// A request on `surface` carrying `headers`.
    async fn on(&self, surface: &str, headers: &[(&str, &str)]) -> Decision {
        let headers: HashMap<_, _> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let input = AuthInput {
            headers: Some(&headers),
            surface,
            ..Default::default()
        };
        self.auth.authenticate(input).await.expect("a decision")
    }

    /// A key already extracted by the caller, on the default surface.
    async fn check(&self, key: &str, required: &[&str]) -> Decision {
        let required = strings(required);
        let input = AuthInput {
            api_key: key,
            required_scopes: &required,
            ..Default::default()
        };
        self.auth.authenticate(input).await.expect("a decision")
    }

    async fn allow(&self, key: &IssuedKey, required: &[&str]) -> Principal {
        allowed(self.check(key.secret.expose(), required).await)
    }

    async fn deny(&self, key: &IssuedKey, required: &[&str]) -> Reason {
        denied(self.check(key.secret.expose(), required).await)
    }

    /// CheckQuota as a dry run: the plan and the decision.
    async fn quota(&self, subject: QuotaSubject<'_>) -> (Option<String>, Decision) {
        let answer = self.auth.check_quota(subject, 1, true).await.unwrap();
        (answer.plan, answer.verdict.decision)
    }
}

/// A CreateKey request for a key named "server".
fn key_input(tenant: &str, scopes: &[&str], ttl_seconds: Option<i64>) -> CreateKeyInput {
    CreateKeyInput {
        tenant_id: tenant.into(),
        name: "server".into(),
        scopes: strings(scopes),
        ttl_seconds,
        ..Default::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn id(key: &IssuedKey) -> String {
    key.record.id.to_string()
}

#[track_caller]
fn allowed(d: Decision) -> Principal {
    match d {
        Decision::Allow(p) => p,
        Decision::Deny(r) => panic!("expected an allow, got {}", r.as_str()),
    }
}

#[track_caller]
fn denied(d: Decision) -> Reason {
    match d {
        Decision::Deny(r) => r,
        Decision::Allow(p) => panic!("expected a denial, got an allow for {p:?}"),
    }
}

/// The error of a failed call, as `NotFound(key)`, `FailedPrecondition` or
/// `InvalidArgument[fields named, in order]`.
#[track_caller]
fn error<T: Debug>(r: Result<T>) -> String {
    match r.expect_err("an error") {
        Error::InvalidArgument(v) => {
            let fields: Vec<_> = v.0.into_iter().map(|f| f.field).collect();
            format!("InvalidArgument{fields:?}")
        }
        Error::NotFound(what) => format!("NotFound({what})"),
        Error::FailedPrecondition(_) => "FailedPrecondition".into(),
        e => format!("{e:?}"),
    }
}

// ---------------------------------------- surfaces and documented denials

/// A generated key damaged three ways: wrong prefix, wrong length, bad checksum.
fn malformed_keys(profile: &Profile) -> [String; 3] {
    let f = &profile.key_format;
    let s = f.generate("live").into_exposed();
    let wrong_prefix = s.replacen(f.prefix(), "sk", 1);
    let wrong_length = s[..s.len() - 1].to_string();
    let mut damaged = s.into_bytes();
    let first = f.prefix().len() + "_live_".len();
    damaged[first] = if damaged[first] == b'0' { b'1' } else { b'0' };
    let bad_checksum = String::from_utf8(damaged).unwrap();
    assert_eq!(f.parse(&wrong_prefix), Err(KeyParseError::WrongPrefix));
    assert!(matches!(
        f.parse(&wrong_length),
        Err(KeyParseError::WrongLength { .. })
    ));
    assert_eq!(f.parse(&bad_checksum), Err(KeyParseError::ChecksumMismatch));
    [wrong_prefix, wrong_length, bad_checksum]
}

/// The public API reads a valid key from each of `headers` (names in any case).
async fn reads_the_key_from(profile: &str, headers: &[&str], value: fn(&str) -> String) {
    let fx = Fixture::new(profile).await;
    fx.tenant("acme", "").await;
    let key = fx.key("acme").await;
    for header in headers {
        let p = allowed(fx.on("", &[(header, &value(key.secret.expose()))]).await);
        assert_eq!(
            (p.tenant_id.as_str(), p.key_id),
            ("acme", Some(key.record.id)),
            "{header}"
        );
        assert_eq!(
            (p.plan.as_str(), p.environment.as_str()),
            (fx.profile.default_plan.as_str(), "live")
        );
        assert_eq!(p.credential_type, CredentialType::ApiKey);
        assert_eq!(p.scopes, fx.profile.plan(&p.plan).unwrap().scopes);
    }
}

/// Missing, malformed and well-formed-but-unknown keys, sent as documented.
async fn refuses_missing_malformed_and_unknown(
    profile: &str,
    header: &str,
    value: fn(&str) -> String,
) {
    let fx = Fixture::new(profile).await;
    assert_eq!(denied(fx.on("", &[]).await), Reason::CredentialMissing);
    assert_eq!(
        denied(fx.on("", &[(header, " ")]).await),
        Reason::CredentialMissing
    );
    for bad in malformed_keys(&fx.profile) {
        let d = fx.on("", &[(header, &value(&bad))]).await;
        assert_eq!(denied(d), Reason::CredentialMalformed, "{bad}");
    }
    let unknown = fx.profile.key_format.generate("live");
    let d = fx.on("", &[(header, &value(unknown.expose()))]).await;
    assert_eq!(denied(d), Reason::KeyUnknown);
}

/// An API key in `Authorization: Bearer` (or the `token` field) is refused.
async fn refuses_a_key_sent_as_bearer(profile: &str) {
    let fx = Fixture::new(profile).await;
    fx.tenant("acme", "").await;
    let key = fx.key("acme").await;
    for header in ["Authorization", "authorization"] {
        let d = fx.on("", &[(header, &bearer(key.secret.expose()))]).await;
        assert_eq!(denied(d), Reason::WrongCredentialForSurface);
    }
    let token = AuthInput {
        token: key.secret.expose(),
        ..Default::default()
    };
    let d = fx.auth.authenticate(token).await.unwrap();
    assert_eq!(denied(d), Reason::WrongCredentialForSurface);
}

fn raw(key: &str) -> String {
    key.to_string()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Checks a product's answers against its doc, given as
/// `{"REASON": [code, http_status, message]}`.
#[track_caller]
fn assert_documented(p: &Profile, documented: Value) {
    for (name, expected) in documented.as_object().unwrap() {
        let reason: Reason = serde_json::from_value(json!(name)).unwrap();
        let spec = p.denial(reason);
        let got = json!([spec.code, spec.http_status, spec.message]);
        assert_eq!(got, *expected, "{} {name}", p.name);
    }
}

/// The product's error body for `reason`, parsed.
fn body(p: &Profile, reason: Reason) -> Value {
    serde_json::from_str(&p.denial_body(reason)).expect("the body is JSON")
}

#[tokio::test]
async fn msgflash_reads_the_key_from_x_api_key_in_any_case() {
    reads_the_key_from(MSGFLASH, &["x-api-key", "X-API-Key", "X-Api-Key"], raw).await;
}

#[tokio::test]
async fn msgflash_refuses_an_api_key_sent_as_bearer() {
    refuses_a_key_sent_as_bearer(MSGFLASH).await;
}

#[tokio::test]
async fn msgflash_refuses_missing_malformed_and_unknown_keys_with_unauthorized_401() {
    refuses_missing_malformed_and_unknown(MSGFLASH, "x-api-key", raw).await;
    let p = Profile::from_toml(MSGFLASH).unwrap();
    let inactive = "The account no longer has an active subscription for the requested action";
    assert_documented(
        &p,
        json!({
            "CREDENTIAL_MISSING": ["UNAUTHORIZED", 401, "Missing API key"],
            "CREDENTIAL_MALFORMED": ["UNAUTHORIZED", 401, "Invalid or revoked API key"],
            "KEY_UNKNOWN": ["UNAUTHORIZED", 401, "Invalid or revoked API key"],
            "KEY_REVOKED": ["UNAUTHORIZED", 401, "Invalid or revoked API key"],
            "WRONG_CREDENTIAL_FOR_SURFACE":
                ["UNAUTHORIZED", 401, "Use the x-api-key header for the public API"],
            "SCOPE_MISSING": ["FORBIDDEN", 403, "The key is valid but cannot access the resource"],
            "SUBSCRIPTION_INACTIVE": ["SUBSCRIPTION_INACTIVE", 403, inactive],
            "RATE_LIMITED":
                ["API_RATE_LIMIT_EXCEEDED", 429, "More than 10 requests/second on the same key"],
            "QUOTA_EXHAUSTED":
                ["MONTHLY_API_REQUEST_QUOTA_EXCEEDED", 429, "Monthly API request quota exhausted"],
        }),
    );
    let example =
        json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or revoked API key"}});
    assert_eq!(body(&p, Reason::KeyRevoked), example);
}

#[tokio::test]
async fn mailsage_accepts_the_key_as_authorization_bearer_and_reads_no_x_api_key() {
    let headers = ["Authorization", "authorization", "AUTHORIZATION"];
    reads_the_key_from(MAILSAGE, &headers, bearer).await;
    reads_the_key_from(MAILSAGE, &["Authorization"], |k| format!("bearer  {k} ")).await;

    let fx = Fixture::new(MAILSAGE).await;
    fx.tenant("acme", "").await;
    let key = fx.key("acme").await;
    let d = fx.on("", &[("X-API-Key", key.secret.expose())]).await;
    assert_eq!(denied(d), Reason::CredentialMissing);
}

#[tokio::test]
async fn mailsage_refuses_bad_keys_with_invalid_api_key_401() {
    refuses_missing_malformed_and_unknown(MAILSAGE, "Authorization", bearer).await;
    let p = Profile::from_toml(MAILSAGE).unwrap();
    let invalid = json!(["invalid_api_key", 401, "Invalid API key provided"]);
    assert_documented(
        &p,
        json!({
            "CREDENTIAL_MISSING": invalid,
            "CREDENTIAL_MALFORMED": invalid,
            "KEY_UNKNOWN": invalid,
            "KEY_EXPIRED": invalid,
            "KEY_REVOKED": invalid,
            "WRONG_CREDENTIAL_FOR_SURFACE": invalid,
            "SCOPE_MISSING": ["insufficient_permissions", 403, "Insufficient permissions"],
            "RATE_LIMITED": ["rate_limit_exceeded", 429, "Rate limit exceeded"],
        }),
    );
    let example =
        json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"});
    assert_eq!(body(&p, Reason::KeyUnknown), example);
}

#[tokio::test]
async fn msgine_reads_the_key_from_x_api_key_in_any_case() {
    reads_the_key_from(MSGINE, &["X-Api-Key", "x-api-key", "X-API-KEY"], raw).await;
}

#[tokio::test]
async fn msgine_refuses_an_api_key_sent_as_bearer() {
    refuses_a_key_sent_as_bearer(MSGINE).await;
}

#[tokio::test]
async fn msgine_refuses_bad_keys_with_unauthorized_401() {
    refuses_missing_malformed_and_unknown(MSGINE, "X-Api-Key", raw).await;
    let p = Profile::from_toml(MSGINE).unwrap();
    let unauthorized = json!(["unauthorized", 401, "Invalid or missing API key"]);
    let forbidden = json!([
        "forbidden",
        403,
        "Insufficient permissions for this operation"
    ]);
    assert_documented(
        &p,
        json!({
            "CREDENTIAL_MISSING": unauthorized,
            "CREDENTIAL_MALFORMED": unauthorized,
            "KEY_UNKNOWN": unauthorized,
            "KEY_EXPIRED": unauthorized,
            "KEY_REVOKED": unauthorized,
            "WRONG_CREDENTIAL_FOR_SURFACE": unauthorized,
            "SCOPE_MISSING": forbidden,
        }),
    );
    let example =
        json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}});
    assert_eq!(body(&p, Reason::CredentialMissing), example);
    let example = json!({"error": {"code": "forbidden", "message": forbidden[2]}});
    assert_eq!(body(&p, Reason::ScopeMissing), example);
}

#[tokio::test]
async fn messagesmart_reads_the_key_from_x_api_key_in_any_case() {
    reads_the_key_from(MESSAGESMART, &["X-API-Key", "x-api-key", "X-Api-Key"], raw).await;
}

#[tokio::test]
async fn messagesmart_refuses_an_api_key_sent_as_bearer() {
    refuses_a_key_sent_as_bearer(MESSAGESMART).await;
}

#[tokio::test]
async fn messagesmart_answers_missing_invalid_expired_and_revoked_keys_as_documented() {
    refuses_missing_malformed_and_unknown(MESSAGESMART, "X-API-Key", raw).await;
    let p = Profile::from_toml(MESSAGESMART).unwrap();
    let documented = json!({
        "CREDENTIAL_MISSING": ["api_key_missing", 401, "API key is missing."],
        "CREDENTIAL_MALFORMED": ["api_key_invalid", 401, "API key is invalid."],
        "KEY_UNKNOWN": ["api_key_invalid", 401, "API key is invalid."],
        "KEY_EXPIRED": ["api_key_expired", 401, "API key has expired."],
        "KEY_REVOKED": ["api_key_revoked", 401, "API key has been revoked."],
        "QUOTA_EXHAUSTED": ["api_key_quota_exceeded", 429, "API key quota has been exceeded."],
        "RATE_LIMITED": ["rate_limit_exceeded", 429, "Too many requests. Please try again later."],
    });
    assert_documented(&p, documented.clone());
    for (name, spec) in documented.as_object().unwrap() {
        let reason: Reason = serde_json::from_value(json!(name)).unwrap();
        let error = json!({"code": spec[0], "message": spec[2], "httpStatus": spec[1]});
        assert_eq!(body(&p, reason), json!({"success": false, "error": error}));
    }

    // The pipeline tells expired from revoked, so each gets its own code.
    let fx = Fixture::new(MESSAGESMART).await;
    fx.tenant("acme", "").await;
    let expiring = fx.create_key("acme", &[], Some(60)).await.unwrap();
    let revoked = fx.key("acme").await;
    fx.revoke(&revoked).await;
    fx.clock.advance(Duration::from_secs(61));
    let d = fx.on("", &[("X-API-Key", expiring.secret.expose())]).await;
    assert_eq!(denied(d), Reason::KeyExpired);
    let d = fx.on("", &[("X-API-Key", revoked.secret.expose())]).await;
    assert_eq!(denied(d), Reason::KeyRevoked);
}

#[tokio::test]
async fn a_jwt_on_the_dashboard_is_token_invalid_until_jwts_are_verified() {
    let fx = Fixture::new(MSGFLASH).await;
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJhY21lIn0.c2lnbmF0dXJl";
    let d = fx.on("dashboard", &[("Authorization", &bearer(jwt))]).await;
    assert_eq!(denied(d), Reason::TokenInvalid);
    let input = AuthInput {
        token: jwt,
        surface: "dashboard",
        ..Default::default()
    };
    assert_eq!(
        denied(fx.auth.authenticate(input).await.unwrap()),
        Reason::TokenInvalid
    );
    assert_eq!(
        denied(fx.on("dashboard", &[]).await),
        Reason::CredentialMissing
    );
}

#[tokio::test]
async fn an_api_key_sent_as_bearer_on_the_dashboard_is_the_wrong_credential() {
    for profile in ALL_PROFILES {
        let fx = Fixture::new(profile).await;
        fx.tenant("acme", "").await;
        let key = fx.key("acme").await;
        let d = fx
            .on(
                "dashboard",
                &[("Authorization", &bearer(key.secret.expose()))],
            )
            .await;
        assert_eq!(
            denied(d),
            Reason::WrongCredentialForSurface,
            "{}",
            fx.profile.name
        );
    }
}

#[tokio::test]
async fn an_unknown_surface_or_an_invalid_required_scope_is_an_invalid_argument() {
    let fx = Fixture::new(MSGFLASH).await;
    let input = AuthInput {
        surface: "admin",
        ..Default::default()
    };
    assert_eq!(
        error(fx.auth.authenticate(input).await),
        r#"InvalidArgument["surface"]"#
    );
    for (scopes, field) in [
        (&["Messages:Send"][..], "0"),
        (&["messages:send", ""][..], "1"),
    ] {
        let required = strings(scopes);
        let input = AuthInput {
            required_scopes: &required,
            ..Default::default()
        };
        let expected = format!(r#"InvalidArgument["required_scopes[{field}]"]"#);
        assert_eq!(error(fx.auth.authenticate(input).await), expected);
    }
}

#[tokio::test]
async fn a_surface_limited_to_live_keys_refuses_test_keys() {
    let live_only = "[surfaces.public_api]\nenvironments = [\"live\"]";
    let fx = Fixture::new(&MSGFLASH.replace("[surfaces.public_api]", live_only)).await;
    fx.tenant("acme", "starter").await;
    let live = fx.key("acme").await;
    let mut input = key_input("acme", &[], None);
    input.environment = "test".into();
    let test = fx.manager.create_key(input).await.unwrap();
    fx.allow(&live, &[]).await;
    assert_eq!(fx.deny(&test, &[]).await, Reason::EnvironmentForbidden);
}

// ------------------------------------------------ keys, tenants and scopes

#[tokio::test]
async fn an_expired_key_is_refused_even_when_cached() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.create_key("acme", &[], Some(60)).await.unwrap();
    fx.allow(&key, &[]).await;
    fx.clock.advance(Duration::from_secs(61));
    assert_eq!(fx.deny(&key, &[]).await, Reason::KeyExpired);
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once_and_revoked_beats_expired() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.create_key("acme", &[], Some(60)).await.unwrap();
    fx.allow(&key, &[]).await;
    fx.revoke(&key).await;
    assert_eq!(fx.deny(&key, &[]).await, Reason::KeyRevoked);
    fx.clock.advance(Duration::from_secs(61));
    assert_eq!(fx.deny(&key, &[]).await, Reason::KeyRevoked);
}

#[tokio::test]
async fn canceled_and_suspended_subscriptions_are_inactive() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    fx.allow(&key, &[]).await;
    for status in ["canceled", "suspended"] {
        fx.set_status("acme", status).await;
        assert_eq!(
            fx.deny(&key, &[]).await,
            Reason::SubscriptionInactive,
            "{status}"
        );
    }
    fx.set_status("acme", "active").await;
    fx.allow(&key, &[]).await;
}

#[tokio::test]
async fn trialing_and_past_due_keep_access_as_each_profile_says() {
    for profile in ALL_PROFILES {
        let fx = Fixture::new(profile).await;
        fx.tenant("acme", "").await;
        let key = fx.key("acme").await;
        for status in ["trialing", "past_due"] {
            fx.set_status("acme", status).await;
            fx.allow(&key, &[]).await;
        }
    }
    // A profile that lists only `active` refuses the others.
    let statuses = "active_statuses = [\"active\", \"trialing\", \"past_due\"]";
    assert!(MSGFLASH.contains(statuses));
    let fx = Fixture::new(&MSGFLASH.replace(statuses, "active_statuses = [\"active\"]")).await;
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    for status in ["trialing", "past_due"] {
        fx.set_status("acme", status).await;
        assert_eq!(fx.deny(&key, &[]).await, Reason::SubscriptionInactive);
    }
}

#[tokio::test]
async fn a_key_without_a_required_scope_is_refused_with_scope_missing() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx
        .create_key("acme", &["messages:read"], None)
        .await
        .unwrap();
    assert_eq!(
        fx.allow(&key, &["messages:read"]).await.scopes,
        ["messages:read"]
    );
    let both = ["messages:read", "messages:send"];
    assert_eq!(fx.deny(&key, &both).await, Reason::ScopeMissing);
}

#[tokio::test]
async fn a_plan_downgrade_narrows_the_principal_scopes() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "starter").await;
    let key = fx.key("acme").await;
    assert_eq!(fx.allow(&key, &["instances:write"]).await.scopes.len(), 4);

    fx.set_plan("acme", "free").await;
    let p = fx.allow(&key, &[]).await;
    assert_eq!(p.plan, "free");
    assert_eq!(
        p.scopes,
        ["messages:send", "messages:read", "instances:read"]
    );
    assert_eq!(
        fx.deny(&key, &["instances:write"]).await,
        Reason::ScopeMissing
    );

    // The key kept its scopes: upgrading gives them back.
    fx.set_plan("acme", "pro").await;
    fx.allow(&key, &["instances:write"]).await;
}

#[tokio::test]
async fn a_tenants_allowed_scopes_override_replaces_the_plans() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    fx.allow(&key, &["messages:send"]).await;

    fx.set_allowed_scopes("acme", &["messages:read"]).await;
    assert_eq!(fx.allow(&key, &[]).await.scopes, ["messages:read"]);
    assert_eq!(
        fx.deny(&key, &["messages:send"]).await,
        Reason::ScopeMissing
    );
    let refused = fx.create_key("acme", &["messages:send"], None).await;
    assert_eq!(error(refused), r#"InvalidArgument["scopes[0]"]"#);

    // An override may also grant what the plan does not.
    fx.set_allowed_scopes("acme", &["instances:write"]).await;
    fx.revoke(&key).await;
    let wider = fx
        .create_key("acme", &["instances:write"], None)
        .await
        .unwrap();
    fx.allow(&wider, &["instances:write"]).await;
}

#[tokio::test]
async fn an_allowed_request_records_last_use_written_on_flush() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    fx.allow(&key, &[]).await;
    denied(
        fx.check(fx.profile.key_format.generate("live").expose(), &[])
            .await,
    );
    assert_eq!(fx.usage.flush(fx.store.as_ref()).await.unwrap(), 1);
    let record = fx.manager.get_key(&id(&key), "").await.unwrap();
    assert!(record.last_used_at.is_some());
    assert_eq!(fx.usage.flush(fx.store.as_ref()).await.unwrap(), 0);
}

// ------------------------------------------------------------------ caches

#[tokio::test]
async fn an_unknown_key_is_looked_up_once_then_negatively_cached() {
    let fx = Fixture::new(MSGFLASH).await;
    let unknown = fx.profile.key_format.generate("live");
    for _ in 0..3 {
        assert_eq!(
            denied(fx.check(unknown.expose(), &[]).await),
            Reason::KeyUnknown
        );
    }
    assert_eq!(fx.store.key_lookups.load(SeqCst), 1);
}

#[tokio::test]
async fn random_well_formed_keys_cost_no_lookups_beyond_the_budget_once_digests_are_known() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.clock.freeze_at(fx.clock.now());
    fx.tenant("acme", "pro").await;
    let key = fx.key("acme").await;
    fx.caches.know(
        fx.caches.known_epoch(),
        fx.store.key_digests().await.unwrap(),
    );
    for _ in 0..300 {
        let random = fx.profile.key_format.generate("live");
        assert_eq!(
            denied(fx.check(random.expose(), &[]).await),
            Reason::KeyUnknown
        );
    }
    // The default budget: 100 lookups a second for digests outside the set.
    assert_eq!(fx.store.key_lookups.load(SeqCst), 100);
    fx.allow(&key, &[]).await;
    assert_eq!(fx.store.key_lookups.load(SeqCst), 101);
    // A key created now reaches the set through its notification.
    let created = fx.key("acme").await;
    fx.sync().await;
    fx.allow(&created, &[]).await;
    assert_eq!(fx.store.key_lookups.load(SeqCst), 102);
}

#[tokio::test]
async fn a_cached_key_is_served_without_the_store() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    let reads = || {
        (
            fx.store.key_lookups.load(SeqCst),
            fx.store.tenant_reads.load(SeqCst),
        )
    };
    fx.allow(&key, &[]).await;
    let after_first = reads();
    assert_eq!(after_first.0, 1);
    for _ in 0..3 {
        fx.allow(&key, &[]).await;
    }
    assert_eq!(reads(), after_first);
}

#[tokio::test]
async fn a_key_made_under_an_old_pepper_is_verified_and_rehashed() {
    let fx = Fixture::new(MSGFLASH).await; // the manager issues under pepper v1
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    assert_eq!(key.record.pepper_version, 1);
    let input = AuthInput {
        api_key: key.secret.expose(),
        ..Default::default()
    };

    allowed(
        fx.replica(peppers(2, &[1]))
            .authenticate(input)
            .await
            .unwrap(),
    );
    let stored = fx.manager.get_key(&id(&key), "").await.unwrap();
    assert_eq!(stored.pepper_version, 2);
    allowed(
        fx.replica(peppers(2, &[]))
            .authenticate(input)
            .await
            .unwrap(),
    );
    let old_pepper_only = fx
        .replica(peppers(1, &[]))
        .authenticate(input)
        .await
        .unwrap();
    assert_eq!(denied(old_pepper_only), Reason::KeyUnknown);
}

// ------------------------------------------------------------- management

#[tokio::test]
async fn msgflash_free_holds_one_key_and_a_revoked_or_expired_key_frees_the_slot() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let first = fx.key("acme").await;
    assert_eq!(
        error(fx.create_key("acme", &[], None).await),
        "FailedPrecondition"
    );
    fx.revoke(&first).await;
    fx.create_key("acme", &[], Some(60)).await.unwrap();
    assert_eq!(
        error(fx.create_key("acme", &[], None).await),
        "FailedPrecondition"
    );
    fx.clock.advance(Duration::from_secs(61));
    fx.key("acme").await;
}

#[tokio::test]
async fn rotation_needs_no_free_slot_and_the_old_key_works_until_the_grace_ends() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let old = fx.key("acme").await;
    fx.allow(&old, &[]).await;

    let (new, previous) = fx
        .manager
        .rotate_key(&id(&old), "acme", 3600)
        .await
        .unwrap();
    assert_eq!(previous.replaced_by, Some(new.record.id));
    assert_eq!(new.record.scopes, old.record.scopes);
    fx.sync().await;
    fx.allow(&old, &[]).await;
    fx.allow(&new, &[]).await;
    assert_eq!(
        error(fx.create_key("acme", &[], None).await),
        "FailedPrecondition"
    );

    fx.clock.advance(Duration::from_secs(3601));
    assert_eq!(fx.deny(&old, &[]).await, Reason::KeyExpired);
    fx.allow(&new, &[]).await;
}

#[tokio::test]
async fn a_revoked_or_already_rotated_key_cannot_be_rotated() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "starter").await;
    let revoked = fx.key("acme").await;
    fx.revoke(&revoked).await;
    let r = fx.manager.rotate_key(&id(&revoked), "", 0).await;
    assert_eq!(error(r), "FailedPrecondition");

    let rotated = fx.key("acme").await;
    fx.manager.rotate_key(&id(&rotated), "", 60).await.unwrap();
    let again = fx.manager.rotate_key(&id(&rotated), "", 60).await;
    assert_eq!(error(again), "FailedPrecondition");
}

#[tokio::test]
async fn create_key_names_every_bad_field_at_once() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let mut input = key_input("acme corp", &["messages:send", "Bad Scope"], Some(-1));
    input.name = " ".into();
    input.environment = "prod".into();
    let every_field = r#"["tenant_id", "name", "environment", "scopes[1]", "ttl_seconds"]"#;
    assert_eq!(
        error(fx.manager.create_key(input).await),
        format!("InvalidArgument{every_field}")
    );

    let too_long = fx.create_key("acme", &[], Some(MAX_TTL_SECONDS + 1)).await;
    assert_eq!(error(too_long), r#"InvalidArgument["ttl_seconds"]"#);
    let off_plan = fx
        .create_key("acme", &["messages:send", "instances:write"], None)
        .await;
    assert_eq!(error(off_plan), r#"InvalidArgument["scopes[1]"]"#);
    assert_eq!(
        error(fx.create_key("nobody", &[], None).await),
        "NotFound(tenant)"
    );
}

#[tokio::test]
async fn another_tenants_key_is_not_found_and_keeps_working() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    fx.tenant("other", "free").await;
    let key = fx.key("acme").await;
    let (m, id) = (&fx.manager, id(&key));

    assert_eq!(error(m.get_key(&id, "other").await), "NotFound(key)");
    assert_eq!(
        error(m.revoke_key(&id, "other", "mine now").await),
        "NotFound(key)"
    );
    assert_eq!(error(m.rotate_key(&id, "other", 0).await), "NotFound(key)");
    let rename = UpdateKeyInput {
        key_id: id.clone(),
        tenant_id: "other".into(),
        update_mask: strings(&["name"]),
        name: "x".into(),
        ..Default::default()
    };
    assert_eq!(error(m.update_key(rename).await), "NotFound(key)");

    fx.sync().await;
    fx.allow(&key, &[]).await;
    assert_eq!(m.get_key(&id, "acme").await.unwrap(), key.record);
}

#[tokio::test]
async fn list_keys_pages_with_tokens_and_hides_revoked_keys_unless_asked() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "pro").await;
    fx.tenant("other", "free").await;
    fx.key("other").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(fx.key("acme").await.record.id);
    }
    ids.sort();

    let (m, mut seen, mut token, mut pages) = (&fx.manager, Vec::new(), String::new(), 0);
    loop {
        let page = m.list_keys("acme", 2, &token, false).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|k| k.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((pages, seen), (3, ids.clone()));

    m.revoke_key(&ids[0].to_string(), "acme", "").await.unwrap();
    let listed = |include_revoked| m.list_keys("acme", 0, "", include_revoked);
    assert_eq!(listed(false).await.unwrap().items.len(), 4);
    assert_eq!(listed(true).await.unwrap().items.len(), 5);
    let bad_token = m.list_keys("acme", 0, "nope", false).await;
    assert_eq!(error(bad_token), r#"InvalidArgument["page_token"]"#);
    let too_big = m.list_keys("acme", 501, "", false).await;
    assert_eq!(error(too_big), r#"InvalidArgument["page_size"]"#);
    assert_eq!(
        error(m.list_keys("nobody", 0, "", false).await),
        "NotFound(tenant)"
    );
}

#[tokio::test]
async fn update_key_validates_its_mask_and_applies_at_once() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    // MsgFlash keys never expire by default: this one is given a lifetime.
    let key = fx.create_key("acme", &[], Some(3600)).await.unwrap();
    fx.allow(&key, &["messages:send"]).await;
    let update = |mask: &[&str], name: &str, scopes: &[&str]| {
        let input = UpdateKeyInput {
            key_id: id(&key),
            tenant_id: "acme".into(),
            update_mask: strings(mask),
            name: name.into(),
            scopes: strings(scopes),
            ..Default::default()
        };
        fx.manager.update_key(input)
    };
    assert_eq!(
        error(update(&[], "", &[]).await),
        r#"InvalidArgument["update_mask"]"#
    );
    let r = update(&["name", "owner"], "", &[]).await;
    assert_eq!(error(r), r#"InvalidArgument["update_mask[1]", "name"]"#);
    let r = update(&["scopes"], "", &["Bad"]).await;
    assert_eq!(error(r), r#"InvalidArgument["scopes[0]"]"#);
    let r = update(&["scopes"], "", &["instances:write"]).await;
    assert_eq!(error(r), r#"InvalidArgument["scopes[0]"]"#);

    let r = update(&["scopes"], "", &["messages:read"]).await.unwrap();
    assert_eq!(
        (r.name.as_str(), r.scopes.as_slice()),
        ("server", &strings(&["messages:read"])[..])
    );
    fx.sync().await;
    assert_eq!(
        fx.deny(&key, &["messages:send"]).await,
        Reason::ScopeMissing
    );

    assert!(key.record.expires_at.is_some());
    assert_eq!(
        update(&["expires_at"], "", &[]).await.unwrap().expires_at,
        None
    );
}

// ------------------------------------------------------------- check_quota

#[tokio::test]
async fn check_quota_answers_by_tenant_key_id_and_credential() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "starter").await;
    let key = fx.key("acme").await;
    let (id, secret) = (id(&key), key.secret.expose());
    let subjects = [
        QuotaSubject::Tenant("acme"),
        QuotaSubject::Key(&id),
        QuotaSubject::Credential(secret),
    ];
    for subject in subjects {
        let (plan, decision) = fx.quota(subject).await;
        assert_eq!(plan.as_deref(), Some("starter"));
        assert_eq!(allowed(decision).tenant_id.as_str(), "acme");
    }
    for subject in &subjects[1..] {
        let (_, decision) = fx.quota(*subject).await;
        assert_eq!(allowed(decision).key_id, Some(key.record.id));
    }
    let unknown = fx.profile.key_format.generate("live");
    let (plan, decision) = fx.quota(QuotaSubject::Credential(unknown.expose())).await;
    assert_eq!((plan, denied(decision)), (None, Reason::KeyUnknown));

    fx.set_status("acme", "canceled").await;
    for subject in subjects {
        let (_, decision) = fx.quota(subject).await;
        assert_eq!(denied(decision), Reason::SubscriptionInactive);
    }
}

#[tokio::test]
async fn check_quota_for_unknown_ids_is_not_found() {
    let fx = Fixture::new(MSGFLASH).await;
    let q = |subject| fx.auth.check_quota(subject, 1, true);
    assert_eq!(
        error(q(QuotaSubject::Tenant("nobody")).await),
        "NotFound(tenant)"
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(error(q(QuotaSubject::Key(&unknown)).await), "NotFound(key)");
    let bad_key_id = q(QuotaSubject::Key("42")).await;
    assert_eq!(error(bad_key_id), r#"InvalidArgument["key_id"]"#);
    let bad_tenant_id = q(QuotaSubject::Tenant("a b")).await;
    assert_eq!(error(bad_tenant_id), r#"InvalidArgument["tenant_id"]"#);
}

#[tokio::test]
async fn check_quota_for_a_revoked_key_is_key_revoked() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "free").await;
    let key = fx.key("acme").await;
    let (id, secret) = (id(&key), key.secret.expose());
    allowed(fx.quota(QuotaSubject::Credential(secret)).await.1);
    fx.revoke(&key).await;
    for subject in [QuotaSubject::Key(&id), QuotaSubject::Credential(secret)] {
        let (plan, decision) = fx.quota(subject).await;
        assert_eq!((plan, denied(decision)), (None, Reason::KeyRevoked));
    }
}

#[tokio::test]
async fn the_benchmark_cache_bypass_reads_every_key_from_the_store_and_still_decides() {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "pro").await;
    let key = fx.key("acme").await;
    let bypass = CacheSettings {
        benchmark_bypass_key_cache: true,
        ..CacheSettings::default()
    };
    let auth = Authenticator::new(
        fx.profile.clone(),
        peppers(1, &[]),
        fx.store.clone(),
        Arc::new(Caches::new(&bypass)),
        fx.usage.clone(),
        fx.clock.clone(),
    );
    let before = fx.store.key_lookups.load(SeqCst);
    for _ in 0..3 {
        let input = AuthInput {
            api_key: key.secret.expose(),
            ..Default::default()
        };
        allowed(auth.authenticate(input).await.expect("a decision"));
    }
    assert_eq!(fx.store.key_lookups.load(SeqCst) - before, 3);
    // Without the setting the same calls read it once (the cache's point).
    fx.allow(&key, &[]).await;
    fx.allow(&key, &[]).await;
    assert_eq!(fx.store.key_lookups.load(SeqCst) - before, 4);
}

mod lookups;
