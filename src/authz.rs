//! The decision pipeline: the only place the rules compose.
//!
//! credential from the surface → strict parse + checksum → digest → cache /
//! negative cache / store → revoked, expired → tenant subscription → plan and
//! surface environment → scopes → allow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::cache::Caches;
use crate::clock::Clock;
use crate::crypto::jwt::Verifier;
use crate::crypto::{KeyDigest, Peppers};
use crate::domain::limit::effective;
use crate::domain::validate::check_scopes;
use crate::domain::{
    CredentialType, Decision, KeyId, KeyRecord, Principal, Reason, Tenant, TenantId, Verdict,
    Violations,
};
use crate::error::{Error, Result};
use crate::limits::{LimitOutcome, Limiter, Subject};
use crate::profile::{BearerPolicy, Profile, SubscriptionGate, Surface};
use crate::store::Invalidation;
use crate::store::Store;
use crate::telemetry;

/// One authentication question, as received.
#[derive(Clone, Copy, Default)]
pub struct AuthInput<'a> {
    pub api_key: &'a str,
    pub token: &'a str,
    pub headers: Option<&'a HashMap<String, String>>,
    pub surface: &'a str,
    pub required_scopes: &'a [String],
    /// The route's own subscription policy (ext_authz
    /// `context_extensions.subscription`); `None`: the surface's.
    pub subscription: Option<SubscriptionGate>,
}

impl std::fmt::Debug for AuthInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthInput")
            .field("surface", &self.surface)
            .field("required_scopes", &self.required_scopes)
            .finish_non_exhaustive()
    }
}

/// Where the credential was found, before it is checked.
#[derive(PartialEq, Eq)]
enum Credential<'a> {
    ApiKey(&'a str),
    Jwt(&'a str),
    Missing,
    WrongForSurface,
    /// The credential header was sent twice with different values.
    Ambiguous,
}

/// A header's value, names compared case-insensitively. The same header
/// sent twice (in different cases) with different values is ambiguous.
fn header<'a>(
    headers: Option<&'a HashMap<String, String>>,
    name: &str,
) -> Result<Option<&'a str>, Ambiguous> {
    let mut found = None;
    for (k, v) in headers.into_iter().flatten() {
        let v = v.trim();
        if !k.eq_ignore_ascii_case(name) || v.is_empty() {
            continue;
        }
        match found {
            Some(prev) if prev != v => return Err(Ambiguous),
            _ => found = Some(v),
        }
    }
    Ok(found)
}

/// Two different values for one credential header.
struct Ambiguous;

fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|v| !v.is_empty())
}

/// Reads the credential per the surface's rules (README.md, Profiles).
fn extract<'a>(input: &AuthInput<'a>, surface: &Surface, profile: &Profile) -> Credential<'a> {
    match extract_headers(input, surface, profile) {
        Ok(c) => c,
        Err(Ambiguous) => Credential::Ambiguous,
    }
}

fn extract_headers<'a>(
    input: &AuthInput<'a>,
    surface: &Surface,
    profile: &Profile,
) -> Result<Credential<'a>, Ambiguous> {
    let takes_keys = !surface.api_key_headers.is_empty() || surface.bearer == BearerPolicy::ApiKey;
    if !input.api_key.is_empty() {
        // A JWT-only surface refuses an API key however it is passed.
        return Ok(if takes_keys {
            Credential::ApiKey(input.api_key)
        } else {
            Credential::WrongForSurface
        });
    }
    let looks_like_key = |v: &str| {
        v.strip_prefix(profile.key_format.prefix())
            .is_some_and(|r| r.starts_with('_'))
    };
    let from_bearer = |v: &'a str| match surface.bearer {
        BearerPolicy::ApiKey => Credential::ApiKey(v),
        BearerPolicy::Jwt if !looks_like_key(v) => Credential::Jwt(v),
        BearerPolicy::Jwt | BearerPolicy::None => Credential::WrongForSurface,
    };
    if !input.token.is_empty() {
        return Ok(from_bearer(input.token));
    }
    for h in &surface.api_key_headers {
        if let Some(v) = header(input.headers, h)? {
            return Ok(Credential::ApiKey(v));
        }
    }
    Ok(match header(input.headers, "authorization")? {
        Some(v) => match bearer(v) {
            Some(token) => from_bearer(token),
            None => Credential::WrongForSurface,
        },
        None => Credential::Missing,
    })
}

