//! Follows the invalidation feed: applies each change to the caches and
//! keeps health, the staleness bound and the feed metrics.
//!
//! Readiness means "can decide correctly", not "database connected"
//! (ARCHITECTURE.md, Invariants). While the feed is down a replica keeps answering from its
//! cache and stays ready for `cache.max_staleness_seconds`; past it, cache
//! hits are refused (UNAVAILABLE) and only then readiness turns NOT_SERVING.
//! The bound counts from the last moment the feed confirmed this replica
//! had applied every committed change (`Invalidation::Current`), not from
//! when the loss was noticed: a change committed just before a link went
//! silent, whose notification never arrived, is covered too.
//! The `database` health name follows the feed itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::cache::{BuiltFilter, Caches, KnownEpoch};
use crate::store::{Invalidation, Store};

/// Health names that follow readiness: NOT_SERVING until the invalidation
/// feed is first live, and again once it has been down longer than the
/// staleness bound (or at shutdown).
pub const SERVICES: [&str; 3] = ["", "tollgate.v1.AuthService", "tollgate.v1.TenantService"];
/// Health name that follows the invalidation feed (the database link):
/// SERVING while it is live. For dashboards and alerts, not for probes.
pub const DATABASE: &str = "database";

/// Sets every readiness name to `status`.
pub async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// The state the follower needs.
pub struct Follower {
    pub events: mpsc::Receiver<Invalidation>,
    pub caches: Arc<Caches>,
    pub store: Arc<dyn Store>,
    pub reporter: HealthReporter,
    /// Readiness also waits for this (start-up migrations).
    pub ready_gate: Option<watch::Receiver<bool>>,
    /// Every event, after it is applied and health is set.
    pub announce: broadcast::Sender<Invalidation>,
    pub max_staleness: Duration,
}

/// How often the staleness gauge is refreshed while the feed is down.
const STALENESS_TICK: Duration = Duration::from_secs(1);

impl Follower {
    /// Runs until the feed ends.
    pub async fn run(mut self) {
        // The digest load of the latest Ready; a newer Ready (or the end of
        // the feed) aborts it, so loads never pile up or outlive the feed.
        let mut loading: Option<JoinHandle<()>> = None;
        // When the feed was lost, if it is down after having been live.
        let mut lost_at: Option<Instant> = None;
        // The last instant before which every committed change was applied.
        let mut current_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(STALENESS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.reporter
            .set_service_status(DATABASE, ServingStatus::NotServing)
            .await;
        metrics::gauge!(crate::telemetry::FEED_CONNECTED).set(0.0);
        loop {
            let deadline = self.deadline(lost_at, current_at);
            let past_bound = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                e = self.events.recv() => match e {
                    Some(e) => e,
                    None => break,
                },
                () = past_bound => {
                    self.refuse_cached().await;
                    continue;
                }
                _ = tick.tick(), if lost_at.is_some() => {
                    if let Some(at) = current_at.or(lost_at) {
                        metrics::gauge!(crate::telemetry::FEED_STALENESS_SECONDS)
                            .set(at.elapsed().as_secs_f64());
                    }
                    continue;
                }
            };
            self.caches.apply(&event);
            if matches!(event, Invalidation::KeyAdded(_))
                && self.caches.known_wants_rebuild()
                && loading.as_ref().is_none_or(|l| l.is_finished())
            {
                // Enough additions held exactly: fold them into a new filter.
                let epoch = self.caches.known_epoch();
                loading = Some(tokio::spawn(load_known_digests(
                    self.store.clone(),
                    self.caches.clone(),
                    epoch,
                )));
            }
            let kind = match &event {
                Invalidation::Key(_) => Some("key"),
                Invalidation::Tenant(_) => Some("tenant"),
                Invalidation::Flush => Some("flush"),
                Invalidation::KeyAdded(_) => Some("key_added"),
                _ => None,
            };
            if let Some(kind) = kind {
                metrics::counter!(crate::telemetry::INVALIDATIONS, "kind" => kind).increment(1);
            }
            match event {
                Invalidation::Ready => {
                    if let Some(gate) = self.ready_gate.as_mut() {
                        // Not ready before the schema is: wait for the
                        // start-up migrations (once; later Readys pass).
                        if gate.wait_for(|done| *done).await.is_err() {
                            continue;
                        }
                        self.ready_gate = None;
                    }
                    if let Some(previous) = loading.take() {
                        previous.abort();
                    }
                    if !self.caches.knows_digests() {
                        // Load every stored digest, off this loop. Keys
                        // added from now on arrive as notifications.
                        let epoch = self.caches.known_epoch();
                        loading = Some(tokio::spawn(load_known_digests(
                            self.store.clone(),
                            self.caches.clone(),
                            epoch,
                        )));
                    }
                    if let Some(at) = lost_at.take() {
                        tracing::info!(
                            down_ms = at.elapsed().as_millis() as u64,
                            "invalidation feed back; deciding from the cache again"
                        );
                    }
                    self.caches.set_confirmable(true);
                    metrics::gauge!(crate::telemetry::FEED_CONNECTED).set(1.0);
                    metrics::gauge!(crate::telemetry::FEED_STALENESS_SECONDS).set(0.0);
                    self.reporter
                        .set_service_status(DATABASE, ServingStatus::Serving)
                        .await;
                    set_health(&self.reporter, ServingStatus::Serving).await;
                }
                Invalidation::Lost => {
                    if lost_at.is_none() {
                        lost_at = Some(Instant::now());
                        tick.reset();
                        tracing::warn!(
                            max_staleness_s = self.max_staleness.as_secs(),
                            current_ms_ago = current_at.map(|at| at.elapsed().as_millis() as u64),
                            "invalidation feed lost; serving cached decisions within the staleness bound"
                        );
                    }
                    metrics::gauge!(crate::telemetry::FEED_CONNECTED).set(0.0);
                    self.reporter
                        .set_service_status(DATABASE, ServingStatus::NotServing)
                        .await;
                    // Noticed late (a silent link): the bound may already
                    // be past. Refuse before anyone hears of the loss.
                    if self
                        .deadline(lost_at, current_at)
                        .is_some_and(|d| d <= Instant::now())
                    {
                        self.refuse_cached().await;
                    }
                }
                Invalidation::Current(at) => {
                    current_at = Some(current_at.map_or(at, |c| c.max(at)));
                }
                _ => {}
            }
            // Nobody listening is the normal case outside tests.
            let _ = self.announce.send(event);
        }
        if let Some(load) = loading {
            load.abort();
        }
    }

