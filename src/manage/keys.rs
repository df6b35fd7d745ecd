//! Key management: create, revoke, rotate, update, read and list keys,
//! under the tenant's plan (scopes, key cap, limits that only tighten).

use chrono::{DateTime, Duration, Utc};

use super::{
    check_mask, not_found, page_size, parse_key_id, parse_scope, parse_tenant_id, Manager, Page,
    MAX_GRACE_SECONDS, MAX_TTL_SECONDS,
};
use crate::domain::console::AuditContext;
use crate::domain::limit::check_tightens;
use crate::domain::validate::{check_name, check_scopes};
use crate::domain::{
    ApiKeySecret, KeyId, KeyLabels, KeyRecord, KeyUpdate, LimitScope, LimitSpec, NewKey, Tenant,
    TenantId, Violations,
};
use crate::error::{Error, Result};
use crate::store::{Invalidation, KeyRef};

/// A CreateKey request, as received.
#[derive(Debug, Clone, Default)]
pub struct CreateKeyInput {
    pub tenant_id: String,
    pub name: String,
    pub environment: String,
    pub scopes: Vec<String>,
    pub ttl_seconds: Option<i64>,
    /// The key's own key-scoped limits, tightening the plan's; empty = none.
    pub limits: Vec<LimitSpec>,
    /// The key's labels (bounded: [`crate::domain::labels`]).
    pub labels: std::collections::HashMap<String, String>,
}

/// An UpdateKey request, as received.
#[derive(Debug, Clone, Default)]
pub struct UpdateKeyInput {
    pub key_id: String,
    pub tenant_id: String,
    pub update_mask: Vec<String>,
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub limits: Vec<LimitSpec>,
    /// With `labels` in the mask: the key's labels, all replaced.
    pub labels: std::collections::HashMap<String, String>,
}

/// A newly issued key: the secret (shown once) and its record.
#[derive(Debug)]
pub struct IssuedKey {
    pub secret: ApiKeySecret,
    pub record: KeyRecord,
}

/// What a new key is made of, before its secret is generated.
struct KeyShape {
    tenant_id: TenantId,
    name: String,
    environment: String,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    limits: Option<Vec<LimitSpec>>,
    labels: KeyLabels,
}

impl Manager {
    fn allowed_scopes<'a>(&'a self, tenant: &'a Tenant) -> &'a [String] {
        tenant
            .overrides
            .allowed_scopes
            .as_deref()
            .or_else(|| self.profile.plan(&tenant.plan).map(|p| p.scopes.as_slice()))
            .unwrap_or(&[])
    }

