//! Logging and metrics setup, and the metric names. Secrets never reach a
//! log line or a label: key types redact themselves in `Debug`, and no
//! handler records a credential.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

/// Decisions, by `outcome` (allow/deny), `reason` and `credential`.
pub const DECISIONS: &str = "tollgate_decisions_total";
/// Time to decide, in seconds.
pub const DECISION_SECONDS: &str = "tollgate_decision_duration_seconds";
/// Cache lookups by `cache` (key, tenant, negative) and `result` (hit, miss).
pub const CACHE_LOOKUPS: &str = "tollgate_cache_lookups_total";
/// Cache entries evicted for size or age, by `cache`.
pub const CACHE_EVICTIONS: &str = "tollgate_cache_evictions_total";
/// Pushed invalidations applied, by `kind` (key, tenant, flush).
pub const INVALIDATIONS: &str = "tollgate_invalidations_received_total";
/// Seconds from a decision-changing commit to this replica receiving it.
pub const REVOCATION_LAG_SECONDS: &str = "tollgate_revocation_lag_seconds";
/// Database query time in seconds, by `query`.
pub const DB_QUERY_SECONDS: &str = "tollgate_db_query_duration_seconds";
/// Distinct digests per cache-miss key lookup statement (1: a lone miss;
/// more: misses that waited while other lookups ran, asked together).
pub const KEY_LOOKUP_BATCH_SIZE: &str = "tollgate_key_lookup_batch_size";
/// Kept database connections found closed by the server (a restart, an
/// idle timeout) as a read began; the read was retried on a new one.
pub const DB_CONNECTIONS_LOST: &str = "tollgate_db_connections_lost_total";
/// gRPC connections closed on arrival: the port held `max_connections`.
pub const GRPC_CONNECTIONS_REFUSED: &str = "tollgate_grpc_connections_refused_total";
/// Database pool connections, by `state` (idle, in_use).
pub const DB_POOL_CONNECTIONS: &str = "tollgate_db_pool_connections";
/// Quota lease requests, by `result` (granted, exhausted).
pub const QUOTA_LEASES: &str = "tollgate_quota_leases_total";
/// Quota units leased from and returned to the database, by `direction`.
pub const QUOTA_LEASE_UNITS: &str = "tollgate_quota_lease_units_total";
/// Limits in shadow mode that would have denied, by `reason`.
pub const SHADOW_DENIALS: &str = "tollgate_shadow_denials_total";
/// 1 while the invalidation feed (LISTEN connection) is live, else 0.
pub const FEED_CONNECTED: &str = "tollgate_feed_connected";
/// Seconds since the invalidation feed was lost (0 while it is live).
pub const FEED_STALENESS_SECONDS: &str = "tollgate_feed_staleness_seconds";
/// Whole-cache flushes (the change history a replica needed was gone).
pub const CACHE_FLUSHES: &str = "tollgate_cache_flushes_total";
/// Live replicas sharing rate limits.
pub const REPLICAS: &str = "tollgate_replicas";
/// Rate-share exchanges with the other replicas, by `result` (ok, error).
pub const SHARE_EXCHANGES: &str = "tollgate_rate_share_exchanges_total";
/// Rate cells this replica published a share for in its last exchange
/// (cells hot somewhere in the fleet).
pub const SHARED_CELLS: &str = "tollgate_rate_shared_cells";
/// CheckQuota answers, by `outcome` (allow/deny) and `reason`.
pub const QUOTA_CHECKS: &str = "tollgate_quota_checks_total";
/// Forward-auth (NGINX `auth_request`, Traefik ForwardAuth) requests, by
/// `gateway` (`nginx`, `traefik`) and `outcome` (`allow`, `deny`, `error`,
/// `refused`: the caller did not prove it is the gateway).
pub const FORWARD_AUTH_REQUESTS: &str = "tollgate_forward_auth_requests_total";
/// Forward-auth connections closed on arrival because the listener already
/// held `forward_auth.max_connections`.
pub const FORWARD_AUTH_CONNECTIONS_REFUSED: &str =
    "tollgate_forward_auth_connections_refused_total";
/// Envoy rate-limit descriptors answered, by `kind` (tenant, key,
/// credential, generic) and `result` (ok, over_limit, shadow_over_limit,
/// unlimited, no_limit).
pub const RATELIMIT_DESCRIPTORS: &str = "tollgate_ratelimit_descriptors_total";
/// Decisions not counted per key because this replica's count table was
/// full (more distinct keys than it holds in one flush interval).
pub const REQUEST_COUNTS_OVERFLOWED: &str = "tollgate_request_counts_overflowed_total";
/// Keys revoked by an automatic revocation policy, by `policy`
/// (`unused`, `max_age`, `reported_leaked`).
pub const POLICY_REVOCATIONS: &str = "tollgate_policy_revocations_total";
/// Leaked tokens reported, by `reporter` kind (`github`, `grpc`) and `label`
/// (`true_positive`, `false_positive`).
pub const LEAK_REPORTS: &str = "tollgate_leak_reports_total";
/// Connections the accept loop dealt to each connection worker (label
/// `worker`): an uneven spread shows here.
pub const CONNECTIONS_DEALT: &str = "tollgate_connections_dealt_total";

