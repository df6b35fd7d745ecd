//! Leak reports (the GitHub endpoint and `ReportLeakedKeys` both end
//! here): which reported tokens are our keys, looked up as the decision
//! path looks keys up, and what the tenant's revocation policy does with
//! them (flag, or flag and revoke). No tonic, no SQL.

use sha2::{Digest, Sha256};

use super::revocation_events::RevocationEvent;
use super::Manager;
use crate::domain::console::AuditContext;
use crate::domain::revocation::{LeakSource, PolicyMatch, PolicyReason};
use crate::domain::{KeyId, Violations};
use crate::error::{Error, Result};

/// Tokens in one leak report, at most.
pub const MAX_LEAK_TOKENS: usize = 1000;
/// Longest token looked at; longer ones are not ours (false positive).
const MAX_TOKEN_LEN: usize = 1024;

/// One token of a leak report. The token never shows in `Debug`.
#[derive(Clone, Default)]
pub struct LeakedToken {
    pub token: String,
    /// The reporter's name for the kind of secret (echoed back).
    pub token_type: String,
    /// Where it was found.
    pub url: String,
    /// The kind of place (`commit`, `issue`, …).
    pub source: String,
}

impl std::fmt::Debug for LeakedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeakedToken")
            .field("token_type", &self.token_type)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Whether a reported token is one of our keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakLabel {
    TruePositive,
    FalsePositive,
}

impl LeakLabel {
    /// GitHub's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TruePositive => "true_positive",
            Self::FalsePositive => "false_positive",
        }
    }
}

/// The answer about one reported token: nothing but its SHA-256, its type
/// as reported, and the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakVerdict {
    /// Lower-case hex SHA-256 of the token.
    pub token_hash: String,
    pub token_type: String,
    pub label: LeakLabel,
}

fn check_text(field: String, s: &str, max: usize, v: &mut Violations) {
    if s.chars().count() > max || s.chars().any(char::is_control) {
        v.add(field, format!("must be at most {max} printable characters"));
    }
}

impl Manager {
    /// Handles a leak report: every token that is one of our keys is
    /// flagged (and revoked when its tenant's policy revokes leaked keys)
    /// and labelled `true_positive`; any other is `false_positive`. A
    /// token that is not one of our keys costs no query unless its digest
    /// is known or the unknown-key lookup budget allows one, as on the
    /// decision path. `reporter` names the scanner (`github`, …).
    pub async fn report_leaked_as(
        &self,
        ctx: &AuditContext,
        reporter: &str,
        tokens: Vec<LeakedToken>,
    ) -> Result<Vec<LeakVerdict>> {
        let mut v = Violations::default();
        if tokens.is_empty() || tokens.len() > MAX_LEAK_TOKENS {
            v.add("tokens", format!("must hold 1..={MAX_LEAK_TOKENS} tokens"));
        }
        for (i, t) in tokens.iter().enumerate() {
            if t.token.is_empty() {
                v.add(format!("tokens[{i}].token"), "must not be empty");
            }
            check_text(format!("tokens[{i}].type"), &t.token_type, 128, &mut v);
            check_text(format!("tokens[{i}].url"), &t.url, 2048, &mut v);
            check_text(format!("tokens[{i}].source"), &t.source, 128, &mut v);
        }
        v.into_result()?;
        let mut verdicts = Vec::with_capacity(tokens.len());
        for t in tokens {
            let token_hash = hex::encode(Sha256::digest(t.token.as_bytes()));
            let label = match self.find_leaked(&t.token).await? {
                None => LeakLabel::FalsePositive,
                Some(id) => {
                    let source = LeakSource {
                        reporter: reporter.to_string(),
                        url: t.url.clone(),
                        source: t.source.clone(),
                    };
                    self.act_on_leak(ctx, id, &source).await?;
                    LeakLabel::TruePositive
                }
            };
            metrics::counter!(crate::telemetry::LEAK_REPORTS,
                "reporter" => if reporter == "github" { "github" } else { "grpc" },
                "label" => label.as_str())
            .increment(1);
            verdicts.push(LeakVerdict {
                token_hash,
                token_type: t.token_type,
                label,
            });
        }
        Ok(verdicts)
    }

    /// The id of the key `token` is, if it is one of ours. Malformed tokens
    /// (prefix, length, alphabet, checksum) cost nothing.
    async fn find_leaked(&self, token: &str) -> Result<Option<KeyId>> {
        if token.len() > MAX_TOKEN_LEN || self.profile.key_format.parse(token).is_err() {
            return Ok(None);
        }
        for pepper in self.peppers.all() {
            let digest = pepper.digest(token);
            if let Some(c) = &self.caches {
                if let Some(hit) = c.key(&digest) {
                    return Ok(Some(hit.id));
                }
                if c.is_unknown(&digest) || !c.worth_looking_up(&digest, self.clock.monotonic_ns())
                {
                    continue;
                }
            }
            if let Some(record) = self.store.find_key_by_digest(&digest).await? {
                if record.digest.ct_eq(&digest) {
                    return Ok(Some(record.id));
                }
            }
        }
        Ok(None)
    }

    /// Flags key `id` as leaked, revoking it when its tenant's policy says.
    async fn act_on_leak(&self, ctx: &AuditContext, id: KeyId, source: &LeakSource) -> Result<()> {
        let key = self
            .store
            .get_key(crate::store::KeyRef { id, tenant: None })
            .await?
            .ok_or(Error::NotFound("key"))?;
        let revoke = self
            .revocation_policy(&key.tenant_id)
            .await?
            .effective
            .revoke_leaked;
        let outcome = self
            .store
            .report_leak(id, revoke, source, self.clock.now(), ctx)
            .await?;
        tracing::warn!(tenant_id = %outcome.key.tenant_id, key_id = %outcome.key.id,
            reporter = %source.reporter, revoked = outcome.revoked,
            first_report = outcome.first_report, "key reported leaked");
        if let Some(sink) = &self.revocation_events {
            sink.publish(RevocationEvent {
                id: uuid::Uuid::now_v7(),
                kind: "key.leak_reported",
                tenant_id: outcome.key.tenant_id.clone(),
                key_id: outcome.key.id,
                policy: None,
                revoked: Some(outcome.revoked),
                at: self.clock.now(),
            });
        }
        if outcome.revoked {
            self.announce_policy_revocation(&PolicyMatch {
                key: outcome.key,
                reason: PolicyReason::ReportedLeaked,
            });
        }
        Ok(())
    }
}