    pub(super) fn check_scopes_allowed(
        &self,
        tenant: &Tenant,
        scopes: &[String],
        v: &mut Violations,
    ) {
        let allowed = self.allowed_scopes(tenant);
        for (i, s) in scopes.iter().enumerate() {
            if !allowed.contains(s) {
                v.add(
                    format!("scopes[{i}]"),
                    format!(
                        "`{s}` is not allowed on plan `{}`; allowed: {}",
                        tenant.plan,
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    /// The tenant's key cap: its override, else its plan's.
    fn cap(&self) -> impl Fn(&Tenant) -> Option<u32> + Sync + use<> {
        let profile = self.profile.clone();
        move |t: &Tenant| {
            t.overrides
                .max_keys
                .or_else(|| profile.plan(&t.plan).and_then(|p| p.max_keys))
        }
    }

    /// Generates a key of `shape`; the secret is returned once, only its
    /// digest is kept.
    fn new_key(&self, shape: KeyShape, now: DateTime<Utc>) -> (ApiKeySecret, NewKey) {
        let secret = self.profile.key_format.generate(&shape.environment);
        let pepper = self.peppers.current();
        let id = uuid::Uuid::now_v7();
        let key = NewKey {
            id,
            tenant_id: shape.tenant_id,
            name: shape.name,
            environment: shape.environment,
            scopes: shape.scopes,
            hint: secret.hint(),
            digest: pepper.digest(secret.expose()),
            pepper_version: pepper.version(),
            created_at: now,
            expires_at: shape.expires_at,
            limits: shape.limits,
            lineage_id: id,
            labels: shape.labels,
            legacy: false,
        };
        (secret, key)
    }

    /// Creates a key under the tenant's plan cap (audited as `system`).
    pub async fn create_key(&self, input: CreateKeyInput) -> Result<IssuedKey> {
        self.create_key_as(&AuditContext::system(), input).await
    }

    /// Creates a key under the tenant's plan cap, audited as `ctx`.
    pub async fn create_key_as(
        &self,
        ctx: &AuditContext,
        input: CreateKeyInput,
    ) -> Result<IssuedKey> {
        let mut v = Violations::default();
        let tenant_id = parse_tenant_id("tenant_id", &input.tenant_id, &mut v);
        check_name("name", &input.name, &mut v);
        let format = &self.profile.key_format;
        let environment = if input.environment.is_empty() {
            format.environments()[0].clone()
        } else {
            if !format.has_environment(&input.environment) {
                v.add(
                    "environment",
                    format!("must be one of: {}", format.environments().join(", ")),
                );
            }
            input.environment.clone()
        };
        check_scopes("scopes", &input.scopes, &mut v);
        self.check_key_limits(&input.limits, &mut v);
        let labels = KeyLabels::parse("labels", input.labels, &mut v);
        let ttl = match input.ttl_seconds {
            None => self.profile.default_ttl_seconds.map(|s| s as i64),
            Some(0) => None,
            Some(s) if !(1..=MAX_TTL_SECONDS).contains(&s) => {
                v.add(
                    "ttl_seconds",
                    format!("must be 0 (never expires) or 1..={MAX_TTL_SECONDS}"),
                );
                None
            }
            Some(s) => Some(s),
        };
        v.into_result()?;
        let tenant_id = tenant_id.expect("validated");
        let tenant = self.tenant(&tenant_id).await?;

        let mut v = Violations::default();
        let plan = self.profile.plan(&tenant.plan);
        if plan.is_some_and(|p| !p.allows_environment(&environment)) {
            v.add(
                "environment",
                format!(
                    "`{environment}` keys are not allowed on plan `{}`",
                    tenant.plan
                ),
            );
        }
        self.check_limits_tighten(&tenant, &environment, &input.limits, &mut v);
        let scopes = if input.scopes.is_empty() {
            plan.map(|p| p.default_scopes.clone().unwrap_or_else(|| p.scopes.clone()))
                .unwrap_or_default()
        } else {
            self.check_scopes_allowed(&tenant, &input.scopes, &mut v);
            dedup(input.scopes)
        };
        v.into_result()?;

        let now = self.clock.now();
        let expires_at = ttl.map(|s| now + Duration::seconds(s));
        let limits = (!input.limits.is_empty()).then_some(input.limits);
        let (secret, key) = self.new_key(
            KeyShape {
                tenant_id,
                name: input.name,
                environment,
                scopes,
                expires_at,
                limits,
                labels,
            },
            now,
        );
        let cap = self.cap();
        let record = self
            .store
            .insert_key(key, &cap, ctx)
            .await
            .map_err(not_found("tenant"))?;
        tracing::info!(tenant_id = %record.tenant_id, key_id = %record.id, "key created");
        self.changed(Invalidation::KeyAdded(record.digest));
        Ok(IssuedKey { secret, record })
    }

    /// Revokes a key; refused at once on every replica.
    pub async fn revoke_key(
        &self,
        key_id: &str,
        tenant_id: &str,
        reason: &str,
    ) -> Result<KeyRecord> {
        self.revoke_key_as(&AuditContext::system(), key_id, tenant_id, reason)
            .await
    }

    /// Revokes a key, audited as `ctx`.
    pub async fn revoke_key_as(
        &self,
        ctx: &AuditContext,
        key_id: &str,
        tenant_id: &str,
        reason: &str,
    ) -> Result<KeyRecord> {
        let mut v = Violations::default();
        let id = parse_key_id(key_id, &mut v);
        let tenant = parse_scope(tenant_id, &mut v);
        if reason.chars().count() > 256 || reason.chars().any(char::is_control) {
            v.add("reason", "must be at most 256 printable characters");
        }
        v.into_result()?;
        let key = KeyRef {
            id: id.expect("validated"),
            tenant: tenant.as_ref(),
        };
        let record = self
            .store
            .revoke_key(key, reason, self.clock.now(), ctx)
            .await
            .map_err(not_found("key"))?;
        tracing::info!(tenant_id = %record.tenant_id, key_id = %record.id, "key revoked");
        self.changed(Invalidation::Key(record.id));
        Ok(record)
    }

    /// Reads a key.
    pub async fn get_key(&self, key_id: &str, tenant_id: &str) -> Result<KeyRecord> {
        let mut v = Violations::default();
        let id = parse_key_id(key_id, &mut v);
        let tenant = parse_scope(tenant_id, &mut v);
        v.into_result()?;
        let key = KeyRef {
            id: id.expect("validated"),
            tenant: tenant.as_ref(),
        };
        self.store.get_key(key).await?.ok_or(Error::NotFound("key"))
    }

    /// A page of a tenant's keys, oldest first.
    pub async fn list_keys(
        &self,
        tenant_id: &str,
        page_size_req: u32,
        page_token: &str,
        include_revoked: bool,
    ) -> Result<Page<KeyRecord>> {
        self.list_keys_labelled(
            tenant_id,
            page_size_req,
            page_token,
            include_revoked,
            Default::default(),
        )
        .await
    }

    /// Lists a tenant's keys carrying every label of `label_selector`
    /// (empty: all keys).
    pub async fn list_keys_labelled(
        &self,
        tenant_id: &str,
        page_size_req: u32,
        page_token: &str,
        include_revoked: bool,
        label_selector: std::collections::HashMap<String, String>,
    ) -> Result<Page<KeyRecord>> {
        let mut v = Violations::default();
        let selector = KeyLabels::parse("label_selector", label_selector, &mut v);
        let tenant = parse_tenant_id("tenant_id", tenant_id, &mut v);
        let size = page_size(page_size_req, &mut v);
        let after = if page_token.is_empty() {
            None
        } else {
            let t = KeyId::parse_str(page_token).ok();
            if t.is_none() {
                v.add(
                    "page_token",
                    "is not a token from a previous ListKeys response",
                );
            }
            t
        };
        v.into_result()?;
        let tenant = tenant.expect("validated");
        self.tenant(&tenant).await?;
        let mut items = if selector.is_empty() {
            self.store
                .list_keys(&tenant, after, size + 1, include_revoked)
                .await?
        } else {
            self.store
                .list_keys_labelled(&tenant, after, size + 1, include_revoked, &selector)
                .await?
        };
        let next_page_token = if items.len() > size as usize {
            items.truncate(size as usize);
            items.last().map(|k| k.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    /// Issues a replacement key; the old one works for `grace_seconds` more.
    pub async fn rotate_key(
        &self,
        key_id: &str,
        tenant_id: &str,
        grace_seconds: i64,
    ) -> Result<(IssuedKey, KeyRecord)> {
        self.rotate_key_as(&AuditContext::system(), key_id, tenant_id, grace_seconds)
            .await
    }

    /// Rotates a key, audited as `ctx`.
    pub async fn rotate_key_as(
        &self,
        ctx: &AuditContext,
        key_id: &str,
        tenant_id: &str,
        grace_seconds: i64,
    ) -> Result<(IssuedKey, KeyRecord)> {
        let mut v = Violations::default();
        let id = parse_key_id(key_id, &mut v);
        let tenant = parse_scope(tenant_id, &mut v);
        if !(0..=MAX_GRACE_SECONDS).contains(&grace_seconds) {
            v.add("grace_seconds", format!("must be 0..={MAX_GRACE_SECONDS}"));
        }
        v.into_result()?;
        let key = KeyRef {
            id: id.expect("validated"),
            tenant: tenant.as_ref(),
        };
        let old = self
            .store
            .get_key(key)
            .await?
            .ok_or(Error::NotFound("key"))?;
        let now = self.clock.now();
        // Name, scopes, limits, lineage and lifetime are taken again from
        // the locked row by the store (`KeyRecord::succeed`), so an update
        // racing this rotation is not lost; the environment never changes.
        let expires_at = old.expires_at.map(|e| now + (e - old.created_at));
        let (secret, new) = self.new_key(
            KeyShape {
                tenant_id: old.tenant_id.clone(),
                name: old.name.clone(),
                environment: old.environment.clone(),
                scopes: old.scopes.clone(),
                expires_at,
                limits: old.limits.clone(),
                labels: old.labels.clone(),
            },
            now,
        );
        let (previous, record) = self
            .store
            .rotate_key(key, new, now + Duration::seconds(grace_seconds), ctx)
            .await
            .map_err(not_found("key"))?;
        tracing::info!(tenant_id = %record.tenant_id, key_id = %record.id,
            previous_key_id = %previous.id, grace_seconds, "key rotated");
        self.changed(Invalidation::Key(previous.id));
        self.changed(Invalidation::KeyAdded(record.digest));
        Ok((IssuedKey { secret, record }, previous))
    }

    /// Changes a key's name, scopes or expiry.
    pub async fn update_key(&self, input: UpdateKeyInput) -> Result<KeyRecord> {
        self.update_key_as(&AuditContext::system(), input).await
    }

    /// Changes a key, audited as `ctx`.
    pub async fn update_key_as(
        &self,
        ctx: &AuditContext,
        input: UpdateKeyInput,
    ) -> Result<KeyRecord> {
        let mut v = Violations::default();
        let id = parse_key_id(&input.key_id, &mut v);
        let tenant = parse_scope(&input.tenant_id, &mut v);
        check_mask(
            &input.update_mask,
            &["name", "scopes", "expires_at", "limits", "labels"],
            &mut v,
        );
        let has = |p: &str| input.update_mask.iter().any(|m| m == p);
        if has("name") {
            check_name("name", &input.name, &mut v);
        }
        if has("scopes") {
            check_scopes("scopes", &input.scopes, &mut v);
        }
        if has("limits") {
            self.check_key_limits(&input.limits, &mut v);
        }
        let labels =
            has("labels").then(|| KeyLabels::parse("labels", input.labels.clone(), &mut v));
        v.into_result()?;
        let key = KeyRef {
            id: id.expect("validated"),
            tenant: tenant.as_ref(),
        };
        let current = self
            .store
            .get_key(key)
            .await?
            .ok_or(Error::NotFound("key"))?;
        // Whether a revoked or rotated key may change, and whether a revival
        // passes the cap, is decided by the store on the locked row.
        let latest = current.created_at + Duration::seconds(MAX_TTL_SECONDS);
        if has("expires_at") && input.expires_at.is_some_and(|t| t > latest) {
            return Err(Error::invalid(
                "expires_at",
                &format!("must be at most {MAX_TTL_SECONDS} seconds after the key's creation"),
            ));
        }
        if has("scopes") || has("limits") {
            let owner = self.tenant(&current.tenant_id).await?;
            let mut v = Violations::default();
            if has("scopes") {
                self.check_scopes_allowed(&owner, &input.scopes, &mut v);
            }
            if has("limits") {
                self.check_limits_tighten(&owner, &current.environment, &input.limits, &mut v);
            }
            v.into_result()?;
        }
        let update = KeyUpdate {
            name: has("name").then(|| input.name.clone()),
            scopes: has("scopes").then(|| dedup(input.scopes.clone())),
            expires_at: has("expires_at").then_some(input.expires_at),
            limits: has("limits").then(|| (!input.limits.is_empty()).then(|| input.limits.clone())),
            labels,
        };
        let cap = self.cap();
        let record = self
            .store
            .update_key(key, &update, &cap, self.clock.now(), ctx)
            .await
            .map_err(not_found("key"))?;
        tracing::info!(tenant_id = %record.tenant_id, key_id = %record.id, "key updated");
        self.changed(Invalidation::Key(record.id));
        Ok(record)
    }

    fn check_key_limits(&self, limits: &[LimitSpec], v: &mut Violations) {
        if limits.len() > 16 {
            v.add("limits", "at most 16 limits");
        }
        for (i, l) in limits.iter().enumerate() {
            let field = format!("limits[{i}]");
            self.check_limit(&field, l, v);
            if l.scope != LimitScope::Key {
                v.add(
                    format!("{field}.scope"),
                    "a key's own limits must have scope `key`",
                );
            }
        }
    }

    /// A key's own limits may only tighten what its plan and tenant set
    /// (limits and bursts alike), whoever asks: loosening is the
    /// operator's, explicitly, through the tenant's overrides.
    fn check_limits_tighten(
        &self,
        tenant: &Tenant,
        environment: &str,
        limits: &[LimitSpec],
        v: &mut Violations,
    ) {
        let plan = self
            .profile
            .plan(&tenant.plan)
            .map(|p| p.limits.as_slice())
            .unwrap_or(&[]);
        check_tightens(
            plan,
            tenant.overrides.limits.as_deref(),
            environment,
            "limits",
            limits,
            v,
        );
    }
}

fn dedup(mut scopes: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    scopes.retain(|s| seen.insert(s.clone()));
    scopes
}
