//! Key import (cut-over): a product's existing keys, raw or as their
//! SHA-256, brought into a tenant as legacy keys. Each is stored under its
//! legacy digest (`Pepper::legacy_digest`), so a raw key and an imported
//! digest of it end at the same row; all keys of a call go in together or
//! not at all.

use chrono::Duration;

use super::{not_found, parse_tenant_id, Manager, MAX_TTL_SECONDS};
use crate::crypto::digest::sha256;
use crate::domain::console::AuditContext;
use crate::domain::validate::{check_name, check_scopes};
use crate::domain::{KeyLabels, KeyRecord, NewKey, Violations};
use crate::error::{Error, Result};
use crate::store::Invalidation;

/// Most keys one ImportKeys call takes.
pub const MAX_IMPORT: usize = 1000;

/// One key to import, as received. `Debug` leaves the key out.
#[derive(Clone, Default)]
pub struct ImportKeyInput {
    /// The key itself (exclusive with `sha256_hex`). Never logged.
    pub api_key: String,
    /// The key's SHA-256 as 64 lower-case hex characters.
    pub sha256_hex: String,
    pub name: String,
    pub environment: String,
    pub scopes: Vec<String>,
    pub ttl_seconds: Option<i64>,
    pub labels: std::collections::HashMap<String, String>,
}

impl std::fmt::Debug for ImportKeyInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportKeyInput")
            .field("name", &self.name)
            .field("environment", &self.environment)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Imports `keys` into `tenant_id` as legacy keys, audited as `ctx`.
    pub async fn import_keys_as(
        &self,
        ctx: &AuditContext,
        tenant_id: &str,
        keys: Vec<ImportKeyInput>,
    ) -> Result<Vec<KeyRecord>> {
        let Some(legacy) = &self.profile.legacy_keys else {
            return Err(Error::FailedPrecondition(
                "this profile does not accept legacy keys: set [keys.legacy] first, or \
                 imported keys could never be used"
                    .into(),
            ));
        };
        let mut v = Violations::default();
        let tenant_id = parse_tenant_id("tenant_id", tenant_id, &mut v);
        if keys.is_empty() || keys.len() > MAX_IMPORT {
            v.add("keys", format!("give 1..={MAX_IMPORT} keys"));
        }
        let format = &self.profile.key_format;
        let mut shaped: Vec<Checked> = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let field = |f: &str| format!("keys[{i}].{f}");
            check_name(&field("name"), &k.name, &mut v);
            check_scopes(&field("scopes"), &k.scopes, &mut v);
            let labels = KeyLabels::parse(&field("labels"), k.labels.clone(), &mut v);
            // A legacy key's tail is secret (no checksum there): the hint
            // shows only prefix and environment.
            let (sha, key_env) = match (k.api_key.is_empty(), k.sha256_hex.is_empty()) {
                (false, true) => match legacy.environment_of(format, &k.api_key) {
                    Some(env) => (Some(sha256(&k.api_key)), Some(env.to_string())),
                    None => {
                        v.add(
                            field("api_key"),
                            format!(
                                "is not a `{}_<environment>_` key with a body of {}..={} \
                                 characters of [A-Za-z0-9_-] (keys.legacy)",
                                format.prefix(),
                                legacy.min_body_length,
                                legacy.max_body_length
                            ),
                        );
                        (None, None)
                    }
                },
                (true, false) => {
                    let sha = parse_sha256(&k.sha256_hex);
                    if sha.is_none() {
                        v.add(field("sha256_hex"), "must be 64 lower-case hex characters");
                    }
                    (sha, None)
                }
                _ => {
                    v.add(field("api_key"), "give exactly one of api_key, sha256_hex");
                    (None, None)
                }
            };
            let environment = match (&key_env, k.environment.as_str()) {
                (Some(env), "") => env.clone(),
                (Some(env), given) if given != env => {
                    v.add(field("environment"), format!("the key is a `{env}` key"));
                    env.clone()
                }
                (_, "") => format.environments()[0].clone(),
                (_, given) => {
                    if !format.has_environment(given) {
                        v.add(
                            field("environment"),
                            format!("must be one of: {}", format.environments().join(", ")),
                        );
                    }
                    given.to_string()
                }
            };
            let ttl = match k.ttl_seconds {
                None => self.profile.default_ttl_seconds.map(|s| s as i64),
                Some(0) => None,
                Some(s) if !(1..=MAX_TTL_SECONDS).contains(&s) => {
                    v.add(
                        field("ttl_seconds"),
                        format!("must be 0 (never expires) or 1..={MAX_TTL_SECONDS}"),
                    );
                    None
                }
                Some(s) => Some(s),
            };
            let hint = format!("{}_{environment}_…", format.prefix());
            if let Some(j) = sha.and_then(|s| shaped.iter().position(|c| c.sha == s)) {
                v.add(field("api_key"), format!("the same key as keys[{j}]"));
            }
            shaped.push(Checked {
                sha: sha.unwrap_or_default(),
                hint,
                environment,
                ttl,
                labels,
            });
        }
        v.into_result()?;
        let tenant_id = tenant_id.expect("validated");
        let tenant = self.tenant(&tenant_id).await?;

        let mut v = Violations::default();
        let plan = self.profile.plan(&tenant.plan);
        let now = self.clock.now();
        let pepper = self.peppers.current();
        let mut new_keys = Vec::with_capacity(keys.len());
        for (i, (k, checked)) in keys.into_iter().zip(shaped).enumerate() {
            let Checked {
                sha,
                hint,
                environment,
                ttl,
                labels,
            } = checked;
            if plan.is_some_and(|p| !p.allows_environment(&environment)) {
                v.add(
                    format!("keys[{i}].environment"),
                    format!(
                        "`{environment}` keys are not allowed on plan `{}`",
                        tenant.plan
                    ),
                );
            }
            let scopes = if k.scopes.is_empty() {
                plan.map(|p| p.default_scopes.clone().unwrap_or_else(|| p.scopes.clone()))
                    .unwrap_or_default()
            } else {
                let mut scoped = Violations::default();
                self.check_scopes_allowed(&tenant, &k.scopes, &mut scoped);
                for x in scoped.0 {
                    v.add(format!("keys[{i}].{}", x.field), x.description);
                }
                k.scopes
            };
            let id = uuid::Uuid::now_v7();
            new_keys.push(NewKey {
                id,
                tenant_id: tenant_id.clone(),
                name: k.name,
                environment,
                scopes,
                hint,
                digest: pepper.legacy_digest(&sha),
                pepper_version: pepper.version(),
                created_at: now,
                expires_at: ttl.map(|s| now + Duration::seconds(s)),
                limits: None,
                lineage_id: id,
                labels,
                legacy: true,
            });
        }
        v.into_result()?;
        let records = self
            .store
            .insert_keys(new_keys, ctx)
            .await
            .map_err(not_found("tenant"))?;
        tracing::info!(tenant_id = %tenant_id, keys = records.len(), "legacy keys imported");
        for r in &records {
            self.changed(Invalidation::KeyAdded(r.digest));
        }
        Ok(records)
    }
}

/// One key's request fields, checked.
struct Checked {
    sha: [u8; 32],
    hint: String,
    environment: String,
    ttl: Option<i64>,
    labels: KeyLabels,
}

fn parse_sha256(hex_text: &str) -> Option<[u8; 32]> {
    let lower = hex_text
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut out = [0u8; 32];
    (lower && hex::decode_to_slice(hex_text, &mut out).is_ok()).then_some(out)
}
