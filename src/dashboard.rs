//! The dashboard surface, assembled: the JWT verifier (external issuers
//! plus, when configured, Tollgate's own console issuer) and the JWKS
//! refreshers that keep its keys fresh in the background.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::crypto::issuers::{build_all, IssuerError, JwtSettings};
use crate::crypto::jwks::{http_client, RefreshStats, Refresher};
use crate::crypto::jwt::{Issuer, KeyError, Verifier};

/// An issuer's JWKS refresh counters.
pub type IssuerStats = (String, Arc<RefreshStats>);

/// What the dashboard surface runs on.
#[derive(Debug, Default)]
pub struct Dashboard {
    /// Every trusted issuer.
    pub verifier: Arc<Verifier>,
    /// JWKS refreshers, started with the server.
    pub refreshers: Vec<Refresher>,
}

/// Dashboard settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error("configuration field `jwt`: {0}")]
    Keys(#[from] KeyError),
}

impl Dashboard {
    /// Builds the external issuers of `settings`, plus `extra` issuers
    /// (Tollgate's own console issuer).
    pub fn from_settings(
        settings: &JwtSettings,
        extra: Vec<Arc<Issuer>>,
    ) -> Result<Self, DashboardError> {
        let built = build_all(&settings.issuers)?;
        let mut issuers = built.issuers;
        issuers.extend(extra);
        Ok(Self {
            verifier: Arc::new(Verifier::new(issuers)?),
            refreshers: built.refreshers,
        })
    }

    /// Starts the refreshers: their tasks, and their counters by issuer.
    pub fn start_refreshers(&mut self) -> (Vec<JoinHandle<()>>, Vec<IssuerStats>) {
        let client = http_client(Duration::from_secs(10));
        self.refreshers
            .drain(..)
            .map(|r| {
                let stats = (r.issuer().rules().issuer.clone(), r.stats());
                (r.spawn(client.clone()), stats)
            })
            .unzip()
    }
}