/// Whose usage the limits count: the tenant and, if given, its key's
/// lineage (every key of a rotation chain shares one quota and rate).
fn subject_of<'a>(tenant: &'a Tenant, key: Option<&'a KeyRecord>) -> Subject<'a> {
    Subject {
        key: key.map(|k| k.lineage_id),
        tenant: &tenant.id,
        billing_day: tenant.overrides.billing_day,
        environment: key.map(|k| k.environment.as_str()),
    }
}

/// Batches `last_used_at` so a request never waits on a write.
#[derive(Debug, Default)]
pub struct UsageRecorder {
    pending: Mutex<HashMap<KeyId, DateTime<Utc>>>,
}

impl UsageRecorder {
    fn record(&self, id: KeyId, at: DateTime<Utc>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.insert(id, at);
    }

    /// Writes everything recorded since the last flush in one statement.
    pub async fn flush(&self, store: &dyn Store) -> Result<usize> {
        let batch: Vec<_> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.drain().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(e) = store.touch_keys(&batch).await {
            // Put them back (newer uses win) so they are written next time.
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (id, at) in batch {
                let slot = p.entry(id).or_insert(at);
                *slot = (*slot).max(at);
            }
            return Err(e.into());
        }
        Ok(batch.len())
    }
}

/// Answers "may this credential make this call now?".
pub struct Authenticator {
    profile: Arc<Profile>,
    peppers: Peppers,
    store: Arc<dyn Store>,
    caches: Arc<Caches>,
    /// Cache misses' key reads, grouped under concurrency.
    lookups: KeyLookups,
    usage: Arc<UsageRecorder>,
    limiter: Arc<Limiter>,
    clock: Clock,
    /// Trusted JWT issuers (none: every JWT is `TOKEN_INVALID`).
    jwt: Arc<Verifier>,
    metrics: decision_metrics::DecisionMetrics,
    /// Per-key request counts (`None`: not counted).
    counts: Option<Arc<RequestCounts>>,
}

/// An authenticated credential, with what the limits need (no key record
/// for a JWT: only tenant-scoped limits apply to it).
struct Identified {
    principal: Principal,
    record: Option<Arc<KeyRecord>>,
    tenant: Arc<Tenant>,
}

impl Authenticator {
    /// Assembles the pipeline.
    pub fn new(
        profile: Arc<Profile>,
        peppers: Peppers,
        store: Arc<dyn Store>,
        caches: Arc<Caches>,
        usage: Arc<UsageRecorder>,
        clock: Clock,
    ) -> Self {
        let limiter = Arc::new(Limiter::new(store.clone(), clock.clone()));
        let lookups = KeyLookups::new(store.clone(), caches.lookup_batching());
        Self {
            profile,
            peppers,
            store,
            caches,
            lookups,
            usage,
            limiter,
            clock,
            jwt: Arc::default(),
            metrics: decision_metrics::DecisionMetrics::new(),
            counts: None,
        }
    }

    /// Counts decisions per key into `counts` (flushed by the caller).
    pub fn with_request_counts(mut self, counts: Arc<RequestCounts>) -> Self {
        self.counts = Some(counts);
        self
    }

    fn count(&self, key: Option<&KeyRecord>, allowed: bool) {
        if let (Some(counts), Some(key)) = (&self.counts, key) {
            counts.count(key.id, allowed);
        }
    }

    /// Verifies JWTs with `verifier`'s issuers.
    pub fn with_jwt(mut self, verifier: Arc<Verifier>) -> Self {
        self.jwt = verifier;
        self
    }

    /// This replica's rate limiter and quota leases.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The profile decisions are made under.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Decides and, when `cost > 0`, consumes `cost` units of every limit
    /// that applies (denied requests consume nothing). This is the path of
    /// the Authenticate RPC and of Envoy's ext_authz Check.
    pub async fn decide(&self, input: AuthInput<'_>, cost: u32) -> Result<Verdict> {
        let started = std::time::Instant::now();
        let verdict = self.decide_inner(input, cost).await;
        let seconds = started.elapsed().as_secs_f64();
        match &verdict {
            Ok(v) => self.metrics.decision(&v.decision, seconds),
            Err(_) => self.metrics.failed(seconds),
        }
        verdict
    }

