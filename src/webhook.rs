//! The signed-webhook sender shared by the console's delivery
//! (`console::delivery`) and revocation events (`manage::revocation_events`).
//!
//! A JSON body is POSTed to the configured URL with
//! `x-tollgate-signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`, the MAC
//! keyed with the secret over `"<t>.<body>"` (the exact bytes sent), and
//! `x-tollgate-delivery: <id>`, the same on every retry. Each attempt is
//! bounded by the timeout, redirects are not followed, and a failed attempt
//! is retried after each of [`RETRY_PAUSES`]. At most `max_in_flight`
//! deliveries run at once. Callers own their bodies, metrics and log lines;
//! errors handed back never hold the URL or the secret.
//!
//! A leaf: imports nothing from the crate (and nothing of tonic).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The signature header of webhook calls.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";
/// The delivery id header (the same on retries).
pub const DELIVERY_ID_HEADER: &str = "x-tollgate-delivery";

/// The pause before each retry (so one attempt more than pauses).
pub const RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(5)];

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

/// A signed webhook: its client, URL, secret and in-flight bound. The
/// secret (and the URL's path and query) never show in `Debug`.
#[derive(Clone)]
pub struct SignedWebhook {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: SecretString,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for SignedWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedWebhook")
            .field("host", &self.host())
            .finish_non_exhaustive()
    }
}

/// Why a delivery was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_in_flight` deliveries are running.
    Full,
    /// No tokio runtime to send from.
    NoRuntime,
}

/// Room for one delivery: an in-flight permit and the runtime to send on.
pub struct Slot {
    hook: SignedWebhook,
    permit: OwnedSemaphorePermit,
    runtime: tokio::runtime::Handle,
}

impl SignedWebhook {
    /// A webhook to `url` signed with `secret`, each attempt bounded by
    /// `timeout`, at most `max_in_flight` deliveries at once. Redirects are
    /// not followed (a body goes where it was configured to go, nowhere
    /// else).
    pub fn new(
        url: reqwest::Url,
        secret: SecretString,
        timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, String> {
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
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        })
    }

    /// The receiver's host (what may be shown of the URL).
    pub fn host(&self) -> Option<&str> {
        self.url.host_str()
    }

    /// One signed POST of `body` as delivery `id`; an error names what
    /// failed (never the URL).
    pub async fn post_signed(&self, id: &str, body: &[u8]) -> Result<(), String> {
        let sig = signature(
            self.secret.expose_secret().as_bytes(),
            Utc::now().timestamp(),
            body,
        );
        let response = self
            .client
            .post(self.url.clone())
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

    /// [`post_signed`](Self::post_signed), retried after each of
    /// [`RETRY_PAUSES`] (freshly signed each time); `on_retry` hears each
    /// error followed by a retry. The last error when all attempts failed.
    pub async fn post_with_retries(
        &self,
        id: &str,
        body: &[u8],
        mut on_retry: impl FnMut(&str),
    ) -> Result<(), String> {
        let mut pauses = RETRY_PAUSES.iter();
        loop {
            match self.post_signed(id, body).await {
                Ok(()) => return Ok(()),
                Err(error) => match pauses.next() {
                    Some(pause) => {
                        on_retry(&error);
                        tokio::time::sleep(*pause).await;
                    }
                    None => return Err(error),
                },
            }
        }
    }

    /// Room for one more delivery: an in-flight permit (else
    /// [`Refused::Full`]) and the current runtime (else
    /// [`Refused::NoRuntime`]). Never blocks.
    pub fn reserve(&self) -> Result<Slot, Refused> {
        let permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Refused::NoRuntime)?;
        Ok(Slot {
            hook: self.clone(),
            permit,
            runtime,
        })
    }
}

impl Slot {
    /// Sends `body` as delivery `id` off the caller's path, with retries
    /// ([`SignedWebhook::post_with_retries`]); `on_done` hears the outcome.
    /// The slot's permit is held until then.
    pub fn send(
        self,
        id: String,
        body: Vec<u8>,
        on_retry: impl FnMut(&str) + Send + 'static,
        on_done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        let Self {
            hook,
            permit,
            runtime,
        } = self;
        runtime.spawn(async move {
            let _permit = permit;
            on_done(hook.post_with_retries(&id, &body, on_retry).await);
        });
    }
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
    }

    #[test]
    fn the_secret_and_the_urls_path_stay_out_of_debug() {
        let secret = "s3cret-s3cret-s3cret-s3cret-s3cret-!";
        let hook = SignedWebhook::new(
            "https://hooks.example/path?k=v".parse().unwrap(),
            secret.to_string().into(),
            Duration::from_secs(5),
            1,
        )
        .unwrap();
        let debug = format!("{hook:?}");
        assert!(debug.contains("hooks.example"), "{debug}");
        assert!(
            !debug.contains(secret) && !debug.contains("k=v") && !debug.contains("path"),
            "{debug}"
        );
    }

    #[test]
    fn deliveries_past_the_bound_or_without_a_runtime_are_refused() {
        let hook = SignedWebhook::new(
            "https://hooks.example/".parse().unwrap(),
            "s3cret".to_string().into(),
            Duration::from_secs(5),
            1,
        )
        .unwrap();
        assert_eq!(hook.reserve().err(), Some(Refused::NoRuntime));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let slot = hook.reserve().expect("room for one");
        assert_eq!(hook.reserve().err(), Some(Refused::Full));
        drop(slot);
        assert!(hook.reserve().is_ok(), "the permit comes back");
    }
}
