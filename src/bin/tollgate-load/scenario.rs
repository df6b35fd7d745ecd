//! What one request of each scenario is: Authenticate, CheckQuota or an
//! Envoy ext_authz Check, each with one of the seeded keys in turn.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tollgate::grpc::pb::auth_service_client::AuthServiceClient;
use tollgate::grpc::pb::{AuthenticateRequest, CheckQuotaRequest};
use tonic::transport::Channel;
use tonic::Status;

/// The RPC a scenario calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Kind {
    /// `tollgate.v1.AuthService/Authenticate` with `api_key`.
    Authenticate,
    /// `tollgate.v1.AuthService/CheckQuota` with `api_key`, cost 1.
    CheckQuota,
    /// `envoy.service.auth.v3.Authorization/Check` with `x-api-key`.
    ExtAuthz,
}

/// A scenario: an RPC and the keys it cycles through.
pub struct Scenario {
    kind: Kind,
    keys: Arc<Vec<String>>,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Authenticate => "authenticate",
            Kind::CheckQuota => "check_quota",
            Kind::ExtAuthz => "ext_authz check",
        }
    }
}

impl Scenario {
    pub fn new(kind: Kind, keys: Arc<Vec<String>>) -> Arc<Self> {
        assert!(!keys.is_empty(), "a scenario needs at least one key");
        Arc::new(Self { kind, keys })
    }

    /// A client of this scenario on `channel`.
    pub fn client(&self, channel: Channel) -> Client {
        Client {
            kind: self.kind,
            keys: self.keys.clone(),
            auth: AuthServiceClient::new(channel.clone()),
            envoy: AuthorizationClient::new(channel),
        }
    }
}

/// Sends one scenario's requests on one connection.
pub struct Client {
    kind: Kind,
    keys: Arc<Vec<String>>,
    auth: AuthServiceClient<Channel>,
    envoy: AuthorizationClient<Channel>,
}

impl Client {
    /// Sends request number `i`; `Ok(allowed)`.
    pub async fn call(&mut self, i: usize) -> Result<bool, Status> {
        let key = &self.keys[i % self.keys.len()];
        match self.kind {
            Kind::Authenticate => {
                let r = self.auth.authenticate(authenticate_request(key)).await?;
                Ok(r.into_inner().allowed)
            }
            Kind::CheckQuota => {
                let r = self.auth.check_quota(check_quota_request(key)).await?;
                Ok(r.into_inner().allowed)
            }
            Kind::ExtAuthz => {
                let r = self.envoy.check(check_request(key, i)).await?;
                // google.rpc.Code OK (0) is an allow.
                Ok(r.into_inner().status.is_none_or(|s| s.code == 0))
            }
        }
    }
}

pub fn authenticate_request(key: &str) -> AuthenticateRequest {
    AuthenticateRequest {
        api_key: key.to_owned(),
        ..Default::default()
    }
}

pub fn check_quota_request(key: &str) -> CheckQuotaRequest {
    CheckQuotaRequest {
        api_key: key.to_owned(),
        cost: 1,
        ..Default::default()
    }
}

/// A Check as Envoy sends it for `POST /v1/messages` with the key in
/// `x-api-key`, with the headers a typical client sends.
pub fn check_request(key: &str, i: usize) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", "/v1/messages"),
        (":scheme", "https"),
        ("content-type", "application/json"),
        ("user-agent", "bench-client/1.0"),
        ("accept", "application/json"),
        ("x-forwarded-proto", "https"),
        ("x-api-key", key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([("x-request-id".to_owned(), format!("bench-{i:016x}"))])
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: i.to_string(),
                    method: "POST".into(),
                    path: "/v1/messages".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: [("surface".to_owned(), "public_api".to_owned())].into(),
            ..Default::default()
        }),
    }
}