    async fn decide_inner(&self, input: AuthInput<'_>, cost: u32) -> Result<Verdict> {
        let who = match self.identify(input).await? {
            Err(reason) => return Ok(Verdict::plain(Decision::Deny(reason))),
            Ok(who) => who,
        };
        if cost == 0 {
            self.count(who.record.as_deref(), true);
            return Ok(Verdict::plain(Decision::Allow(who.principal)));
        }
        let outcome = self
            .check_limits(&who.tenant, who.record.as_deref(), u64::from(cost), false)
            .await?;
        let verdict = self.verdict(Decision::Allow(who.principal), &who.tenant, outcome);
        let allowed = matches!(verdict.decision, Decision::Allow(_));
        self.count(who.record.as_deref(), allowed);
        Ok(verdict)
    }

    /// Turns a limit outcome into a verdict, honouring the plan's shadow mode.
    fn verdict(&self, allow: Decision, tenant: &Tenant, outcome: LimitOutcome) -> Verdict {
        let shadow = self.profile.plan(&tenant.plan).is_some_and(|p| p.shadow);
        match outcome.denied {
            None => Verdict {
                decision: allow,
                limits: outcome.statuses,
                retry_after_seconds: 0,
                shadow_denial: None,
            },
            Some(reason) if shadow => {
                metrics::counter!(telemetry::SHADOW_DENIALS, "reason" => reason.as_str())
                    .increment(1);
                tracing::info!(reason = reason.as_str(), tenant_id = %tenant.id, "shadow-mode denial");
                Verdict {
                    decision: allow,
                    limits: outcome.statuses,
                    retry_after_seconds: 0,
                    shadow_denial: Some(reason),
                }
            }
            Some(reason) => Verdict {
                decision: Decision::Deny(reason),
                limits: outcome.statuses,
                retry_after_seconds: outcome.retry_after_seconds,
                shadow_denial: None,
            },
        }
    }

