//! HTTP forward-auth for gateways that cannot speak ext_authz: NGINX
//! `auth_request` (`/auth/nginx`) and Traefik ForwardAuth (`/auth/traefik`),
//! on their own HTTP/1.1 listener (`[forward_auth]`, off by default). A
//! transport adapter like `grpc/envoy.rs`, and a thin one: the request's
//! headers and the route policy in the auth URL's query go through the very
//! same [`EnvoyAuthz::decide_http`] (the `authz` pipeline, the product's
//! denial bodies, the identity and `RateLimit-*` headers); only the answer's
//! HTTP shape differs per gateway (`answer.rs`).
//!
//! Route policy (`surface`, `scopes`, `cost`, `limits`, as Envoy's
//! `context_extensions`) comes from the auth URL's query string, which is
//! part of the gateway's configuration: a client's request never reaches it
//! (NGINX builds the subrequest URI, Traefik calls its configured `address`).
//! Headers would not do: Traefik copies every client header to the auth
//! request unless `authRequestHeaders` is set.
//!
//! Who may reach the listener: [`crate::access::admit_forward_auth`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthService;

use crate::access::{admit_forward_auth, Caller};
use crate::error::Error;
use crate::grpc::envoy::EnvoyAuthz;

mod answer;
mod server;

pub use server::ForwardAuthServer;

/// Settings of the forward-auth listener (`[forward_auth]` in the config
/// file, `TOLLGATE_FORWARD_AUTH__LISTEN` in the environment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardAuthSettings {
    /// Address of the HTTP/1.1 listener; absent = no listener (default).
    pub listen: Option<SocketAddr>,
    /// TLS for this listener (`[forward_auth.tls]`, same keys as `[tls]`);
    /// with `client_ca_file`, only gateways with a certificate connect.
    pub tls: Option<crate::tls::TlsSettings>,
    /// File holding the secret the gateway sends in
    /// `x-tollgate-gateway-secret`; absent = none required (network policy
    /// and mTLS decide who reaches the port).
    pub gateway_secret_file: Option<PathBuf>,
    /// Connections held open at once (gateways keep theirs alive). One
    /// more is closed on arrival, so a gateway fails over at once instead
    /// of a flood of idle connections holding the replica's memory and
    /// file descriptors.
    pub max_connections: usize,
}

impl Default for ForwardAuthSettings {
    fn default() -> Self {
        Self {
            listen: None,
            tls: None,
            gateway_secret_file: None,
            max_connections: 4096,
        }
    }
}

/// The header a gateway proves itself with when a secret is configured.
pub const GATEWAY_SECRET_HEADER: &str = "x-tollgate-gateway-secret";

/// Which gateway's contract a request follows (from the path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gateway {
    /// `auth_request`: 2xx, 401 or 403 only; the denial travels in headers.
    Nginx,
    /// ForwardAuth: any non-2xx answer is relayed to the client as is.
    Traefik,
}

impl Gateway {
    fn as_str(self) -> &'static str {
        match self {
            Gateway::Nginx => "nginx",
            Gateway::Traefik => "traefik",
        }
    }

    /// The headers carrying the original request's method, URI and host.
    fn original(self) -> [&'static str; 3] {
        match self {
            Gateway::Nginx => ["x-original-method", "x-original-uri", "host"],
            Gateway::Traefik => ["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"],
        }
    }
}

/// The forward-auth handler: routes a request, checks the caller, decides.
pub(crate) struct ForwardAuth {
    envoy: EnvoyAuthz,
    gateway_secret: Option<SecretString>,
    health: HealthService,
}

impl ForwardAuth {
    pub(crate) fn new(
        envoy: EnvoyAuthz,
        gateway_secret: Option<SecretString>,
        health: HealthService,
    ) -> Self {
        Self {
            envoy,
            gateway_secret,
            health,
        }
    }

