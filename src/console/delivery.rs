//! Out-of-band delivery of the console's mail: email-verification and
//! password-reset tokens (and "you already have an account" notices) go to
//! the account's owner, never back to the caller who asked.
//!
//! The real delivery is a signed webhook (`[jwt.console.delivery]`): a JSON
//! body POSTed to `webhook_url` with
//! `x-tollgate-signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` where the
//! MAC is keyed with `webhook_secret` over `"<t>.<body>"` (the exact bytes
//! received). Receivers recompute it, compare in constant time, and refuse
//! a `t` older than a few minutes; `x-tollgate-delivery` (also the body's
//! `id`) is the same on every retry, for de-duplication. Sending happens
//! off the request path, with a bounded timeout and a few retries; failures
//! are counted in [`DELIVERIES`], never logged with the token or the URL.
//!
//! Without a webhook nothing is sent (and nothing is returned): resets and
//! verification need one. `tollgate dev` prints messages to stdout instead.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::Serialize;

use crate::crypto::opaque::OpaqueToken;
use crate::domain::console::Email;
use crate::domain::TenantId;
/// The signature scheme and headers, from [`crate::webhook`] (kept here for
/// receivers and tests that import them from the console).
pub use crate::webhook::{signature, verify_signature, DELIVERY_ID_HEADER, SIGNATURE_HEADER};
use crate::webhook::{Refused, SignedWebhook};

/// Console messages handed to the delivery, by `type` and `outcome`
/// (`delivered`, `failed`, `dropped`: the outbound queue was full, or no
/// delivery is configured).
pub const DELIVERIES: &str = "tollgate_console_deliveries_total";

/// Messages being sent at once, at most; more are dropped (and counted).
const MAX_IN_FLIGHT: usize = 256;

/// What a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// A token for VerifyEmail.
    EmailVerification,
    /// A token for ResetPassword.
    PasswordReset,
    /// Someone tried to create an account with an address that has one
    /// (no token: tell the owner, who may reset their password).
    AccountExists,
}

impl MessageKind {
    /// The `type` of the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmailVerification => "email_verification",
            Self::PasswordReset => "password_reset",
            Self::AccountExists => "account_exists",
        }
    }
}

/// A message for an account's owner. The token never shows in `Debug`.
pub struct Message {
    pub kind: MessageKind,
    pub email: Email,
    pub token: Option<OpaqueToken>,
    pub expires_at: Option<DateTime<Utc>>,
    pub tenant_id: TenantId,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("kind", &self.kind)
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Body<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: MessageKind,
    email: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    tenant_id: &'a str,
}

impl Message {
    /// The JSON body, with its delivery id.
    fn body(self) -> (String, Vec<u8>) {
        let id = uuid::Uuid::now_v7().to_string();
        let token = self.token.map(OpaqueToken::into_exposed);
        let body = Body {
            id: id.clone(),
            kind: self.kind,
            email: self.email.as_str(),
            token: token.as_deref(),
            expires_at: self
                .expires_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            tenant_id: self.tenant_id.as_str(),
        };
        let bytes = serde_json::to_vec(&body).expect("a plain struct serialises");
        (id, bytes)
    }
}

/// Hands messages to their recipients. `send` never blocks the request.
pub trait Deliver: Send + Sync + 'static {
    /// Queues `message` for delivery.
    fn send(&self, message: Message);
    /// Whether messages reach anyone (else resets and verification are off).
    fn delivers(&self) -> bool {
        true
    }
}

/// No delivery configured: nothing is sent, and nothing returned.
#[derive(Debug, Default)]
pub struct Nowhere;

impl Deliver for Nowhere {
    fn send(&self, message: Message) {
        count(message.kind, "dropped");
    }
    fn delivers(&self) -> bool {
        false
    }
}

/// DEVELOPMENT ONLY (`tollgate dev`): prints each message to stdout, like
/// Django's console email backend.
#[derive(Debug, Default)]
pub struct Stdout;

impl Deliver for Stdout {
    fn send(&self, message: Message) {
        let kind = message.kind;
        let (_, body) = message.body();
        println!(
            "[tollgate dev] console message (development delivery, printed instead of sent): {}",
            String::from_utf8_lossy(&body)
        );
        count(kind, "delivered");
    }
}

/// The signed webhook (`crate::webhook`); `Debug` shows only its host.
#[derive(Debug)]
pub struct Webhook {
    hook: SignedWebhook,
}

impl Webhook {
    /// A webhook to `url` signed with `secret`, each attempt bounded by
    /// `timeout`. Redirects are not followed (a token goes where it was
    /// configured to go, nowhere else).
    pub fn new(url: reqwest::Url, secret: SecretString, timeout: Duration) -> Result<Self, String> {
        SignedWebhook::new(url, secret, timeout, MAX_IN_FLIGHT).map(|hook| Self { hook })
    }
}

impl Deliver for Webhook {
    fn send(&self, message: Message) {
        let kind = message.kind;
        let slot = match self.hook.reserve() {
            Ok(slot) => slot,
            Err(Refused::Full) => {
                tracing::warn!(
                    kind = kind.as_str(),
                    "console delivery queue is full; message dropped"
                );
                count(kind, "dropped");
                return;
            }
            Err(Refused::NoRuntime) => {
                count(kind, "dropped");
                return;
            }
        };
        let (id, body) = message.body();
        let retry_id = id.clone();
        let on_retry = move |error: &str| {
            tracing::info!(kind = kind.as_str(), delivery_id = %retry_id, %error,
                "console delivery failed; retrying");
        };
        let done_id = id.clone();
        slot.send(id, body, on_retry, move |outcome| match outcome {
            Ok(()) => count(kind, "delivered"),
            Err(error) => {
                tracing::warn!(kind = kind.as_str(), delivery_id = %done_id, %error,
                    "console delivery failed; giving up");
                count(kind, "failed");
            }
        });
    }
}

fn count(kind: MessageKind, outcome: &'static str) {
    metrics::counter!(DELIVERIES, "type" => kind.as_str(), "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reexported_scheme_verifies_and_secrets_stay_out_of_debug() {
        // The scheme itself is tested in `crate::webhook`.
        let sig = signature(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(verify_signature(b"s3cret", &sig, b"{\"a\":1}"), "{sig}");
        let m = Message {
            kind: MessageKind::PasswordReset,
            email: Email::parse("ada@example.com").unwrap(),
            token: Some(OpaqueToken::generate(
                crate::domain::console::TokenKind::PasswordReset,
            )),
            expires_at: None,
            tenant_id: TenantId::parse("acme").unwrap(),
        };
        assert!(!format!("{m:?}").contains("tgpr_"));
        let url = "https://hooks.example/x?k=v".parse().unwrap();
        let hook = Webhook::new(url, "s3cret".to_string().into(), Duration::from_secs(5));
        let debug = format!("{:?}", hook.unwrap());
        assert!(
            !debug.contains("s3cret") && !debug.contains("k=v"),
            "{debug}"
        );
    }

    #[test]
    fn messages_nobody_receives_are_counted_as_dropped() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            assert!(!Nowhere.delivers());
            Nowhere.send(Message {
                kind: MessageKind::PasswordReset,
                email: Email::parse("ada@example.com").unwrap(),
                token: Some(OpaqueToken::generate(
                    crate::domain::console::TokenKind::PasswordReset,
                )),
                expires_at: None,
                tenant_id: TenantId::parse("acme").unwrap(),
            });
        });
        let text = handle.render();
        assert!(
            text.contains(
                "tollgate_console_deliveries_total{type=\"password_reset\",outcome=\"dropped\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("tgpr_"), "no token in a metric");
    }
}
