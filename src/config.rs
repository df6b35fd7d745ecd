//! Configuration: the one place settings are parsed. Layers, later wins:
//! built-in defaults → TOML file (`--config`) → `TOLLGATE_*` environment
//! (nested with `__`, e.g. `TOLLGATE_CACHE__TTL_SECONDS`) and `DATABASE_URL`
//! → command-line flags. Validated once; errors name the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::app::ReplicaSettings;
use crate::cache::CacheSettings;
use crate::crypto::{Pepper, Peppers};
use crate::dashboard::JwtSettings;
use crate::forward_auth::ForwardAuthSettings;
use crate::grpc::envoy::EnvoySettings;
use crate::limits::shares::ShareSettings;
use crate::profile::Profile;
/// Log output: owned by telemetry, re-exported here as part of `Settings`.
pub use crate::telemetry::LogFormat;

/// A pepper kept from before a rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousPepper {
    pub version: i32,
    #[serde(serialize_with = "ser_secret")]
    pub secret: SecretString,
}

fn ser_secret<S: serde::Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

fn ser_opt_secret<S: serde::Serializer>(
    s: &Option<SecretString>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(s.expose_secret()),
        None => ser.serialize_none(),
    }
}

/// Database connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    pub min_connections: u32,
    /// Longest wait for a pooled connection (then UNAVAILABLE).
    pub acquire_timeout_ms: u64,
    /// `statement_timeout` set on every connection, and the longest any
    /// decision-path query may take as seen from here (a hung server
    /// included); then UNAVAILABLE. 0 = none.
    pub statement_timeout_ms: u64,
    /// How long the change history is kept, in seconds. A replica cut off
    /// for longer flushes its cache when it returns instead of catching up.
    pub change_retention_seconds: u64,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_connections: 1,
            acquire_timeout_ms: 2_000,
            statement_timeout_ms: 5_000,
            change_retention_seconds: 86_400,
            migrate_on_start: true,
        }
    }
}

/// Every setting, as layered. Secrets are `SecretString`: never in `Debug`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Profile file; absent = the embedded default profile.
    pub profile: Option<PathBuf>,
    #[serde(serialize_with = "ser_opt_secret")]
    pub operator_token: Option<SecretString>,
    pub operator_token_file: Option<PathBuf>,
    /// The gateway identity's bearer token (CheckQuota and GetUsage by id).
    #[serde(serialize_with = "ser_opt_secret")]
    pub gateway_token: Option<SecretString>,
    pub gateway_token_file: Option<PathBuf>,
    /// The console backend's bearer token (Login's `client_address`).
    #[serde(serialize_with = "ser_opt_secret")]
    pub console_backend_token: Option<SecretString>,
    pub console_backend_token_file: Option<PathBuf>,
    /// Management and console calls: slots and timeout (`[management]`).
    pub management: crate::grpc::budget::ManagementSettings,
    #[serde(serialize_with = "ser_opt_secret")]
    pub database_url: Option<SecretString>,
    pub database: DatabaseSettings,
    /// Current pepper (≥ 32 bytes) and its version.
    #[serde(serialize_with = "ser_opt_secret")]
    pub pepper: Option<SecretString>,
    pub pepper_file: Option<PathBuf>,
    pub pepper_version: i32,
    pub previous_peppers: Vec<PreviousPepper>,
    pub cache: CacheSettings,
    /// Dashboard surface: trusted JWT issuers and the console's own keys.
    pub jwt: JwtSettings,
    /// Largest accepted gRPC message, in bytes.
    pub max_message_bytes: usize,
    /// Connections the gRPC port holds at once, TLS handshakes included;
    /// one more is closed on arrival (`tollgate_grpc_connections_refused_total`).
    pub max_connections: usize,
    /// How often `last_used_at` is written, in seconds.
    pub last_used_flush_seconds: u64,
    pub log_format: LogFormat,
    /// `tracing` filter, e.g. `info` or `tollgate=debug,info`.
    pub log_level: String,
    /// Prometheus `/metrics` listen address; absent = no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds in-flight calls get to finish after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// TLS for the gRPC port; absent = plaintext.
    pub tls: Option<crate::tls::TlsSettings>,
    /// OTLP traces endpoint: `http://collector:4318/v1/traces` (OTLP/HTTP)
    /// or `http://collector:4317` (OTLP/gRPC); absent = no trace export.
    pub otlp_endpoint: Option<String>,
    /// `http` or `grpc`; absent = `grpc` when the endpoint's port is 4317,
    /// else `http`.
    pub otlp_protocol: Option<crate::telemetry::OtlpProtocol>,
    /// Envoy ext_authz adapter (`[envoy]`).
    pub envoy: EnvoySettings,
    /// Heartbeat interval and expiry (`[replicas]`).
    pub replicas: ReplicaSettings,
    /// Rate-limit shares exchanged between replicas (`[rate_shares]`).
    pub rate_shares: ShareSettings,
    /// HTTP forward-auth listener for NGINX and Traefik (`[forward_auth]`).
    pub forward_auth: ForwardAuthSettings,
    /// Automatic revocation sweeps (`[revocation]`).
    pub revocation: crate::manage::revocation::SweepSettings,
    /// The GitHub secret-scanning endpoint (`[leak_reports]`), off by default.
    pub leak_reports: crate::leak_reports::LeakReportSettings,
    /// Where revocation events are POSTed (`[revocation_events]`), if anywhere.
    pub revocation_events: crate::manage::revocation_events::EventSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            profile: None,
            operator_token: None,
            operator_token_file: None,
            gateway_token: None,
            gateway_token_file: None,
            console_backend_token: None,
            console_backend_token_file: None,
            management: Default::default(),
            database_url: None,
            database: DatabaseSettings::default(),
            pepper: None,
            pepper_file: None,
            pepper_version: 1,
            previous_peppers: Vec::new(),
            cache: CacheSettings::default(),
            jwt: JwtSettings::default(),
            max_message_bytes: 64 * 1024,
            max_connections: 4096,
            last_used_flush_seconds: 10,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            metrics_listen: None,
            shutdown_grace_seconds: 20,
            tls: None,
            otlp_endpoint: None,
            otlp_protocol: None,
            envoy: EnvoySettings::default(),
            replicas: ReplicaSettings::default(),
            rate_shares: ShareSettings::default(),
            forward_auth: ForwardAuthSettings::default(),
            revocation: Default::default(),
            leak_reports: Default::default(),
            revocation_events: Default::default(),
        }
    }
}

