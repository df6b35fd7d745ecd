//! Cache-miss key lookups grouped into one Postgres statement
//! (`Store::find_keys_by_digests`, used by `authz/lookups.rs`).

use std::collections::HashSet;
use std::sync::Mutex;

use tollgate::clock::Clock;
use tollgate::crypto::KeyDigest;
use tollgate::manage::{CreateKeyInput, CreateTenantInput, Manager};
use tollgate::store::Store;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use super::*;

/// The SQL statements sqlx runs on this thread while it is the default
/// subscriber here (sqlx reports each one as a `sqlx::query` event).
#[derive(Clone, Default)]
struct Statements(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for Statements {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0 += &format!("{}={v:?} ", f.name());
            }
        }
        if event.metadata().target() == "sqlx::query" {
            let mut text = Text(String::new());
            event.record(&mut text);
            self.0.lock().unwrap().push(text.0);
        }
    }
}

#[sqlx::test]
async fn a_batched_key_lookup_reads_exactly_the_stored_keys_asked_for_in_one_statement(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let store: Arc<PostgresStore> = Arc::new(PostgresStore::new(pool(&conn).await));
    let manager = Manager::new(
        Arc::new(profile("msgflash")),
        peppers(),
        store.clone(),
        Clock::default(),
    );
    manager
        .create_tenant(CreateTenantInput {
            tenant_id: "acme".into(),
            name: "Acme".into(),
            plan: "pro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut digests = Vec::new();
    for name in ["asked", "asked-too", "not-asked"] {
        let input = CreateKeyInput {
            tenant_id: "acme".into(),
            name: name.into(),
            ..Default::default()
        };
        digests.push(manager.create_key(input).await.unwrap().record.digest);
    }
    let [first, second, _not_asked] = digests[..] else {
        unreachable!()
    };
    let unknown = [
        KeyDigest::from_bytes([7; 32]),
        KeyDigest::from_bytes([8; 32]),
    ];
    let asked = [first, unknown[0], second, first, unknown[1], second];

    let statements = Statements::default();
    let found = {
        let _here = tracing::dispatcher::set_default(&tracing::Dispatch::new(
            tracing_subscriber::registry().with(statements.clone()),
        ));
        store.find_keys_by_digests(&asked).await.unwrap()
    };

    let statements = statements.0.lock().unwrap().clone();
    assert_eq!(statements.len(), 1, "{statements:#?}");
    assert!(statements[0].contains("ANY($1)"), "{}", statements[0]);
    // Each stored key asked for, once, exactly as a single lookup reads it.
    assert_eq!(found.len(), 2, "{found:?}");
    let found_digests: HashSet<KeyDigest> = found.iter().map(|r| r.digest).collect();
    assert_eq!(found_digests, HashSet::from([first, second]));
    for record in &found {
        let alone = store.find_key_by_digest(&record.digest).await.unwrap();
        assert_eq!(alone.as_ref(), Some(record));
    }
    // Nothing asked, nothing read; only unknown digests, no record.
    assert!(store.find_keys_by_digests(&[]).await.unwrap().is_empty());
    assert!(store
        .find_keys_by_digests(&unknown)
        .await
        .unwrap()
        .is_empty());
}
