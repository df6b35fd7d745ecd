//! The decision path's metric handles, registered once (when the
//! `Authenticator` is built, after the recorder is installed) instead of
//! looked up by name and labels on every call: a lookup hashes the labels
//! and searches the registry, an increment through a handle is one atomic
//! add. Rare series (denials by reason, misses) are still looked up when
//! they happen. Names and labels are exactly those of `crate::telemetry`.

use metrics::{Counter, Histogram};

use crate::domain::{CredentialType, Decision};
use crate::telemetry;

pub(crate) struct DecisionMetrics {
    seconds: Histogram,
    allow_api_key: Counter,
    allow_jwt: Counter,
    key_hit: Counter,
    tenant_hit: Counter,
    quota_allow: Counter,
}

impl DecisionMetrics {
    /// Registers the hot series with the recorder installed now (none: the
    /// handles do nothing, as the macros would).
    pub(crate) fn new() -> Self {
        let allow = |credential: &'static str| {
            metrics::counter!(telemetry::DECISIONS, "outcome" => "allow", "reason" => "",
                "credential" => credential)
        };
        Self {
            seconds: metrics::histogram!(telemetry::DECISION_SECONDS),
            allow_api_key: allow("api_key"),
            allow_jwt: allow("jwt"),
            key_hit: lookup("key", "hit"),
            tenant_hit: lookup("tenant", "hit"),
            quota_allow: metrics::counter!(telemetry::QUOTA_CHECKS, "outcome" => "allow",
                "reason" => ""),
        }
    }

    /// One decision and the time it took.
    pub(crate) fn decision(&self, decision: &Decision, seconds: f64) {
        self.seconds.record(seconds);
        match decision {
            Decision::Allow(p) => match p.credential_type {
                CredentialType::ApiKey => self.allow_api_key.increment(1),
                CredentialType::Jwt => self.allow_jwt.increment(1),
            },
            Decision::Deny(r) => metrics::counter!(telemetry::DECISIONS, "outcome" => "deny",
                "reason" => r.as_str(), "credential" => "unknown")
            .increment(1),
        }
    }

    /// A decision that failed (an outage, a malformed request): timed only.
    pub(crate) fn failed(&self, seconds: f64) {
        self.seconds.record(seconds);
    }

    /// One CheckQuota answer.
    pub(crate) fn quota_check(&self, decision: &Decision) {
        match decision {
            Decision::Allow(_) => self.quota_allow.increment(1),
            Decision::Deny(r) => metrics::counter!(telemetry::QUOTA_CHECKS, "outcome" => "deny",
                "reason" => r.as_str())
            .increment(1),
        }
    }

    /// A cache lookup (`cache`: key, tenant, negative, known).
    pub(crate) fn lookup(&self, cache: &'static str, result: &'static str) {
        match (cache, result) {
            ("key", "hit") => self.key_hit.increment(1),
            ("tenant", "hit") => self.tenant_hit.increment(1),
            _ => lookup(cache, result).increment(1),
        }
    }
}

fn lookup(cache: &'static str, result: &'static str) -> Counter {
    metrics::counter!(telemetry::CACHE_LOOKUPS, "cache" => cache, "result" => result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Reason;

    /// The handles write the very series the per-call macros wrote.
    #[test]
    fn handles_count_under_the_documented_names_and_labels() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = DecisionMetrics::new();
            m.lookup("key", "hit");
            m.lookup("key", "miss");
            m.decision(&Decision::Deny(Reason::KeyUnknown), 0.001);
            m.quota_check(&Decision::Deny(Reason::KeyRevoked));
        });
        let text = handle.render();
        for line in [
            r#"tollgate_cache_lookups_total{cache="key",result="hit"} 1"#,
            r#"tollgate_cache_lookups_total{cache="key",result="miss"} 1"#,
            r#"tollgate_decisions_total{outcome="deny",reason="KEY_UNKNOWN",credential="unknown"} 1"#,
            r#"tollgate_quota_checks_total{outcome="deny",reason="KEY_REVOKED"} 1"#,
            "tollgate_decision_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