/// Top-level keys the `TOLLGATE_*` environment may set. Other `TOLLGATE_*`
/// variables are ignored rather than refused.
const ENV_KEYS: &[&str] = &[
    "listen",
    "profile",
    "operator_token",
    "operator_token_file",
    "gateway_token",
    "gateway_token_file",
    "console_backend_token",
    "console_backend_token_file",
    "management",
    "database_url",
    "database",
    "pepper",
    "pepper_file",
    "pepper_version",
    "cache",
    "jwt",
    "max_message_bytes",
    "max_connections",
    "last_used_flush_seconds",
    "log_format",
    "log_level",
    "metrics_listen",
    "shutdown_grace_seconds",
    "tls",
    "otlp_endpoint",
    "otlp_protocol",
    "envoy",
    "replicas",
    "rate_shares",
    "forward_auth",
    "revocation",
    "leak_reports",
    "revocation_events",
];

/// Settings given as command-line flags (highest precedence).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pepper_file: Option<PathBuf>,
}

/// A configuration that cannot be used; names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
    #[error("configuration field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Settings {
    /// Layers defaults, the file, the environment and the flags.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(invalid(
                    "--config",
                    format!("{} is not a readable file", file.display()),
                ));
            }
            fig = fig.merge(Toml::file_exact(file));
        }
        fig = fig
            .merge(Env::prefixed("TOLLGATE_").split("__").filter(|k| {
                // Keys keep their case here; figment lowers them later.
                let first = k.as_str().split('.').next().unwrap_or("");
                ENV_KEYS.iter().any(|e| first.eq_ignore_ascii_case(e))
            }))
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(Serialized::globals(flags));
        fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// The profile named by `profile`, or the embedded default.
    pub fn load_profile(&self) -> Result<Profile, ConfigError> {
        match &self.profile {
            None => Ok(Profile::embedded_default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid("profile", format!("{}: {e}", path.display())))?;
                Profile::from_toml(&text)
                    .map_err(|e| invalid("profile", format!("{}: {e}", path.display())))
            }
        }
    }

    /// The operator token from `operator_token` or `operator_token_file`.
    pub fn load_operator_token(&self) -> Result<Option<SecretString>, ConfigError> {
        load_token(
            "operator_token",
            &self.operator_token,
            &self.operator_token_file,
        )
    }

    /// The gateway token from `gateway_token` or `gateway_token_file`.
    pub fn load_gateway_token(&self) -> Result<Option<SecretString>, ConfigError> {
        load_token(
            "gateway_token",
            &self.gateway_token,
            &self.gateway_token_file,
        )
    }

    /// The console backend token from `console_backend_token` or
    /// `console_backend_token_file`.
    pub fn load_console_backend_token(&self) -> Result<Option<SecretString>, ConfigError> {
        load_token(
            "console_backend_token",
            &self.console_backend_token,
            &self.console_backend_token_file,
        )
    }

    /// The three caller tokens, which must all differ (one credential is
    /// one caller kind).
    pub fn load_caller_tokens(&self) -> Result<[Option<SecretString>; 3], ConfigError> {
        let tokens = [
            self.load_operator_token()?,
            self.load_gateway_token()?,
            self.load_console_backend_token()?,
        ];
        let set: Vec<&str> = tokens.iter().flatten().map(|t| t.expose_secret()).collect();
        if (1..set.len()).any(|i| set[..i].contains(&set[i])) {
            return Err(invalid(
                "gateway_token",
                "operator_token, gateway_token and console_backend_token must differ",
            ));
        }
        Ok(tokens)
    }

    /// The peppers from `pepper`/`pepper_file` and `previous_peppers`.
    pub fn load_peppers(&self) -> Result<Peppers, ConfigError> {
        let secret = match (&self.pepper, &self.pepper_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("pepper", "set pepper or pepper_file, not both"))
            }
            (Some(p), None) => p.clone(),
            (None, Some(path)) => read_secret_file("pepper_file", path)?,
            (None, None) => {
                return Err(invalid(
                    "pepper",
                    "is required (TOLLGATE_PEPPER or TOLLGATE_PEPPER_FILE, at least 32 bytes)",
                ))
            }
        };
        let current = Pepper::new(
            self.pepper_version,
            secret.expose_secret().as_bytes().to_vec(),
        )
        .map_err(|e| invalid("pepper", e.to_string()))?;
        let previous = self
            .previous_peppers
            .iter()
            .map(|p| Pepper::new(p.version, p.secret.expose_secret().as_bytes().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("previous_peppers", e.to_string()))?;
        Peppers::new(current, previous).map_err(|e| invalid("previous_peppers", e.to_string()))
    }

    /// The revocation events webhook (its secret read), if configured.
    pub fn load_revocation_events(
        &self,
    ) -> Result<Option<crate::manage::revocation_events::EventWebhook>, ConfigError> {
        self.revocation_events
            .load()
            .map_err(|(field, message)| invalid(field, message))
    }

    /// Checks the plain fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1024..=16 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(invalid("max_message_bytes", "must be 1024..=16777216"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be ≥ 1"));
        }
        if self.database.max_connections == 0
            || self.database.min_connections > self.database.max_connections
        {
            return Err(invalid(
                "database.max_connections",
                "must be ≥ 1 and ≥ database.min_connections",
            ));
        }
        if self.cache.max_keys == 0 || self.cache.ttl_seconds == 0 {
            return Err(invalid("cache", "max_keys and ttl_seconds must be ≥ 1"));
        }
        if self.cache.lookup_batch_max == 0 {
            return Err(invalid("cache.lookup_batch_max", "must be ≥ 1"));
        }
        if self.cache.lookup_batches_in_flight == 0 {
            return Err(invalid("cache.lookup_batches_in_flight", "must be ≥ 1"));
        }
        // The change feed's connection, one held per key read in flight
        // (store/postgres/held.rs), and at least one for everything else.
        if u64::from(self.database.max_connections)
            < u64::from(self.cache.lookup_batches_in_flight) + 2
        {
            return Err(invalid(
                "database.max_connections",
                "must be ≥ cache.lookup_batches_in_flight + 2 (the change feed's connection, \
                 one held per key read in flight, one for everything else)",
            ));
        }
        if self.management.max_in_flight == 0 || self.management.timeout_ms == 0 {
            return Err(invalid(
                "management",
                "max_in_flight and timeout_ms must be ≥ 1",
            ));
        }
        let beat = &self.replicas;
        if !(10..=60_000).contains(&beat.heartbeat_interval_ms) {
            return Err(invalid(
                "replicas.heartbeat_interval_ms",
                "must be 10..=60000",
            ));
        }
        if beat.heartbeat_expiry_seconds == 0
            || u64::from(beat.heartbeat_expiry_seconds) * 1000 < 2 * beat.heartbeat_interval_ms
        {
            return Err(invalid(
                "replicas.heartbeat_expiry_seconds",
                "must be ≥ 1 and at least two heartbeat intervals",
            ));
        }
        let exchange = self.rate_shares.exchange_interval_ms;
        if exchange != 0 && !(50..=60_000).contains(&exchange) {
            return Err(invalid(
                "rate_shares.exchange_interval_ms",
                "must be 0 (off) or 50..=60000",
            ));
        }
        self.leak_reports
            .check()
            .map_err(|(field, message)| invalid(field, message))?;
        if self.revocation.sweep_batch == 0 || self.revocation.sweep_batch > 10_000 {
            return Err(invalid("revocation.sweep_batch", "must be 1..=10000"));
        }
        if self.rate_shares.max_cells == 0 {
            return Err(invalid("rate_shares.max_cells", "must be ≥ 1"));
        }
        if self.forward_auth.max_connections == 0 {
            return Err(invalid("forward_auth.max_connections", "must be ≥ 1"));
        }
        if self.last_used_flush_seconds == 0 {
            return Err(invalid("last_used_flush_seconds", "must be ≥ 1"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid("log_level", e.to_string()))?;
        self.otlp()?;
        self.load_forward_auth_secret()?;
        Ok(())
    }

    /// The forward-auth listener's gateway secret, from
    /// `forward_auth.gateway_secret_file` (at least 16 characters; it must
    /// not be a caller token, which would grant more than forward-auth).
    pub fn load_forward_auth_secret(&self) -> Result<Option<SecretString>, ConfigError> {
        const FIELD: &str = "forward_auth.gateway_secret";
        let secret = load_token(FIELD, &None, &self.forward_auth.gateway_secret_file)?;
        if let Some(secret) = &secret {
            let tokens = self.load_caller_tokens()?;
            if tokens
                .iter()
                .flatten()
                .any(|t| t.expose_secret() == secret.expose_secret())
            {
                return Err(invalid(
                    FIELD,
                    "must differ from operator_token, gateway_token and console_backend_token",
                ));
            }
        }
        Ok(secret)
    }

    /// The OTLP endpoint and protocol, when traces are exported.
    pub fn otlp(&self) -> Result<Option<(&str, crate::telemetry::OtlpProtocol)>, ConfigError> {
        use crate::telemetry::OtlpProtocol;
        let Some(endpoint) = self.otlp_endpoint.as_deref() else {
            if self.otlp_protocol.is_some() {
                return Err(invalid("otlp_protocol", "needs otlp_endpoint"));
            }
            return Ok(None);
        };
        let url = reqwest::Url::parse(endpoint)
            .map_err(|e| invalid("otlp_endpoint", format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                "otlp_endpoint",
                "must be an http:// or https:// URL with a host",
            ));
        }
        let protocol = self
            .otlp_protocol
            .unwrap_or_else(|| OtlpProtocol::infer(endpoint));
        if protocol == OtlpProtocol::Grpc && url.scheme() == "https" {
            return Err(invalid(
                "otlp_endpoint",
                "OTLP/gRPC export is plaintext (http://); for TLS use OTLP/HTTP \
                 (otlp_protocol = \"http\", e.g. https://collector:4318/v1/traces)",
            ));
        }
        Ok(Some((endpoint, protocol)))
    }
}