    /// When cached decisions must stop: the staleness bound after the last
    /// confirmed-current instant (or the loss, if none was confirmed), while
    /// the feed is down and cached decisions are still given.
    fn deadline(&self, lost_at: Option<Instant>, current_at: Option<Instant>) -> Option<Instant> {
        let lost_at = lost_at.filter(|_| self.caches.confirmable())?;
        Some(current_at.unwrap_or(lost_at).min(lost_at) + self.max_staleness)
    }

    /// The feed has been down past the bound: stop deciding from the cache,
    /// then leave the load balancer, in that order (a watcher that sees
    /// NOT_SERVING knows cached decisions have already stopped).
    async fn refuse_cached(&self) {
        self.caches.set_confirmable(false);
        tracing::warn!(
            max_staleness_s = self.max_staleness.as_secs(),
            "invalidation feed down past cache.max_staleness_seconds; refusing cached decisions (UNAVAILABLE) and reporting NOT_SERVING"
        );
        set_health(&self.reporter, ServingStatus::NotServing).await;
    }
}

/// Digests read per page when loading the known-digest set.
const DIGEST_PAGE: u32 = 10_000;

/// Builds the known-digest filter: reads every stored digest, page by page
/// (keyset pagination by digest), keeping only their 8-byte prefixes, and
/// builds off the async runtime. On failure the previous filter (or none:
/// every digest is looked up) stays: slower under a flood, never wrong.
async fn load_known_digests(store: Arc<dyn Store>, caches: Arc<Caches>, epoch: KnownEpoch) {
    let started = Instant::now();
    let mut prefixes = Vec::new();
    let mut after = None;
    loop {
        match store.key_digests_page(after, DIGEST_PAGE).await {
            Ok(page) => {
                after = page.last().copied();
                let done = page.len() < DIGEST_PAGE as usize;
                prefixes.extend(page.iter().map(crate::cache::known::prefix));
                if done {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not load key digests; the previous known-digest filter stays");
                return;
            }
        }
    }
    let read_ms = started.elapsed().as_millis() as u64;
    let built = match tokio::task::spawn_blocking(move || {
        let built = BuiltFilter::build(prefixes);
        // This thread freed the build's working memory and now idles.
        crate::memory::give_back_freed();
        built
    })
    .await
    {
        Ok(Ok(built)) => built,
        Ok(Err(e)) => {
            tracing::warn!(
                error = e,
                "could not build the known-digest filter; the previous one stays"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "known-digest filter build did not finish");
            return;
        }
    };
    let (keys, bytes) = (built.keys(), built.bytes());
    caches.install_known(epoch, built);
    // And this thread's heap: reading the pages freed memory here too
    // (once per load; the global purge runs again as well).
    crate::memory::give_back_freed();
    tracing::info!(
        keys,
        filter_bytes = bytes,
        read_ms,
        total_ms = started.elapsed().as_millis() as u64,
        "known-digest filter built"
    );
}
