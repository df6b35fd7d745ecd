//! JWKS: parsing a key set, and keeping an issuer's keys fresh from a URL or
//! a file in the background (never on the request path). A refresh runs on
//! an interval and, rate-limited, when a token names an unknown `kid`; a
//! failed refresh keeps the last good key set.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::jwt::{Algorithm, Issuer, KeyError, KeySet, VerifyingKey};

/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Parses a JWKS document into the keys usable for signatures under
/// `allowed` algorithms (empty = any asymmetric one). Unusable keys (for
/// encryption, symmetric, unknown curves) are skipped; a malformed key or a
/// set with no usable key is an error.
pub fn parse_jwks(text: &[u8], allowed: &[Algorithm]) -> Result<KeySet, KeyError> {
    if text.len() > MAX_JWKS_BYTES {
        return Err(KeyError("JWKS document is larger than 1 MiB".into()));
    }
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|e| KeyError(format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if let Some(key) = VerifyingKey::from_jwk(jwk, allowed)? {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(KeyError("JWKS holds no usable signature key".into()));
    }
    Ok(KeySet::new(keys))
}

/// Where a JWKS comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(reqwest::Url),
    File(PathBuf),
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::Url(url) => f.debug_tuple("Url").field(&origin(url)).finish(),
            JwksSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// A URL as logs may show it: scheme, host and port only (paths and
/// queries can carry tokens).
fn origin(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
        (Some(host), None) => format!("{}://{host}", url.scheme()),
        _ => format!("{}://?", url.scheme()),
    }
}

/// `url` as logs may show it (see [`origin`]); unparseable: `<url>`.
pub fn redact_url(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| origin(&u))
        .unwrap_or_else(|_| "<url>".into())
}

/// How often a refresher looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Regular refresh interval.
    pub every: Duration,
    /// Least time between two fetches (an unknown `kid` cannot trigger
    /// fetches faster than this).
    pub min_gap: Duration,
    /// Timeout of one fetch.
    pub timeout: Duration,
}

/// Counters of one refresher, for tests and metrics.
#[derive(Debug)]
pub struct RefreshStats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Bumped after every refresh, so a caller can wait for one.
    done: tokio::sync::watch::Sender<u64>,
}

impl Default for RefreshStats {
    fn default() -> Self {
        Self {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            done: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl RefreshStats {
    /// Resolves once `reached` holds, checked now and after each refresh
    /// (a signal for tests and tools, instead of polling).
    pub async fn wait_until(&self, mut reached: impl FnMut(&Self) -> bool) {
        let mut done = self.done.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = done.wait_for(|_| reached(self)).await;
    }

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::AcqRel);
        self.done.send_modify(|n| *n += 1);
    }

    /// Successful refreshes so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }

    /// Failed refreshes so far (the last good keys were kept).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }
}

/// Keeps one issuer's key set fresh from `source`.
#[derive(Debug)]
pub struct Refresher {
    issuer: Arc<Issuer>,
    source: JwksSource,
    allowed: Vec<Algorithm>,
    policy: RefreshPolicy,
    stats: Arc<RefreshStats>,
}

impl Refresher {
    /// A refresher for `issuer`; nothing runs until [`Self::spawn`].
    pub fn new(
        issuer: Arc<Issuer>,
        source: JwksSource,
        allowed: Vec<Algorithm>,
        policy: RefreshPolicy,
    ) -> Self {
        Self {
            issuer,
            source,
            allowed,
            policy,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<RefreshStats> {
        self.stats.clone()
    }

    /// The issuer it refreshes.
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// Fetches and parses the key set once.
    pub async fn fetch(&self, client: &reqwest::Client) -> Result<KeySet, KeyError> {
        let bytes = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| KeyError(format!("{}: {e}", path.display())))?,
            JwksSource::Url(url) => fetch_url(client, url, self.policy.timeout).await?,
        };
        parse_jwks(&bytes, &self.allowed)
    }

    /// Refreshes once now, keeping the last good keys on failure.
    pub async fn refresh(&self, client: &reqwest::Client) -> bool {
        match self.fetch(client).await {
            Ok(keys) => {
                tracing::debug!(issuer = %self.issuer.rules().issuer, keys = keys.len(),
                    "JWKS refreshed");
                self.issuer.set_keys(keys);
                self.stats.count(&self.stats.ok);
                true
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer.rules().issuer, error = %e,
                    "JWKS refresh failed; keeping the last good keys");
                self.stats.count(&self.stats.failed);
                false
            }
        }
    }

    /// Runs in the background: refreshes now, then every `every`, and on an
    /// unknown `kid` no sooner than `min_gap` after the previous fetch.
    pub fn spawn(self, client: reqwest::Client) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                self.refresh(&client).await;
                let fetched = Instant::now();
                tokio::select! {
                    () = tokio::time::sleep(self.policy.every) => {}
                    () = self.issuer.unknown_kid_seen() => {
                        tokio::time::sleep_until(fetched + self.policy.min_gap).await;
                    }
                }
            }
        })
    }
}

/// An HTTP client for JWKS URLs: rustls, bounded timeouts, at most three
/// redirects and only within the URL's origin (a redirect elsewhere is not
/// followed, so the fetch fails and the last good keys stay).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    let same_origin = reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(reqwest::Url::origin);
        if attempt.previous().len() > 3 {
            attempt.error("more than 3 redirects")
        } else if first.is_some_and(|o| o == attempt.url().origin()) {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(same_origin)
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with static settings builds")
}

async fn fetch_url(
    client: &reqwest::Client,
    full: &reqwest::Url,
    timeout: Duration,
) -> Result<Vec<u8>, KeyError> {
    // Errors and logs name the origin only, never the path or query.
    let url = &origin(full);
    let fetch = async {
        let mut response = client
            .get(full.clone())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| KeyError(format!("GET {url}: {}", e.without_url())))?;
        if !response.status().is_success() {
            return Err(KeyError(format!("GET {url}: HTTP {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| KeyError(format!("GET {url}: {}", e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(KeyError(format!("GET {url}: larger than 1 MiB")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| KeyError(format!("GET {url}: timed out")))?
}
