//! Revocation events: every key revoked by a policy and every leak report
//! of one of our keys is POSTed, signed, to `[revocation_events]
//! webhook_url` (`crate::webhook`, the sender the console's delivery uses:
//! `x-tollgate-signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
//! `x-tollgate-delivery` the event id, the same on retries). Sent off the
//! caller's path with a bounded timeout and a few retries; failures are
//! counted ([`REVOCATION_EVENTS`]) and logged without the URL. The body
//! never holds a secret: ids, the rule, the time.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::domain::{KeyId, TenantId};
use crate::webhook::SignedWebhook;

/// Events handed to the webhook, by `type` and `outcome` (`delivered`,
/// `failed`, `dropped`: too many in flight).
pub const REVOCATION_EVENTS: &str = "tollgate_revocation_events_total";

const MAX_IN_FLIGHT: usize = 1024;
const MIN_SECRET_BYTES: usize = 32;

/// `[revocation_events]`: where revocation events go (none: only the
/// audit log, the change feed, the metric and the log line).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// http(s) endpoint receiving signed JSON events.
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key of the signature (≥ 32 bytes); or `webhook_secret_file`.
    #[serde(skip_serializing)]
    pub webhook_secret: Option<SecretString>,
    pub webhook_secret_file: Option<PathBuf>,
    /// Bound on each attempt, 1..=30 seconds (0: 5).
    pub timeout_seconds: u64,
}

impl std::fmt::Debug for EventSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = self
            .webhook_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(str::to_string));
        f.debug_struct("EventSettings")
            .field("webhook_host", &host)
            .field("webhook_secret_file", &self.webhook_secret_file)
            .field("timeout_seconds", &self.timeout_seconds)
            .finish_non_exhaustive()
    }
}

impl EventSettings {
    /// The webhook, with its secret read; `None` without a URL. The error
    /// names the field at fault.
    pub fn load(&self) -> Result<Option<EventWebhook>, (&'static str, String)> {
        let Some(url) = &self.webhook_url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or((
                "revocation_events.webhook_url",
                "must be an http(s) URL".to_string(),
            ))?;
        let secret = match (&self.webhook_secret, &self.webhook_secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| SecretString::from(s.trim_end().to_string()))
                .map_err(|e| {
                    (
                        "revocation_events.webhook_secret_file",
                        format!("{}: {}", path.display(), e.kind()),
                    )
                })?,
            _ => {
                return Err((
                    "revocation_events.webhook_secret",
                    "give webhook_secret or webhook_secret_file with webhook_url".into(),
                ))
            }
        };
        if secret.expose_secret().len() < MIN_SECRET_BYTES {
            return Err((
                "revocation_events.webhook_secret",
                format!("must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }
        let timeout = match self.timeout_seconds {
            0 => Duration::from_secs(5),
            s @ 1..=30 => Duration::from_secs(s),
            _ => return Err(("revocation_events.timeout_seconds", "must be 1..=30".into())),
        };
        EventWebhook::new(url, secret, timeout)
            .map(Some)
            .map_err(|e| ("revocation_events.webhook_url", e))
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevocationEvent {
    /// Also the delivery id.
    pub id: uuid::Uuid,
    /// `key.revoked` or `key.leak_reported`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub tenant_id: TenantId,
    pub key_id: KeyId,
    /// The rule (`unused`, `max_age`, `reported_leaked`), for `key.revoked`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'static str>,
    /// Whether the report revoked the key, for `key.leak_reported`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
    pub at: DateTime<Utc>,
}

/// Where events go.
pub trait RevocationEvents: Send + Sync + 'static {
    /// Queues `event`; never blocks.
    fn publish(&self, event: RevocationEvent);
}

/// The signed webhook (`crate::webhook`); `Debug` shows only its host.
#[derive(Debug)]
pub struct EventWebhook {
    hook: SignedWebhook,
}

impl EventWebhook {
    /// A webhook to `url` signed with `secret`; redirects are not followed.
    pub fn new(url: reqwest::Url, secret: SecretString, timeout: Duration) -> Result<Self, String> {
        SignedWebhook::new(url, secret, timeout, MAX_IN_FLIGHT).map(|hook| Self { hook })
    }
}

fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!(REVOCATION_EVENTS, "type" => kind, "outcome" => outcome).increment(1);
}

impl RevocationEvents for EventWebhook {
    fn publish(&self, event: RevocationEvent) {
        let kind = event.kind;
        let Ok(slot) = self.hook.reserve() else {
            tracing::warn!(kind, "revocation event dropped: too many in flight");
            count(kind, "dropped");
            return;
        };
        let id = event.id.to_string();
        let body = serde_json::to_vec(&event).expect("a plain struct serialises");
        let done_id = id.clone();
        // Retries are not logged; only giving up is.
        slot.send(
            id,
            body,
            |_| {},
            move |outcome| match outcome {
                Ok(()) => count(kind, "delivered"),
                Err(error) => {
                    tracing::warn!(kind, event_id = %done_id, %error,
                    "revocation event not delivered; giving up");
                    count(kind, "failed");
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, secret: &str) -> EventSettings {
        EventSettings {
            webhook_url: Some(url.into()),
            webhook_secret: Some(secret.to_string().into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_bad_webhook_is_refused_by_field_and_the_secret_stays_out_of_debug() {
        let secret = "s3cret-s3cret-s3cret-s3cret-s3cret-!";
        assert!(EventSettings::default().load().unwrap().is_none(), "off");
        assert!(settings("https://hooks.example/tollgate", secret)
            .load()
            .unwrap()
            .is_some());
        let field = |s: EventSettings| s.load().err().map(|(field, _)| field);
        assert_eq!(
            field(settings("ftp://hooks.example/", secret)),
            Some("revocation_events.webhook_url")
        );
        assert_eq!(
            field(settings("https://hooks.example/", "short")),
            Some("revocation_events.webhook_secret")
        );
        let mut no_secret = settings("https://hooks.example/", secret);
        no_secret.webhook_secret = None;
        assert_eq!(field(no_secret), Some("revocation_events.webhook_secret"));
        let mut slow = settings("https://hooks.example/", secret);
        slow.timeout_seconds = 31;
        assert_eq!(field(slow), Some("revocation_events.timeout_seconds"));
        let debug = format!("{:?}", settings("https://hooks.example/x?k=v", secret));
        assert!(!debug.contains(secret) && !debug.contains("k=v"), "{debug}");
        let hook = settings("https://hooks.example/x?k=v", secret)
            .load()
            .unwrap()
            .unwrap();
        let debug = format!("{hook:?}");
        assert!(debug.contains("hooks.example"), "{debug}");
        assert!(!debug.contains(secret) && !debug.contains("k=v"), "{debug}");
    }
}