    /// One HTTP request on the listener.
    pub(crate) async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        match request.uri().path() {
            "/auth/nginx" => self.forward_auth(Gateway::Nginx, &request).await,
            "/auth/traefik" => self.forward_auth(Gateway::Traefik, &request).await,
            "/healthz" => self.health(crate::app::LIVENESS).await,
            "/readyz" => self.health("").await,
            _ => answer::plain(
                404,
                "not found: use /auth/nginx, /auth/traefik, /healthz or /readyz",
            ),
        }
    }

    /// The gRPC health service's status of `service`, as 200 or 503.
    async fn health(&self, service: &str) -> Response<Full<Bytes>> {
        let request = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        let serving = self
            .health
            .check(request)
            .await
            .is_ok_and(|r| r.into_inner().status == 1);
        match serving {
            true => answer::plain(200, "SERVING"),
            false => answer::plain(503, "NOT_SERVING"),
        }
    }

    #[tracing::instrument(skip_all, fields(gateway = gateway.as_str(), surface, request_id))]
    async fn forward_auth<B>(
        &self,
        gateway: Gateway,
        request: &Request<B>,
    ) -> Response<Full<Bytes>> {
        let caller = self.caller(request);
        if let Err(e) = admit_forward_auth(&caller, self.gateway_secret.is_some()) {
            count(gateway, "refused");
            return answer::error(e);
        }
        let result = match route_policy(request.uri().query()) {
            Ok(policy) => {
                let http = http_request(gateway, request);
                self.envoy.decide_http(&http, &policy).await
            }
            Err(e) => Err(e),
        };
        let (outcome, response) = match result {
            Ok(check) => answer::decision(gateway, check),
            Err(e) => ("error", answer::error(e)),
        };
        count(gateway, outcome);
        response
    }

    /// The gateway when it sent the configured secret, else anonymous.
    fn caller<B>(&self, request: &Request<B>) -> Caller {
        let Some(secret) = &self.gateway_secret else {
            return Caller::Anonymous;
        };
        let sent = request
            .headers()
            .get(GATEWAY_SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        match bool::from(sent.ct_eq(secret.expose_secret().as_bytes())) {
            true => Caller::Gateway,
            false => Caller::Anonymous,
        }
    }
}

fn count(gateway: Gateway, outcome: &'static str) {
    metrics::counter!(
        crate::telemetry::FORWARD_AUTH_REQUESTS,
        "gateway" => gateway.as_str(),
        "outcome" => outcome
    )
    .increment(1);
}

/// The route policy from the auth URL's query (`surface=…&scopes=…&cost=…`),
/// as the `context_extensions` map `decide_http` validates. `surface` is
/// required, and a key given twice is refused: which one would win is a
/// guess a typo must not make.
fn route_policy(query: Option<&str>) -> Result<HashMap<String, String>, Error> {
    let mut policy = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if policy.insert(key.to_string(), value.to_string()).is_some() {
            return Err(Error::invalid(
                &format!("query.{key}"),
                "is given more than once",
            ));
        }
    }
    // Envoy falls back to the default surface; here a location that
    // forgot its policy must fail closed, not decide under a default.
    if !policy.contains_key("surface") {
        return Err(Error::invalid(
            "query.surface",
            "is required: name the route's surface, e.g. `?surface=public_api`",
        ));
    }
    Ok(policy)
}

/// The original request as ext_authz would describe it: lower-case header
/// names, repeated headers joined with `,` (as Envoy does), headers that are
/// not UTF-8 left out (a credential there is no credential).
fn http_request<B>(gateway: Gateway, request: &Request<B>) -> HttpRequest {
    let mut headers: HashMap<String, String> = HashMap::with_capacity(request.headers().len());
    for (name, value) in request.headers() {
        if name.as_str() == GATEWAY_SECRET_HEADER {
            continue;
        }
        let Ok(value) = value.to_str() else {
            continue;
        };
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(value);
            })
            .or_insert_with(|| value.to_owned());
    }
    let [method, path, host] = gateway.original().map(|h| headers.get(h).cloned());
    HttpRequest {
        method: method.unwrap_or_default(),
        path: path.unwrap_or_default(),
        host: host.unwrap_or_default(),
        headers,
        ..HttpRequest::default()
    }
}

#[cfg(test)]
mod tests;