    /// The limits in force for a tenant and, if given, one of its keys.
    fn limits_for<'a>(
        &'a self,
        tenant: &'a Tenant,
        key: Option<&'a KeyRecord>,
    ) -> Vec<std::borrow::Cow<'a, crate::domain::LimitSpec>> {
        let plan_limits = self
            .profile
            .plan(&tenant.plan)
            .map(|p| p.limits.as_slice())
            .unwrap_or(&[]);
        effective(
            plan_limits,
            tenant.overrides.limits.as_deref(),
            key.and_then(|k| k.limits.as_deref()),
            key.map(|k| k.environment.as_str()),
        )
    }

    /// The limits in force for a tenant (and key), checked and, unless
    /// `dry_run`, consumed.
    async fn check_limits(
        &self,
        tenant: &Tenant,
        key: Option<&KeyRecord>,
        cost: u64,
        dry_run: bool,
    ) -> Result<LimitOutcome> {
        let specs = self.limits_for(tenant, key);
        let specs: Vec<&crate::domain::LimitSpec> = specs.iter().map(|s| &**s).collect();
        self.limiter
            .check(subject_of(tenant, key), &specs, cost, dry_run)
            .await
    }

    /// Decides identity only, consuming nothing. A denial is
    /// `Ok(Decision::Deny(_))`; `Err` is a malformed request or an outage,
    /// never a denial.
    pub async fn authenticate(&self, input: AuthInput<'_>) -> Result<Decision> {
        Ok(match self.identify(input).await? {
            Ok(who) => Decision::Allow(who.principal),
            Err(reason) => Decision::Deny(reason),
        })
    }

    async fn identify(&self, input: AuthInput<'_>) -> Result<Result<Identified, Reason>> {
        let surface = self.profile.surface(input.surface).ok_or_else(|| {
            Error::invalid("surface", "names no surface of this deployment's profile")
        })?;
        let mut v = Violations::default();
        check_scopes("required_scopes", input.required_scopes, &mut v);
        v.into_result()?;
        let gate = input.subscription.unwrap_or(surface.subscription);

        match extract(&input, surface, &self.profile) {
            Credential::Missing => Ok(Err(Reason::CredentialMissing)),
            Credential::WrongForSurface => Ok(Err(Reason::WrongCredentialForSurface)),
            Credential::Ambiguous => Ok(Err(Reason::CredentialMalformed)),
            Credential::Jwt(token) => {
                let span = tracing::debug_span!("jwt", tenant_id = tracing::field::Empty);
                self.decide_jwt(token, surface, input.required_scopes, gate)
                    .instrument(span)
                    .await
            }
            Credential::ApiKey(key) => {
                let span = tracing::debug_span!(
                    "api_key",
                    tenant_id = tracing::field::Empty,
                    key_id = tracing::field::Empty
                );
                self.decide_api_key(key, surface, input.required_scopes, gate)
                    .instrument(span)
                    .await
            }
        }
    }

    async fn decide_api_key(
        &self,
        key: &str,
        surface: &Surface,
        required_scopes: &[String],
        gate: SubscriptionGate,
    ) -> Result<Result<Identified, Reason>> {
        let deny = |r| Ok(Err(r));
        // A legacy key (imported, without Tollgate's checksum) passes the
        // gate only where the profile accepts them, and only in the
        // product's shape; it is looked up by its legacy digest. A legacy
        // key may happen to carry a valid checksum: a native miss is then
        // asked again as legacy.
        let legacy = self
            .profile
            .legacy_keys
            .as_ref()
            .is_some_and(|l| l.environment_of(&self.profile.key_format, key).is_some());
        let found = match self.profile.key_format.parse(key) {
            Ok(parsed) => match self.find_key(parsed.expose()).await? {
                None if legacy => self.find_legacy_key(key).await?,
                found => found,
            },
            Err(_) if legacy => self.find_legacy_key(key).await?,
            Err(_) => return deny(Reason::CredentialMalformed),
        };
        let Some(record) = found else {
            return deny(Reason::KeyUnknown);
        };
        let span = tracing::Span::current();
        span.record("tenant_id", record.tenant_id.as_str());
        span.record("key_id", tracing::field::display(record.id));
        // From here a denial is about a known key: counted as denied.
        let deny = |r| {
            self.count(Some(&record), false);
            Ok(Err(r))
        };

        let now = self.clock.now();
        if record.is_revoked() {
            return deny(Reason::KeyRevoked);
        }
        if record.is_expired(now) {
            return deny(Reason::KeyExpired);
        }
        let Some(tenant) = self.find_tenant(&record.tenant_id).await? else {
            return deny(Reason::KeyUnknown);
        };
        if gate == SubscriptionGate::Required && !self.profile.is_active(tenant.status) {
            return deny(Reason::SubscriptionInactive);
        }
        let Some(plan) = self.profile.plan(&tenant.plan) else {
            tracing::warn!(plan = %tenant.plan, "tenant's plan is not in the profile; refusing");
            return deny(Reason::SubscriptionInactive);
        };
        let env_on_surface =
            surface.environments.is_empty() || surface.environments.contains(&record.environment);
        if !env_on_surface || !plan.allows_environment(&record.environment) {
            return deny(Reason::EnvironmentForbidden);
        }
        let allowed = tenant
            .overrides
            .allowed_scopes
            .as_deref()
            .unwrap_or(&plan.scopes);
        let scopes: Vec<String> = record
            .scopes
            .iter()
            .filter(|s| allowed.contains(s))
            .cloned()
            .collect();
        if !required_scopes.iter().all(|s| scopes.contains(s)) {
            return deny(Reason::ScopeMissing);
        }
        self.usage.record(record.id, now);
        let principal = Principal {
            tenant_id: record.tenant_id.clone(),
            key_id: Some(record.id),
            plan: tenant.plan.clone(),
            environment: record.environment.clone(),
            scopes,
            subject: record.id.to_string(),
            credential_type: CredentialType::ApiKey,
            subscription: tenant.status,
            labels: self
                .profile
                .upstream_labels
                .iter()
                .map(|name| {
                    let value = record.labels.get(name).unwrap_or_default();
                    (name.clone(), value.to_owned())
                })
                .collect(),
        };
        Ok(Ok(Identified {
            principal,
            record: Some(record),
            tenant,
        }))
    }

    /// Finds the key for a well-formed secret: current pepper first, then
    /// previous ones (rehashing to the current pepper on a match).
    async fn find_key(&self, key: &str) -> Result<Option<Arc<KeyRecord>>> {
        self.find_key_by(|pepper| pepper.digest(key)).await
    }

    /// Finds an imported legacy key by its legacy digest (same caches,
    /// known-digest budget and pepper rotation as native keys).
    async fn find_legacy_key(&self, key: &str) -> Result<Option<Arc<KeyRecord>>> {
        let sha = crate::crypto::digest::sha256(key);
        self.find_key_by(|pepper| pepper.legacy_digest(&sha)).await
    }

    async fn find_key_by(
        &self,
        digest_of: impl Fn(&crate::crypto::Pepper) -> KeyDigest,
    ) -> Result<Option<Arc<KeyRecord>>> {
        let current = self.peppers.current();
        let current_digest = digest_of(current);
        let mut asked_old_pepper = false;
        for pepper in self.peppers.all() {
            let digest = if pepper.version() == current.version() {
                current_digest
            } else {
                digest_of(pepper)
            };
            if let Some(hit) = self.caches.key(&digest) {
                if hit.digest.ct_eq(&digest) {
                    self.metrics.lookup("key", "hit");
                    confirmable(&self.caches)?;
                    return Ok(Some(hit));
                }
            }
            self.metrics.lookup("key", "miss");
            if self.caches.is_unknown(&digest) {
                self.metrics.lookup("negative", "hit");
                continue;
            }
            if !self
                .caches
                .worth_looking_up(&digest, self.clock.monotonic_ns())
            {
                // Not a stored digest, and the budget for those is spent.
                self.metrics.lookup("known", "absent");
                continue;
            }
            let g = self.caches.generation();
            asked_old_pepper |= pepper.version() != current.version();
            // Grouped with concurrent misses (`authz/lookups.rs`). The
            // old-pepper re-ask after the loop and the rehash stay direct
            // store calls: rare (pepper rotation only), so nothing to group.
            match self.lookups.find(&digest).await? {
                Some(record) if record.digest.ct_eq(&digest) => {
                    let record = if pepper.version() == current.version() {
                        record
                    } else {
                        let old = Arc::unwrap_or_clone(record);
                        Arc::new(
                            self.rehash(old, &digest, current_digest, current.version())
                                .await,
                        )
                    };
                    self.caches.insert_key(g, record.digest, record.clone());
                    return Ok(Some(record));
                }
                _ => self.caches.insert_unknown(g, digest),
            }
        }
        if asked_old_pepper {
            // Another replica may have rehashed the key to the current pepper
            // between our two lookups: ask once more, past the negative cache.
            let g = self.caches.generation();
            if let Some(record) = self.store.find_key_by_digest(&current_digest).await? {
                if record.digest.ct_eq(&current_digest) {
                    self.caches.forget_unknown(&current_digest);
                    let record = Arc::new(record.for_decisions());
                    self.caches.insert_key(g, current_digest, record.clone());
                    return Ok(Some(record));
                }
            }
        }
        Ok(None)
    }

    async fn rehash(
        &self,
        mut record: KeyRecord,
        old: &KeyDigest,
        new: KeyDigest,
        version: i32,
    ) -> KeyRecord {
        match self.store.rehash_key(record.id, old, &new, version).await {
            Ok(()) => {
                self.caches.apply(&Invalidation::KeyAdded(new));
                record.digest = new;
                record.pepper_version = version;
            }
            // The old digest still verifies; the rehash is retried next miss.
            Err(e) => tracing::warn!(error = %e, "rehash to the current pepper failed"),
        }
        record
    }

    async fn find_tenant(&self, id: &TenantId) -> Result<Option<Arc<Tenant>>> {
        if let Some(t) = self.caches.tenant(id) {
            self.metrics.lookup("tenant", "hit");
            confirmable(&self.caches)?;
            return Ok(Some(t));
        }
        self.metrics.lookup("tenant", "miss");
        let g = self.caches.generation();
        let Some(tenant) = self.store.get_tenant(id).await? else {
            return Ok(None);
        };
        let tenant = Arc::new(tenant);
        self.caches.insert_tenant(g, tenant.clone());
        Ok(Some(tenant))
    }
}

/// A cache hit decides only while the invalidation feed is live or was lost
/// less than `max_staleness_seconds` ago; past that the entry may miss a
/// revocation, so the caller gets UNAVAILABLE (its gateway's failure mode).
#[inline]
fn confirmable(caches: &Caches) -> Result<()> {
    if caches.confirmable() {
        Ok(())
    } else {
        Err(Error::Unavailable(
            "the invalidation feed is down past the staleness bound".into(),
        ))
    }
}

mod decision_metrics;
mod jwt;
mod lookups;
use lookups::KeyLookups;
mod quota;
pub mod request_counts;
pub use request_counts::RequestCounts;

pub use quota::{QuotaAnswer, QuotaSubject, QuotaUsage};
#[cfg(test)]
mod tests;
