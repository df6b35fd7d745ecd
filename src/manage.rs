//! Management operations on keys and tenants: validation, plan rules, and
//! the calls into the store. No tonic, no SQL. The key rules are in
//! `manage/keys.rs`, the tenant rules in `manage/tenants.rs`; this file
//! holds the `Manager`, the checks both share and request parsing.

use std::sync::Arc;

use crate::cache::Caches;
use crate::clock::Clock;
use crate::crypto::Peppers;
use crate::domain::{KeyId, LimitSpec, Tenant, TenantId, Violations};
use crate::error::{Error, Result};
use crate::profile::Profile;
use crate::store::{Invalidation, Store, StoreError};

mod import;
mod keys;
mod leaks;
pub mod revocation;
pub mod revocation_events;
mod tenants;

pub use import::{ImportKeyInput, MAX_IMPORT};
pub use keys::{CreateKeyInput, IssuedKey, UpdateKeyInput};
pub use tenants::{CreateTenantInput, UpdateTenantInput};

/// Longest key lifetime accepted: 10 years.
pub const MAX_TTL_SECONDS: i64 = 10 * 366 * 24 * 3600;
/// Longest rotation grace period: 30 days.
pub const MAX_GRACE_SECONDS: i64 = 30 * 24 * 3600;
/// Default and largest page sizes.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

/// A page of results and the token for the next one (empty on the last).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

/// Key and tenant management.
pub struct Manager {
    profile: Arc<Profile>,
    peppers: Peppers,
    store: Arc<dyn Store>,
    clock: Clock,
    /// This replica's caches: a change is applied here at once, before the
    /// NOTIFY round trip, so the replica that made it never serves the old
    /// decision.
    caches: Option<Arc<Caches>>,
    /// Where revocation events go (`manage::revocation_events`), if anywhere.
    revocation_events: Option<Arc<dyn revocation_events::RevocationEvents>>,
}

fn parse_tenant_id(field: &str, s: &str, v: &mut Violations) -> Option<TenantId> {
    let id = TenantId::parse(s);
    if id.is_none() {
        v.add(field, "must be 1-64 characters of [A-Za-z0-9_-]");
    }
    id
}

fn parse_key_id(s: &str, v: &mut Violations) -> Option<KeyId> {
    let id = KeyId::parse_str(s).ok();
    if id.is_none() {
        v.add("key_id", "must be a key id (a UUID)");
    }
    id
}

/// An optional tenant scope: empty means none.
fn parse_scope(s: &str, v: &mut Violations) -> Option<TenantId> {
    if s.is_empty() {
        None
    } else {
        parse_tenant_id("tenant_id", s, v)
    }
}

fn page_size(requested: u32, v: &mut Violations) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            v.add("page_size", format!("must be at most {MAX_PAGE_SIZE}"));
            MAX_PAGE_SIZE
        }
        n => n,
    }
}

fn check_mask(mask: &[String], allowed: &[&str], v: &mut Violations) {
    if mask.is_empty() {
        v.add(
            "update_mask",
            format!("name at least one of: {}", allowed.join(", ")),
        );
    }
    for (i, path) in mask.iter().enumerate() {
        if !allowed.contains(&path.as_str()) {
            v.add(
                format!("update_mask[{i}]"),
                format!("must be one of: {}", allowed.join(", ")),
            );
        }
    }
}

fn not_found(what: &'static str) -> impl FnOnce(StoreError) -> Error {
    move |e| match e {
        StoreError::NotFound => Error::NotFound(what),
        e => e.into(),
    }
}

impl Manager {
    /// Assembles the manager.
    pub fn new(
        profile: Arc<Profile>,
        peppers: Peppers,
        store: Arc<dyn Store>,
        clock: Clock,
    ) -> Self {
        Self {
            profile,
            peppers,
            store,
            clock,
            caches: None,
            revocation_events: None,
        }
    }

    /// Applies this manager's changes to `caches` at once.
    pub fn with_caches(mut self, caches: Arc<Caches>) -> Self {
        self.caches = Some(caches);
        self
    }

    /// Sends every revocation event to `sink`.
    pub fn with_revocation_events(
        mut self,
        sink: Arc<dyn revocation_events::RevocationEvents>,
    ) -> Self {
        self.revocation_events = Some(sink);
        self
    }

    fn changed(&self, event: Invalidation) {
        if let Some(c) = &self.caches {
            c.apply(&event);
        }
    }

    async fn tenant(&self, id: &TenantId) -> Result<Tenant> {
        self.store
            .get_tenant(id)
            .await?
            .ok_or(Error::NotFound("tenant"))
    }

    fn check_limit(&self, field: &str, l: &LimitSpec, v: &mut Violations) {
        l.check(field, v);
        let format = &self.profile.key_format;
        if let Some(e) = l.environments.iter().find(|e| !format.has_environment(e)) {
            v.add(
                format!("{field}.environments"),
                format!("`{e}` is not one of: {}", format.environments().join(", ")),
            );
        }
    }
}
