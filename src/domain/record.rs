//! Stored API key records. The secret itself is never stored: only its digest.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{KeyLabels, LimitSpec, TenantId};
use crate::domain::KeyDigest;

/// A key's public identifier (UUIDv7: time-ordered, so pages sort by creation).
pub type KeyId = Uuid;

/// A key record as stored. `Debug` is safe: the digest redacts itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub tenant_id: TenantId,
    pub name: String,
    pub environment: String,
    pub scopes: Vec<String>,
    pub hint: String,
    pub digest: KeyDigest,
    pub pepper_version: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_reason: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub replaced_by: Option<KeyId>,
    /// The key's own limits, tightening the plan's.
    pub limits: Option<Vec<LimitSpec>>,
    /// The first key of its rotation chain: key-scoped quota and rate
    /// state belong to the lineage, so rotation never hands out a fresh
    /// quota.
    pub lineage_id: KeyId,
    /// The key's labels (name → value), for grouping and for the upstream.
    pub labels: KeyLabels,
    /// Imported by ImportKeys: its digest is the legacy one
    /// (`Pepper::legacy_digest`), it has no Tollgate checksum.
    pub legacy: bool,
}

impl KeyRecord {
    /// The record as decisions read it: the display-only fields (name,
    /// hint, revoke reason, last use) are dropped, so each cached key
    /// costs less memory (BENCHMARKS.md, bytes per cached key).
    pub fn for_decisions(mut self) -> Self {
        self.name = String::new();
        self.hint = String::new();
        self.revoke_reason = None;
        self.last_used_at = None;
        self
    }

    /// Revoked: a state, not a time. A set `revoked_at` means revoked
    /// everywhere at once, whatever this replica's clock says (a clock
    /// running behind the one that revoked must not bring a key back).
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    /// Expired at or before `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Counts against the plan's key cap: not revoked, not expired, not
    /// replaced by a rotation.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        !self.is_revoked() && !self.is_expired(now) && self.replaced_by.is_none()
    }

    /// Whether `u` may apply to this key as it is now: a revoked or rotated
    /// key can only be renamed. Checked by the store on the locked row, so
    /// a concurrent rotation or revocation cannot slip between check and
    /// write.
    pub fn check_update(&self, u: &KeyUpdate) -> Result<(), &'static str> {
        let only_renames = u.scopes.is_none() && u.expires_at.is_none() && u.limits.is_none();
        if !only_renames && (self.revoked_at.is_some() || self.replaced_by.is_some()) {
            return Err("a revoked or rotated key can only be renamed");
        }
        Ok(())
    }

    /// Whether `u` brings this key back to life at `now` (an expired key
    /// given a later expiry, or none): the cap must be checked again.
    pub fn revived_by(&self, u: &KeyUpdate, now: DateTime<Utc>) -> bool {
        let Some(expires_at) = u.expires_at else {
            return false;
        };
        !self.is_live(now)
            && !self.is_revoked()
            && self.replaced_by.is_none()
            && expires_at.is_none_or(|t| t > now)
    }

    /// Makes `new` this key's successor by rotation, from this key as it is
    /// now (read under the row lock, so a concurrent update is not lost):
    /// same name, scopes, limits and lineage, and the same lifetime length
    /// from the new key's creation.
    pub fn succeed(&self, new: &mut NewKey) {
        new.name.clone_from(&self.name);
        new.scopes.clone_from(&self.scopes);
        new.limits.clone_from(&self.limits);
        new.lineage_id = self.lineage_id;
        new.labels.clone_from(&self.labels);
        new.expires_at = self
            .expires_at
            .map(|e| new.created_at + (e - self.created_at));
    }
}

/// A key about to be inserted.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: KeyId,
    pub tenant_id: TenantId,
    pub name: String,
    pub environment: String,
    pub scopes: Vec<String>,
    pub hint: String,
    pub digest: KeyDigest,
    pub pepper_version: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub limits: Option<Vec<LimitSpec>>,
    /// `id` for a new key; the predecessor's lineage for a rotated one.
    pub lineage_id: KeyId,
    /// The key's labels.
    pub labels: KeyLabels,
    /// An imported legacy key.
    pub legacy: bool,
}

impl NewKey {
    /// The record this becomes once stored.
    pub fn into_record(self) -> KeyRecord {
        KeyRecord {
            id: self.id,
            tenant_id: self.tenant_id,
            name: self.name,
            environment: self.environment,
            scopes: self.scopes,
            hint: self.hint,
            digest: self.digest,
            pepper_version: self.pepper_version,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: None,
            revoke_reason: None,
            last_used_at: None,
            replaced_by: None,
            limits: self.limits,
            lineage_id: self.lineage_id,
            labels: self.labels,
            legacy: self.legacy,
        }
    }
}

/// A validated change to a key; `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// `Some(None)` removes the key's own limits.
    pub limits: Option<Option<Vec<LimitSpec>>>,
    /// Replaces every label (an empty map removes them all).
    pub labels: Option<KeyLabels>,
}
