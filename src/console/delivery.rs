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

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::crypto::opaque::OpaqueToken;
use crate::domain::console::Email;
use crate::domain::TenantId;

/// Console messages handed to the delivery, by `type` and `outcome`
/// (`delivered`, `failed`, `dropped`: the outbound queue was full, or no
/// delivery is configured).
pub const DELIVERIES: &str = "tollgate_console_deliveries_total";

/// The signature header of webhook calls.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";
/// The delivery id header (the same on retries).
pub const DELIVERY_ID_HEADER: &str = "x-tollgate-delivery";

/// Attempts per message, and the pause before each retry.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(5)];
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

/// The signed webhook.
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: SecretString,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("host", &self.url.host_str())
            .finish_non_exhaustive()
    }
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let v1 = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(v1))
}

/// Whether `header` is a valid signature of `body` with `secret` (for
/// receivers written in Rust, and the tests). Constant-time comparison.
pub fn verify_signature(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    match (t, v1) {
        (Some(t), Some(v1)) => mac(secret, t, body).verify_slice(&v1).is_ok(),
        _ => false,
    }
}

impl Webhook {
    /// A webhook to `url` signed with `secret`, each attempt bounded by
    /// `timeout`. Redirects are not followed (a token goes where it was
    /// configured to go, nowhere else).
    pub fn new(url: reqwest::Url, secret: SecretString, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.without_url().to_string())?;
        Ok(Self {
            client,
            url,
            secret,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    async fn attempt(
        client: &reqwest::Client,
        url: &reqwest::Url,
        secret: &SecretString,
        id: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let sig = signature(
            secret.expose_secret().as_bytes(),
            Utc::now().timestamp(),
            body,
        );
        let response = client
            .post(url.clone())
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, sig)
            .header(DELIVERY_ID_HEADER, id)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {}", response.status()))
        }
    }
}

impl Deliver for Webhook {
    fn send(&self, message: Message) {
        let kind = message.kind;
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(
                kind = kind.as_str(),
                "console delivery queue is full; message dropped"
            );
            count(kind, "dropped");
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            count(kind, "dropped");
            return;
        };
        let (id, body) = message.body();
        let (client, url, secret) = (self.client.clone(), self.url.clone(), self.secret.clone());
        runtime.spawn(async move {
            let _permit = permit;
            let mut pauses = RETRY_PAUSES.iter();
            loop {
                match Self::attempt(&client, &url, &secret, &id, &body).await {
                    Ok(()) => {
                        count(kind, "delivered");
                        return;
                    }
                    Err(error) => match pauses.next() {
                        Some(pause) => {
                            tracing::info!(kind = kind.as_str(), delivery_id = %id, %error,
                                "console delivery failed; retrying");
                            tokio::time::sleep(*pause).await;
                        }
                        None => {
                            tracing::warn!(kind = kind.as_str(), delivery_id = %id, %error,
                                "console delivery failed; giving up");
                            count(kind, "failed");
                            return;
                        }
                    },
                }
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
    fn signatures_verify_only_with_the_secret_and_the_exact_body() {
        let sig = signature(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("t=1700000000,v1="), "{sig}");
        assert!(verify_signature(b"s3cret", &sig, b"{\"a\":1}"));
        assert!(!verify_signature(b"other", &sig, b"{\"a\":1}"));
        assert!(!verify_signature(b"s3cret", &sig, b"{\"a\":2}"));
        assert!(!verify_signature(b"s3cret", "t=1,v1=zz", b"{}"));
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
