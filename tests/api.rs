//! The core service over real gRPC against real Postgres: keys, tenants,
//! plans, replicas and invalidation, bad input, outages.

mod common;
#[path = "support/spy_store.rs"]
mod spy_store;

use std::sync::Arc;

use common::*;
use spy_store::SpyStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;
use tollgate::store::{Invalidation, PostgresStore};

#[path = "api/callers.rs"]
mod callers;
#[path = "api/keys.rs"]
mod keys;
#[path = "api/lookups.rs"]
mod lookups;
#[path = "api/outage.rs"]
mod outage;
#[path = "api/products.rs"]
mod products;
#[path = "api/tenants.rs"]
mod tenants;

/// A replica whose store is watched by a [`SpyStore`] (its reads counted,
/// its invalidation feed held back on demand).
async fn spawn_spied(conn: &PgConnectOptions, profile_name: &str) -> (Tollgate, Arc<SpyStore>) {
    let spy = Arc::new(SpyStore::new(Arc::new(PostgresStore::new(
        pool(conn).await,
    ))));
    let t = spawn_on_store(spy.clone(), Options::new(profile(profile_name))).await;
    (t, spy)
}
