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
use crate::crypto::{KeyDigest, Peppers};
use crate::domain::validate::check_scopes;
use crate::domain::{
    CredentialType, Decision, KeyId, KeyRecord, Principal, Reason, Tenant, TenantId, Verdict,
    Violations,
};
use crate::error::{Error, Result};
use crate::profile::{BearerPolicy, Profile, Surface};
use crate::store::Store;

/// One authentication question, as received.
#[derive(Clone, Copy, Default)]
pub struct AuthInput<'a> {
    pub api_key: &'a str,
    pub token: &'a str,
    pub headers: Option<&'a HashMap<String, String>>,
    pub surface: &'a str,
    pub required_scopes: &'a [String],
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
}

fn header<'a>(headers: Option<&'a HashMap<String, String>>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

fn bearer<'a>(value: &'a str) -> Option<&'a str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|v| !v.is_empty())
}

/// Reads the credential per the surface's rules (DESIGN.md §1, Surfaces).
fn extract<'a>(input: &AuthInput<'a>, surface: &Surface, profile: &Profile) -> Credential<'a> {
    if !input.api_key.is_empty() {
        return Credential::ApiKey(input.api_key);
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
        return from_bearer(input.token);
    }
    if let Some(v) = surface
        .api_key_headers
        .iter()
        .find_map(|h| header(input.headers, h))
    {
        return Credential::ApiKey(v);
    }
    match header(input.headers, "authorization") {
        Some(v) => match bearer(v) {
            Some(token) => from_bearer(token),
            None => Credential::WrongForSurface,
        },
        None => Credential::Missing,
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
    usage: Arc<UsageRecorder>,
    clock: Clock,
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
        Self {
            profile,
            peppers,
            store,
            caches,
            usage,
            clock,
        }
    }

    /// The profile decisions are made under.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Decides and, when `cost > 0`, consumes `cost` units of every limit
    /// that applies (denied requests consume nothing). This is the path of
    /// the Authenticate RPC and of Envoy's ext_authz Check.
    pub async fn decide(&self, input: AuthInput<'_>, cost: u32) -> Result<Verdict> {
        let _ = cost; // limits are counted by the limits issue
        Ok(Verdict::plain(self.authenticate(input).await?))
    }

    /// Decides identity only, consuming nothing. A denial is
    /// `Ok(Decision::Deny(_))`; `Err` is a malformed request or an outage,
    /// never a denial.
    pub async fn authenticate(&self, input: AuthInput<'_>) -> Result<Decision> {
        let surface = self.profile.surface(input.surface).ok_or_else(|| {
            Error::invalid("surface", "names no surface of this deployment's profile")
        })?;
        let mut v = Violations::default();
        check_scopes("required_scopes", input.required_scopes, &mut v);
        v.into_result()?;

        match extract(&input, surface, &self.profile) {
            Credential::Missing => Ok(Decision::Deny(Reason::CredentialMissing)),
            Credential::WrongForSurface => Ok(Decision::Deny(Reason::WrongCredentialForSurface)),
            // Verifying JWTs is the dashboard issue's work; until then no
            // token is valid.
            Credential::Jwt(_) => Ok(Decision::Deny(Reason::TokenInvalid)),
            Credential::ApiKey(key) => {
                let span = tracing::debug_span!(
                    "api_key",
                    tenant_id = tracing::field::Empty,
                    key_id = tracing::field::Empty
                );
                self.decide_api_key(key, surface, input.required_scopes)
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
    ) -> Result<Decision> {
        let deny = |r| Ok(Decision::Deny(r));
        let Ok(parsed) = self.profile.key_format.parse(key) else {
            return deny(Reason::CredentialMalformed);
        };
        let Some(record) = self.find_key(parsed.expose()).await? else {
            return deny(Reason::KeyUnknown);
        };
        let span = tracing::Span::current();
        span.record("tenant_id", record.tenant_id.as_str());
        span.record("key_id", tracing::field::display(record.id));

        let now = self.clock.now();
        if record.is_revoked(now) {
            return deny(Reason::KeyRevoked);
        }
        if record.is_expired(now) {
            return deny(Reason::KeyExpired);
        }
        let Some(tenant) = self.find_tenant(&record.tenant_id).await? else {
            return deny(Reason::KeyUnknown);
        };
        if !self.profile.is_active(tenant.status) {
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
        Ok(Decision::Allow(Principal {
            tenant_id: record.tenant_id.clone(),
            key_id: Some(record.id),
            plan: tenant.plan.clone(),
            environment: record.environment.clone(),
            scopes,
            subject: record.id.to_string(),
            credential_type: CredentialType::ApiKey,
        }))
    }

    /// Finds the key for a well-formed secret: current pepper first, then
    /// previous ones (rehashing to the current pepper on a match).
    async fn find_key(&self, key: &str) -> Result<Option<Arc<KeyRecord>>> {
        let current = self.peppers.current();
        let current_digest = current.digest(key);
        for pepper in self.peppers.all() {
            let digest = if pepper.version() == current.version() {
                current_digest
            } else {
                pepper.digest(key)
            };
            if let Some(hit) = self.caches.key(&digest) {
                if hit.digest.ct_eq(&digest) {
                    return Ok(Some(hit));
                }
            }
            if self.caches.is_unknown(&digest) {
                continue;
            }
            let g = self.caches.generation();
            match self.store.find_key_by_digest(&digest).await? {
                Some(record) if record.digest.ct_eq(&digest) => {
                    let record = if pepper.version() == current.version() {
                        record
                    } else {
                        self.rehash(record, &digest, current_digest, current.version())
                            .await
                    };
                    let record = Arc::new(record);
                    self.caches.insert_key(g, record.digest, record.clone());
                    return Ok(Some(record));
                }
                _ => self.caches.insert_unknown(g, digest),
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
                self.caches.forget_unknown(&new);
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
            return Ok(Some(t));
        }
        let g = self.caches.generation();
        let Some(tenant) = self.store.get_tenant(id).await? else {
            return Ok(None);
        };
        let tenant = Arc::new(tenant);
        self.caches.insert_tenant(g, tenant.clone());
        Ok(Some(tenant))
    }
}

/// Whose limits CheckQuota is asked about.
#[derive(Clone, Copy)]
pub enum QuotaSubject<'a> {
    Tenant(&'a str),
    Key(&'a str),
    /// A raw API key.
    Credential(&'a str),
}

/// CheckQuota's answer until limits are counted: the subject's plan, and a
/// denial when the subject may not make calls at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaAnswer {
    pub plan: Option<String>,
    pub denial: Option<Reason>,
}

impl Authenticator {
    /// Answers from the plan, counting nothing (the limits issue adds
    /// counting). Unknown tenant or key ids are `NotFound`.
    pub async fn check_quota(&self, subject: QuotaSubject<'_>) -> Result<QuotaAnswer> {
        let deny = |reason| QuotaAnswer {
            plan: None,
            denial: Some(reason),
        };
        let tenant_id = match subject {
            QuotaSubject::Credential(key) => {
                let input = AuthInput {
                    api_key: key,
                    ..AuthInput::default()
                };
                return Ok(match self.authenticate(input).await? {
                    Decision::Allow(p) => QuotaAnswer {
                        plan: Some(p.plan),
                        denial: None,
                    },
                    Decision::Deny(reason) => deny(reason),
                });
            }
            QuotaSubject::Key(id) => {
                let id = KeyId::parse_str(id)
                    .map_err(|_| Error::invalid("key_id", "must be a key id (a UUID)"))?;
                let key = crate::store::KeyRef { id, tenant: None };
                let record = self
                    .store
                    .get_key(key)
                    .await?
                    .ok_or(Error::NotFound("key"))?;
                let now = self.clock.now();
                if record.is_revoked(now) {
                    return Ok(deny(Reason::KeyRevoked));
                }
                if record.is_expired(now) {
                    return Ok(deny(Reason::KeyExpired));
                }
                record.tenant_id
            }
            QuotaSubject::Tenant(id) => TenantId::parse(id).ok_or_else(|| {
                Error::invalid("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]")
            })?,
        };
        let tenant = self
            .find_tenant(&tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        let active =
            self.profile.is_active(tenant.status) && self.profile.plan(&tenant.plan).is_some();
        Ok(QuotaAnswer {
            plan: Some(tenant.plan.clone()),
            denial: (!active).then_some(Reason::SubscriptionInactive),
        })
    }
}

#[cfg(test)]
mod tests;
