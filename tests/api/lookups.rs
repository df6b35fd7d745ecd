//! Cache-miss key lookups grouped into one Postgres statement
//! (`Store::find_keys_by_digests`, used by `authz/lookups.rs`).

use std::collections::HashSet;

use tollgate::clock::Clock;
use tollgate::crypto::KeyDigest;
use tollgate::domain::KeyRecord;
use tollgate::manage::{CreateKeyInput, CreateTenantInput, Manager};
use tollgate::store::Store;
use tonic::transport::Endpoint;

use super::*;

#[sqlx::test]
async fn a_batched_key_lookup_reads_exactly_the_stored_keys_asked_for(
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
    // Every column a decision reads set to something other than its
    // default on one key, so a column read out of place shows.
    sqlx::query(
        "UPDATE api_keys SET scopes = ARRAY['messages:send', 'reports:read'], \
         expires_at = now() + interval '1 day', revoked_at = now(), replaced_by = key_id, \
         limits = '[{\"scope\": \"key\", \"period\": \"minute\", \"limit\": 5}]', \
         labels = '{\"team\": \"billing\"}', pepper_version = 7 WHERE digest = $1",
    )
    .bind(&first.as_bytes()[..])
    .execute(&pool(&conn).await)
    .await
    .unwrap();
    let unknown = [
        KeyDigest::from_bytes([7; 32]),
        KeyDigest::from_bytes([8; 32]),
    ];
    let asked = [first, unknown[0], second, first, unknown[1], second];

    // One `= ANY($1)` statement (`postgres/keys.rs`); how many statements
    // concurrent misses take is asserted at the trait (authz/tests/lookups.rs).
    let found = store.find_keys_by_digests(&asked).await.unwrap();

    // Each stored key asked for, once.
    assert_eq!(found.len(), 2, "{found:?}");
    let found_digests: HashSet<KeyDigest> = found.iter().map(|r| r.digest).collect();
    assert_eq!(found_digests, HashSet::from([first, second]));
    let changed = found.iter().find(|r| r.digest == first).unwrap();
    assert_eq!(changed.scopes, ["messages:send", "reports:read"]);
    assert!(changed.is_revoked() && changed.expires_at.is_some());
    assert_eq!(changed.replaced_by, Some(changed.id));
    assert_eq!(changed.pepper_version, 7);
    assert_eq!(changed.limits.as_ref().map(Vec::len), Some(1));
    for record in &found {
        // Exactly as a single lookup reads it, as decisions keep it (the
        // display-only columns are not read).
        let alone = store.find_key_by_digest(&record.digest).await.unwrap();
        assert_eq!(alone.map(KeyRecord::for_decisions).as_ref(), Some(record));
    }
    // Nothing asked, nothing read; only unknown digests, no record.
    assert!(store.find_keys_by_digests(&[]).await.unwrap().is_empty());
    assert!(store
        .find_keys_by_digests(&unknown)
        .await
        .unwrap()
        .is_empty());
}

#[sqlx::test]
async fn concurrent_misses_on_several_connection_workers_are_each_answered_with_their_own_key(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let spy = Arc::new(SpyStore::new(Arc::new(PostgresStore::new(
        pool(&conn).await,
    ))));
    let mut opts = Options::new(profile("msgflash"));
    opts.connection_workers = 2;
    // Every decision misses the key cache, as after a flush.
    opts.cache.benchmark_bypass_key_cache = true;
    let mut t = spawn_on_store(spy.clone(), opts).await;
    t.create_tenant("acme", "pro").await;
    let mut keys = Vec::new();
    for _ in 0..8 {
        keys.push(t.create_key("acme").await);
    }
    let strangers: Vec<String> = (0..8)
        .map(|_| t.profile.key_format.generate("live").expose().to_owned())
        .collect();
    let (reads, digests) = (spy.key_reads(), spy.batched_digests());

    // Four connections, dealt to the two workers in turn, 64 calls at once.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = Endpoint::from_shared(format!("http://{}", t.running.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(pb::auth_service_client::AuthServiceClient::new(channel));
    }
    let calls = (0..64).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let (secret, expected) = match i % 2 {
            0 => (
                keys[i / 2 % 8].0.clone(),
                Some(keys[i / 2 % 8].1.key_id.clone()),
            ),
            _ => (strangers[i / 2 % 8].clone(), None),
        };
        async move {
            let r = client
                .authenticate(pb::AuthenticateRequest {
                    api_key: secret,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (
                r.principal.map(|p| p.key_id),
                expected,
                r.denial.map(|d| d.reason),
            )
        }
    });
    for (got, expected, denial) in futures::future::join_all(calls).await {
        match expected {
            Some(_) => assert_eq!(got, expected, "{denial:?}"),
            None => assert_eq!(denial.as_deref(), Some("KEY_UNKNOWN")),
        }
    }
    // Every key and stranger was read (a digest at most once per batch, a
    // stranger's then remembered as unknown); never more statements than
    // digests asked for.
    let (reads, digests) = (spy.key_reads() - reads, spy.batched_digests() - digests);
    eprintln!("{reads} statements for {digests} digests, 64 calls");
    assert!((16..=64).contains(&digests), "{digests} digests");
    assert!(reads <= digests, "{reads} statements for {digests} digests");
}