/// A bearer token from `field` or `field_file`, at least 16 characters.
fn load_token(
    field: &str,
    value: &Option<SecretString>,
    file: &Option<PathBuf>,
) -> Result<Option<SecretString>, ConfigError> {
    let token = match (value, file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                field,
                format!("set {field} or {field}_file, not both"),
            ))
        }
        (Some(t), None) => t.clone(),
        (None, Some(path)) => read_secret_file(&format!("{field}_file"), path)?,
        (None, None) => return Ok(None),
    };
    if token.expose_secret().len() < 16 {
        return Err(invalid(field, "must be at least 16 characters"));
    }
    Ok(Some(token))
}

fn read_secret_file(field: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    Ok(SecretString::from(
        text.trim_end_matches(['\r', '\n']).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_in_the_file_names_the_field() {
        let dir = std::env::temp_dir().join(format!("tg-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen = \"not an address\"\n").unwrap();
        let err = Settings::load(Some(&file), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
        std::fs::write(&file, "[cache]\nttl_secs = 3\n").unwrap();
        let err = Settings::load(Some(&file), &FlagOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ttl_secs"), "{err}");
    }

    #[test]
    fn flags_win_and_secrets_stay_out_of_debug() {
        let flags = FlagOverrides {
            operator_token: Some("flag-token-0123456789".into()),
            ..FlagOverrides::default()
        };
        let s = Settings::load(None, &flags).unwrap();
        assert_eq!(
            s.load_operator_token().unwrap().unwrap().expose_secret(),
            "flag-token-0123456789"
        );
        assert!(!format!("{s:?}").contains("flag-token-0123456789"));
    }

    #[test]
    fn a_rate_share_exchange_too_fast_or_without_cells_is_refused_by_name() {
        let mut s = Settings::default();
        s.validate().unwrap();
        s.rate_shares.exchange_interval_ms = 0;
        s.validate().expect("0 turns the exchange off");
        s.rate_shares.exchange_interval_ms = 10;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("rate_shares.exchange_interval_ms"), "{err}");
        s.rate_shares.exchange_interval_ms = 1000;
        s.rate_shares.max_cells = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("rate_shares.max_cells"), "{err}");
    }

    #[test]
    fn key_lookup_batches_need_room_for_one_digest_and_one_query_at_a_time() {
        let mut s = Settings::default();
        assert_eq!(
            (s.cache.lookup_batch_max, s.cache.lookup_batches_in_flight),
            (128, 1)
        );
        s.cache.lookup_batches_in_flight = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("cache.lookup_batches_in_flight"), "{err}");
        s.cache.lookup_batches_in_flight = 4;
        s.validate().expect("several queries at a time are allowed");
        s.database.max_connections = 5;
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("database.max_connections") && err.contains("lookup_batches_in_flight"),
            "the feed, the held reads and one more need a connection each: {err}"
        );
        s.database.max_connections = 6;
        s.validate().expect("room for all of them");
        s.cache.lookup_batch_max = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("cache.lookup_batch_max"), "{err}");
    }

    #[test]
    fn a_short_pepper_is_refused_by_name() {
        let s = Settings {
            pepper: Some("short".to_string().into()),
            ..Settings::default()
        };
        let err = s.load_peppers().unwrap_err().to_string();
        assert!(
            err.contains("`pepper`") && !err.contains("short\""),
            "{err}"
        );
    }

    #[test]
    fn the_forward_auth_listener_holds_at_least_one_connection() {
        let mut s = Settings::default();
        assert_eq!(s.forward_auth.max_connections, 4096);
        s.forward_auth.max_connections = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("forward_auth.max_connections"), "{err}");
    }

    #[test]
    fn the_forward_auth_secret_is_long_and_no_caller_token() {
        let dir = std::env::temp_dir().join(format!("tg-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("forward-auth-secret");
        let mut s = Settings::default();
        assert!(s.load_forward_auth_secret().unwrap().is_none());
        s.forward_auth.gateway_secret_file = Some(file.clone());
        std::fs::write(&file, "short\n").unwrap();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("forward_auth.gateway_secret"), "{err}");
        assert!(!err.contains("short"), "{err}");
        std::fs::write(&file, "forward-auth-secret-0123456789\n").unwrap();
        s.gateway_token = Some("forward-auth-secret-0123456789".to_string().into());
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("must differ"), "{err}");
        s.gateway_token = Some("gateway-token-0123456789".to_string().into());
        s.validate().unwrap();
        let secret = s.load_forward_auth_secret().unwrap().unwrap();
        assert_eq!(secret.expose_secret(), "forward-auth-secret-0123456789");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_heartbeat_expiry_shorter_than_two_intervals_is_refused_by_name() {
        let mut s = Settings::default();
        assert!(s.validate().is_ok());
        s.replicas.heartbeat_interval_ms = 1_000;
        s.replicas.heartbeat_expiry_seconds = 1;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("replicas.heartbeat_expiry_seconds"), "{err}");
        s.replicas.heartbeat_interval_ms = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("replicas.heartbeat_interval_ms"), "{err}");
    }

    #[test]
    fn the_otlp_protocol_is_inferred_from_the_port_unless_set() {
        use crate::telemetry::OtlpProtocol::{Grpc, Http};
        let with = |endpoint: &str, protocol| Settings {
            otlp_endpoint: Some(endpoint.into()),
            otlp_protocol: protocol,
            ..Settings::default()
        };
        let s = with("http://collector:4317", None);
        assert_eq!(s.otlp().unwrap(), Some(("http://collector:4317", Grpc)));
        let s = with("http://collector:4318/v1/traces", None);
        assert_eq!(s.otlp().unwrap().unwrap().1, Http);
        let s = with("http://collector:9999", Some(Grpc));
        assert_eq!(s.otlp().unwrap().unwrap().1, Grpc);
        let s = with("http://collector:4317", Some(Http));
        assert_eq!(s.otlp().unwrap().unwrap().1, Http);
        for (bad, field) in [
            (with("https://collector:4317", None), "otlp_endpoint"),
            (with("collector:4317", None), "otlp_endpoint"),
            (with("ftp://collector/x", None), "otlp_endpoint"),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let orphan = Settings {
            otlp_protocol: Some(Grpc),
            ..Settings::default()
        };
        assert!(orphan
            .validate()
            .unwrap_err()
            .to_string()
            .contains("otlp_protocol"));
    }
}