/// Log output (`log_format` in the settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies, to a traces URL such as
    /// `http://collector:4318/v1/traces` (TLS with `https://`).
    Http,
    /// OTLP/gRPC (`TraceService/Export`) to `http://collector:4317`;
    /// plaintext only (a collector in the cluster or a sidecar).
    Grpc,
}

impl OtlpProtocol {
    /// The protocol for `endpoint` when none is configured: gRPC on the
    /// collectors' gRPC port 4317, HTTP otherwise.
    pub fn infer(endpoint: &str) -> OtlpProtocol {
        match reqwest::Url::parse(endpoint).ok().and_then(|u| u.port()) {
            Some(4317) => OtlpProtocol::Grpc,
            _ => OtlpProtocol::Http,
        }
    }
}

/// Installs the global subscriber (once, at start). With `otlp` (an
/// endpoint and how to reach it) spans are also exported; the returned
/// provider flushes them on shutdown.
pub fn init(
    level: &str,
    format: LogFormat,
    otlp: Option<(&str, OtlpProtocol)>,
) -> Result<Option<SdkTracerProvider>, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    // Postgres NOTICEs (`relation "_sqlx_migrations" already exists,
    // skipping` on every start) are noise at INFO; a level naming them wins.
    let quiet = "sqlx::postgres::notice=warn";
    let filter = EnvFilter::try_new(format!("{quiet},{level}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("{quiet},info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = otlp
        .map(|(endpoint, protocol)| otlp_provider(endpoint, protocol))
        .transpose()?;
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("tollgate"))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(provider)
}

/// Must run inside the tokio runtime: the gRPC channel's worker is a task
/// there, which the batch exporter's own thread sends through.
fn otlp_provider(endpoint: &str, protocol: OtlpProtocol) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match protocol {
        OtlpProtocol::Http => builder.with_http().with_endpoint(endpoint).build(),
        OtlpProtocol::Grpc => builder.with_tonic().with_endpoint(endpoint).build(),
    }
    .map_err(|e| format!("otlp_endpoint: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("tollgate")
                .build(),
        )
        .build())
}

/// Serves Prometheus text on `http://{addr}/metrics` and installs the
/// global recorder. Must run inside the tokio runtime.
pub fn install_metrics(addr: SocketAddr) -> Result<(), String> {
    let latency = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&latency)
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(KEY_LOOKUP_BATCH_SIZE.into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        DECISIONS,
        "Decisions by outcome, reason and credential type"
    );
    describe_histogram!(DECISION_SECONDS, Unit::Seconds, "Time to decide");
    describe_counter!(CACHE_LOOKUPS, "Cache lookups by cache and result");
    describe_counter!(CACHE_EVICTIONS, "Cache entries evicted for size or age");
    describe_counter!(INVALIDATIONS, "Pushed invalidations applied");
    describe_histogram!(
        REVOCATION_LAG_SECONDS,
        Unit::Seconds,
        "Commit of a decision-changing write to this replica receiving it"
    );
    describe_histogram!(DB_QUERY_SECONDS, Unit::Seconds, "Database query time");
    describe_histogram!(
        KEY_LOOKUP_BATCH_SIZE,
        Unit::Count,
        "Distinct key digests per cache-miss lookup statement"
    );
    describe_gauge!(DB_POOL_CONNECTIONS, "Database pool connections by state");
    describe_counter!(
        GRPC_CONNECTIONS_REFUSED,
        "gRPC connections closed on arrival because the port held max_connections"
    );
    describe_counter!(
        DB_CONNECTIONS_LOST,
        "Kept database connections found closed by the server; the read was retried"
    );
    describe_counter!(QUOTA_LEASES, "Quota lease requests by result");
    describe_counter!(
        QUOTA_LEASE_UNITS,
        "Quota units leased, returned, and reclaimed from dead replicas (as consumed)"
    );
    describe_counter!(SHADOW_DENIALS, "Shadow-mode would-be denials");
    describe_gauge!(REPLICAS, "Live replicas sharing rate limits");
    describe_counter!(QUOTA_CHECKS, "CheckQuota answers by outcome and reason");
    describe_counter!(
        FORWARD_AUTH_REQUESTS,
        "Forward-auth requests by gateway and outcome"
    );
    describe_counter!(
        FORWARD_AUTH_CONNECTIONS_REFUSED,
        "Forward-auth connections closed on arrival: the listener was full"
    );
    describe_counter!(
        CONNECTIONS_DEALT,
        "gRPC connections dealt to each connection worker"
    );
}
