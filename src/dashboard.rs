//! The dashboard surface, assembled: the JWT verifier (external issuers
//! plus, when configured, Tollgate's own console issuer), the JWKS
//! refreshers that keep its keys fresh in the background, and the console.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::console::providers::{build_providers, ProviderError, Providers};
use crate::console::settings::{ConsoleSettings, ConsoleSettingsError};
use crate::crypto::issuers::{build_all, IssuerError, IssuerSettings};
use crate::crypto::jwks::{http_client, RefreshStats, Refresher};
use crate::crypto::jwt::{Issuer, KeyError, Verifier};
use crate::crypto::signer::ConsoleSigner;
use crate::store::{ConsoleStore, Store};

/// The `[jwt]` section: trusted external issuers (`[[jwt.issuers]]`) and
/// Tollgate's own console issuer (`[jwt.console]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSettings {
    pub issuers: Vec<IssuerSettings>,
    pub console: ConsoleSettings,
}

/// What the console runs on. Without a signer, accounts cannot log in
/// (the audit log is still kept and readable).
pub struct ConsoleParts {
    pub store: Arc<dyn ConsoleStore>,
    pub settings: ConsoleSettings,
    pub signer: Option<Arc<ConsoleSigner>>,
}

impl std::fmt::Debug for ConsoleParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleParts")
            .field("signer", &self.signer)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// An issuer's JWKS refresh counters.
pub type IssuerStats = (String, Arc<RefreshStats>);

/// What the dashboard surface runs on.
#[derive(Debug, Default)]
pub struct Dashboard {
    /// Every trusted issuer (the console's included).
    pub verifier: Arc<Verifier>,
    /// JWKS refreshers, started with the server.
    pub refreshers: Vec<Refresher>,
    /// The console side (accounts, audit), when the store has one.
    pub console: Option<ConsoleParts>,
    /// Identity providers for console sign-in (their refreshers are in
    /// `refreshers`; they are not issuers of the verifier).
    pub providers: Arc<Providers>,
}

/// Dashboard settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error(transparent)]
    Console(#[from] ConsoleSettingsError),
    #[error("configuration field `jwt`: {0}")]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

impl Dashboard {
    /// Builds the external issuers of `settings` and, with `console`, the
    /// console issuer (its keys are the console signer's).
    pub fn new(
        settings: &JwtSettings,
        console: Option<ConsoleParts>,
    ) -> Result<Self, DashboardError> {
        let built = build_all(&settings.issuers)?;
        let mut issuers = built.issuers;
        let mut refreshers = built.refreshers;
        let mut providers = Providers::default();
        if let Some(c) = &console {
            c.settings.validate()?;
            // A misconfigured webhook (unreadable secret file, short
            // secret) stops the start, rather than silently sending nothing.
            c.settings.load_webhook()?;
            if let Some(signer) = &c.signer {
                let rules = crate::console::Console::issuer_rules(&c.settings);
                issuers.push(Arc::new(Issuer::new(rules, signer.key_set())));
            }
            let (built, provider_refreshers) = build_providers(&c.settings.oidc)?;
            providers = built;
            refreshers.extend(provider_refreshers);
        }
        Ok(Self {
            verifier: Arc::new(Verifier::new(issuers)?),
            refreshers,
            console,
            providers: Arc::new(providers),
        })
    }

    /// The dashboard of a deployment: the configured issuers, and the
    /// console on `store`'s console side, signing with the configured keys
    /// (in `dev`, a generated key when none are configured; sign-up open
    /// and console messages printed to stdout unless configured).
    pub fn configure(
        settings: &JwtSettings,
        store: &Arc<dyn Store>,
        dev: bool,
    ) -> Result<Self, DashboardError> {
        let signer = match settings.console.load_signer()? {
            Some(s) => Some(s),
            None if dev => Some(ConsoleSigner::ephemeral("dev")),
            None => {
                tracing::info!("no console signing keys configured: console login is off");
                None
            }
        };
        let console_settings = if dev {
            settings.console.clone().for_dev()
        } else {
            settings.console.clone()
        };
        let console = store.clone().console_store().map(|store| ConsoleParts {
            store,
            settings: console_settings,
            signer: signer.map(Arc::new),
        });
        Self::new(settings, console)
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
