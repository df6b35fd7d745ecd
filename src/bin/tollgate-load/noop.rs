//! The baseline: a tonic server that does no work. It answers Authenticate,
//! CheckQuota, ext_authz Check and Envoy's rate-limit ShouldRateLimit with
//! canned responses captured from a real Tollgate (so the messages have the
//! same sizes) on either tokio runtime.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tollgate::grpc::pb::auth_service_server::{AuthService, AuthServiceServer};
use tollgate::grpc::pb::*;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Encoded responses, hex, as `capture` writes them.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Canned {
    pub authenticate: String,
    pub check_quota: String,
    pub check: String,
}

impl Canned {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Encoded sizes (Authenticate, CheckQuota, Check), in bytes.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.authenticate.len() / 2,
            self.check_quota.len() / 2,
            self.check.len() / 2,
        )
    }
}

fn decode<M: Message + Default>(hex_text: &str) -> anyhow::Result<M> {
    Ok(M::decode(hex::decode(hex_text)?.as_slice())?)
}

/// The runtime shape of the baseline server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeShape {
    Multi,
    Current,
    /// Tollgate's default: one current-thread runtime per core serving
    /// the connections dealt to it (`tollgate::app::workers`), the accept
    /// loop on a multi-thread runtime.
    PerCore,
}

#[derive(Clone)]
struct Noop {
    authenticate: AuthenticateResponse,
    check_quota: CheckQuotaResponse,
    check: CheckResponse,
    should_rate_limit: RateLimitResponse,
}

/// Serves until killed; prints `listening on ADDR` once bound. `rls`: the
/// encoded ShouldRateLimit answer, hex (empty: an empty message).
pub fn serve(
    listen: SocketAddr,
    shape: RuntimeShape,
    canned: Canned,
    rls: &str,
) -> anyhow::Result<()> {
    let noop = Noop {
        authenticate: decode(&canned.authenticate)?,
        check_quota: decode(&canned.check_quota)?,
        check: decode(&canned.check)?,
        should_rate_limit: decode(rls.trim())?,
    };
    let runtime = match shape {
        RuntimeShape::Multi | RuntimeShape::PerCore => tokio::runtime::Builder::new_multi_thread(),
        RuntimeShape::Current => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let router = tonic::transport::Server::builder()
            .add_service(AuthServiceServer::new(noop.clone()))
            .add_service(AuthorizationServer::new(noop.clone()))
            .add_service(RateLimitServiceServer::new(noop));
        if shape == RuntimeShape::PerCore {
            let workers = tollgate::app::per_core();
            let (accept, _lifetime) = tollgate::app::workers::serve(
                router,
                listener,
                None,
                workers,
                tollgate::net::Slots::new(1 << 20, "noop", "noop_connections_refused_total"),
                std::future::pending(),
            )?;
            accept.await?;
        } else {
            router
                .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                .await?;
        }
        Ok(())
    })
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the no-op baseline answers only the benchmarked calls",
    ))
}

#[tonic::async_trait]
impl AuthService for Noop {
    async fn authenticate(
        &self,
        _: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        Ok(Response::new(self.authenticate.clone()))
    }
    async fn check_quota(
        &self,
        _: Request<CheckQuotaRequest>,
    ) -> Result<Response<CheckQuotaResponse>, Status> {
        Ok(Response::new(self.check_quota.clone()))
    }
    async fn create_key(
        &self,
        _: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        unimplemented()
    }
    async fn revoke_key(
        &self,
        _: Request<RevokeKeyRequest>,
    ) -> Result<Response<RevokeKeyResponse>, Status> {
        unimplemented()
    }
    async fn get_key(&self, _: Request<GetKeyRequest>) -> Result<Response<GetKeyResponse>, Status> {
        unimplemented()
    }
    async fn list_keys(
        &self,
        _: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        unimplemented()
    }
    async fn rotate_key(
        &self,
        _: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        unimplemented()
    }
    async fn update_key(
        &self,
        _: Request<UpdateKeyRequest>,
    ) -> Result<Response<UpdateKeyResponse>, Status> {
        unimplemented()
    }
    async fn get_usage(
        &self,
        _: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        unimplemented()
    }
    async fn import_keys(
        &self,
        _: Request<tollgate::grpc::pb::ImportKeysRequest>,
    ) -> Result<Response<tollgate::grpc::pb::ImportKeysResponse>, Status> {
        unimplemented()
    }
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.check.clone()))
    }
}

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        _: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        Ok(Response::new(self.should_rate_limit.clone()))
    }
}
