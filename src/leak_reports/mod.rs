//! The leak report endpoint (`[leak_reports]`): an HTTP/1.1 listener of its
//! own, off by default, that speaks GitHub's secret-scanning partner
//! protocol. GitHub POSTs a JSON array of `{token, type, url, source}`
//! signed with ECDSA P-256 / SHA-256 over the raw body
//! (`Github-Public-Key-Identifier`, `Github-Public-Key-Signature`: base64
//! DER), the public keys coming from a file or GitHub's
//! `meta/public_keys/secret_scanning` URL, refreshed. The answer is a JSON
//! array of `{token_hash, token_type, label}` (`true_positive` for our
//! keys, else `false_positive`). What happens to a reported key is the
//! tenant's revocation policy (`manage::revocation`).
//!
//! Refusals change nothing: no or an unknown key identifier is 401, a
//! signature that does not verify 403 (both before the body is read as
//! JSON), a body that is not such an array 400, a body over
//! `max_body_bytes` 413. Tokens are never logged.

pub mod keys;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use server::{serve, LeakEndpoint};

/// GitHub's public keys for secret scanning.
pub const GITHUB_KEYS_URL: &str = "https://api.github.com/meta/public_keys/secret_scanning";

/// `[leak_reports]` in the config file, `TOLLGATE_LEAK_REPORTS__*` in the
/// environment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeakReportSettings {
    /// Where the endpoint listens; unset: off.
    pub listen: Option<SocketAddr>,
    /// A public keys document on disk (tests, air-gapped installs); when
    /// set, `public_keys_url` is not used.
    pub public_keys_file: Option<PathBuf>,
    /// Where the public keys are fetched from.
    pub public_keys_url: String,
    /// How often the keys are read again (an unknown key identifier also
    /// triggers a read, at most once a minute).
    pub refresh_seconds: u64,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

impl Default for LeakReportSettings {
    fn default() -> Self {
        Self {
            listen: None,
            public_keys_file: None,
            public_keys_url: GITHUB_KEYS_URL.into(),
            refresh_seconds: 3600,
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl LeakReportSettings {
    /// Checks the fields; the error names the field at fault.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_none() {
            return Ok(());
        }
        if self.public_keys_file.is_none() {
            match reqwest::Url::parse(&self.public_keys_url) {
                Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
                _ => {
                    return Err((
                        "leak_reports.public_keys_url",
                        "must be an http(s) URL".into(),
                    ))
                }
            }
        }
        if self.refresh_seconds == 0 {
            return Err(("leak_reports.refresh_seconds", "must be ≥ 1".into()));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err((
                "leak_reports.max_body_bytes",
                "must be 1024..=16777216".into(),
            ));
        }
        Ok(())
    }

    fn refresh(&self) -> Duration {
        Duration::from_secs(self.refresh_seconds.max(1))
    }
}
