//! Cache-miss key lookups grouped under concurrency (`authz/lookups.rs`):
//! a lone miss is asked at once; misses arriving while a lookup runs go
//! together in the next, each answered on its own.

use std::collections::HashSet;

use tokio::task::JoinHandle;

use super::*;
use crate::authz::lookups::KeyLookups;
use crate::cache::LookupBatching;

/// Lookups over `store` running at most `in_flight` queries at once.
fn lookups(store: &Arc<CountingStore>, in_flight: usize) -> Arc<KeyLookups> {
    let batching = LookupBatching {
        max_digests: 128,
        in_flight,
    };
    Arc::new(KeyLookups::new(store.clone(), batching))
}

/// A digest no key has.
fn unknown(n: u8) -> KeyDigest {
    KeyDigest::from_bytes([n; 32])
}

fn find(lookups: &Arc<KeyLookups>, digest: KeyDigest) -> JoinHandle<R<Option<Arc<KeyRecord>>>> {
    let lookups = lookups.clone();
    tokio::spawn(async move { lookups.find(&digest).await })
}

/// Waits until `n` misses wait for the running lookup.
async fn until_waiting(lookups: &KeyLookups, n: usize) {
    lookups.waiting().wait_for(|&w| w == n).await.unwrap();
}

fn set(digests: &[KeyDigest]) -> HashSet<KeyDigest> {
    digests.iter().copied().collect()
}

/// A fixture with one tenant and two keys, and a replica of it whose key
/// lookups run one at a time (a second miss waits for the first).
async fn one_lookup_at_a_time() -> (Fixture, Arc<Authenticator>, Arc<Caches>, [IssuedKey; 2]) {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "pro").await;
    let keys = [fx.key("acme").await, fx.key("acme").await];
    let settings = CacheSettings {
        lookup_batches_in_flight: 1,
        ..CacheSettings::default()
    };
    let caches = Arc::new(Caches::new(&settings));
    let auth = Arc::new(Authenticator::new(
        fx.profile.clone(),
        peppers(1, &[]),
        fx.store.clone(),
        caches.clone(),
        fx.usage.clone(),
        fx.clock.clone(),
    ));
    (fx, auth, caches, keys)
}

/// A tenant with one key, lookups one at a time, and a first lookup (of
/// a digest no key has) held inside the store: what follows waits for it.
struct Held {
    fx: Fixture,
    key: IssuedKey,
    lookups: Arc<KeyLookups>,
    hold: Arc<Hold>,
    first: JoinHandle<R<Option<Arc<KeyRecord>>>>,
}

async fn held() -> Held {
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "pro").await;
    let key = fx.key("acme").await;
    let lookups = lookups(&fx.store, 1);
    let hold = fx.store.hold_next_lookup();
    let first = find(&lookups, unknown(0));
    hold.entered.notified().await;
    Held {
        fx,
        key,
        lookups,
        hold,
        first,
    }
}

fn authenticate(auth: &Arc<Authenticator>, key: &str) -> JoinHandle<Result<Decision>> {
    let (auth, key) = (auth.clone(), key.to_owned());
    tokio::spawn(async move {
        let input = AuthInput {
            api_key: &key,
            ..Default::default()
        };
        auth.authenticate(input).await
    })
}

#[tokio::test]
async fn a_lone_miss_is_asked_at_once_with_its_digest_alone() {
    let store = Arc::new(CountingStore::default());
    let lookups = lookups(&store, 4);
    assert!(lookups.find(&unknown(1)).await.unwrap().is_none());
    assert_eq!(store.batches(), vec![vec![unknown(1)]]);
}

#[tokio::test]
async fn misses_arriving_while_a_lookup_runs_go_together_in_one_further_query() {
    let store = Arc::new(CountingStore::default());
    let lookups = lookups(&store, 1);
    let hold = store.hold_next_lookup();
    let first = find(&lookups, unknown(0));
    hold.entered.notified().await;
    let later: Vec<KeyDigest> = (1..=5).map(unknown).collect();
    let waiters: Vec<_> = later.iter().map(|d| find(&lookups, *d)).collect();
    until_waiting(&lookups, 5).await;
    hold.open.notify_one();
    assert!(first.await.unwrap().unwrap().is_none());
    for w in waiters {
        assert!(w.await.unwrap().unwrap().is_none());
    }
    let batches = store.batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[0], vec![unknown(0)]);
    assert_eq!(set(&batches[1]), set(&later));
    assert_eq!(batches[1].len(), 5);
}

#[tokio::test]
async fn a_digest_asked_by_several_waiters_is_queried_once_and_each_is_answered() {
    let Held {
        fx,
        key,
        lookups,
        hold,
        first,
    } = held().await;
    let known: Vec<_> = (0..3).map(|_| find(&lookups, key.record.digest)).collect();
    let absent: Vec<_> = (0..2).map(|_| find(&lookups, unknown(1))).collect();
    until_waiting(&lookups, 5).await;
    hold.open.notify_one();
    assert!(first.await.unwrap().unwrap().is_none());
    for w in known {
        let record = w.await.unwrap().unwrap().expect("the stored key");
        assert_eq!(record.id, key.record.id);
    }
    for w in absent {
        assert!(w.await.unwrap().unwrap().is_none());
    }
    let batches = fx.store.batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[1].len(), 2, "each digest asked once");
    assert_eq!(set(&batches[1]), set(&[key.record.digest, unknown(1)]));
}

#[tokio::test]
async fn a_batch_holds_at_most_lookup_batch_max_distinct_digests() {
    let store = Arc::new(CountingStore::default());
    let batching = LookupBatching {
        max_digests: 2,
        in_flight: 1,
    };
    let lookups = Arc::new(KeyLookups::new(store.clone(), batching));
    let hold = store.hold_next_lookup();
    let first = find(&lookups, unknown(0));
    hold.entered.notified().await;
    let waiters: Vec<_> = (1..=5).map(|n| find(&lookups, unknown(n))).collect();
    until_waiting(&lookups, 5).await;
    hold.open.notify_one();
    first.await.unwrap().unwrap();
    for w in waiters {
        assert!(w.await.unwrap().unwrap().is_none());
    }
    let sizes: Vec<usize> = store.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 2, 2, 1]);
}

#[tokio::test]
async fn a_store_error_reaches_every_waiter_of_the_batch_as_unavailable() {
    let (fx, auth, _caches, keys) = one_lookup_at_a_time().await;
    let hold = fx.store.hold_next_lookup();
    let first = authenticate(&auth, keys[0].secret.expose());
    hold.entered.notified().await;
    let waiters = [
        authenticate(&auth, keys[1].secret.expose()),
        authenticate(&auth, fx.profile.key_format.generate("live").expose()),
    ];
    until_waiting(&auth.lookups, 2).await;
    // As sqlx's pool timeout surfaces (store::postgres::map_err).
    *fx.store.failure.lock().unwrap() = Some(StoreError::Unavailable(
        "pool timed out while waiting".into(),
    ));
    hold.open.notify_one();
    for call in std::iter::once(first).chain(waiters) {
        match call.await.unwrap() {
            Err(Error::Unavailable(msg)) => assert_eq!(msg, "pool timed out while waiting"),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
    assert_eq!(fx.store.batches().len(), 2);
}

#[tokio::test]
async fn a_waiter_whose_caller_went_away_does_not_stop_the_others_being_answered() {
    let Held {
        fx,
        key,
        lookups,
        hold,
        first,
    } = held().await;
    let gone = find(&lookups, unknown(1));
    let stays = find(&lookups, key.record.digest);
    until_waiting(&lookups, 2).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    hold.open.notify_one();
    assert!(first.await.unwrap().unwrap().is_none());
    let record = stays.await.unwrap().unwrap().expect("the stored key");
    assert_eq!(record.id, key.record.id);
    // The caller that went away is not asked for.
    assert_eq!(fx.store.batches()[1], vec![key.record.digest]);
}

#[tokio::test]
async fn a_cancelled_lone_lookup_hands_the_waiting_misses_on() {
    let Held {
        fx,
        key,
        lookups,
        hold: _never_opened,
        first,
    } = held().await;
    let waiters = [
        find(&lookups, key.record.digest),
        find(&lookups, unknown(1)),
    ];
    until_waiting(&lookups, 2).await;
    // The running lookup's caller goes away; its query is never answered.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let [known, absent] = waiters;
    assert_eq!(
        known.await.unwrap().unwrap().map(|r| r.id),
        Some(key.record.id)
    );
    assert!(absent.await.unwrap().unwrap().is_none());
    let batches = fx.store.batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(set(&batches[1]), set(&[key.record.digest, unknown(1)]));
}

#[tokio::test]
async fn a_waiter_is_answered_when_the_runtime_that_ran_its_lookup_goes_away() {
    // Callers on several runtimes: the first lookup runs on a runtime of
    // its own that ends as soon as its caller has an answer, possibly
    // before the batch it started for the waiter here has run.
    let fx = Fixture::new(MSGFLASH).await;
    fx.tenant("acme", "pro").await;
    let key = fx.key("acme").await;
    let lookups = lookups(&fx.store, 1);
    let hold = fx.store.hold_next_lookup();
    let elsewhere = {
        let lookups = lookups.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(async move { lookups.find(&unknown(0)).await })
        })
    };
    hold.entered.notified().await;
    let here = find(&lookups, key.record.digest);
    until_waiting(&lookups, 1).await;
    hold.open.notify_one();
    let there = tokio::task::spawn_blocking(move || elsewhere.join().unwrap())
        .await
        .unwrap();
    assert!(there.unwrap().is_none());
    assert_eq!(
        here.await.unwrap().unwrap().map(|r| r.id),
        Some(key.record.id)
    );
}

#[tokio::test]
async fn known_and_unknown_keys_in_one_batch_are_each_decided_and_unknown_ones_negatively_cached() {
    let (fx, auth, caches, keys) = one_lookup_at_a_time().await;
    let pepper = peppers(1, &[]);
    let strangers = [
        fx.profile.key_format.generate("live"),
        fx.profile.key_format.generate("live"),
    ];
    let hold = fx.store.hold_next_lookup();
    let first = authenticate(&auth, strangers[0].expose());
    hold.entered.notified().await;
    let allowed_calls = [
        authenticate(&auth, keys[0].secret.expose()),
        authenticate(&auth, keys[1].secret.expose()),
        authenticate(&auth, keys[0].secret.expose()),
    ];
    let refused = authenticate(&auth, strangers[1].expose());
    until_waiting(&auth.lookups, 4).await;
    hold.open.notify_one();
    assert_eq!(denied(first.await.unwrap().unwrap()), Reason::KeyUnknown);
    let ids: Vec<_> = futures::future::join_all(allowed_calls)
        .await
        .into_iter()
        .map(|d| allowed(d.unwrap().unwrap()).key_id)
        .collect();
    assert_eq!(
        ids,
        [
            Some(keys[0].record.id),
            Some(keys[1].record.id),
            Some(keys[0].record.id)
        ]
    );
    assert_eq!(denied(refused.await.unwrap().unwrap()), Reason::KeyUnknown);
    let batches = fx.store.batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    let stranger = pepper.current().digest(strangers[1].expose());
    assert_eq!(
        set(&batches[1]),
        set(&[keys[0].record.digest, keys[1].record.digest, stranger])
    );
    assert_eq!(batches[1].len(), 3);
    // The unknown ones are remembered as such; the known ones are cached.
    assert!(caches.is_unknown(&stranger));
    assert!(caches.is_unknown(&pepper.current().digest(strangers[0].expose())));
    let lookups = fx.store.key_lookups.load(SeqCst);
    let again = authenticate(&auth, strangers[1].expose()).await.unwrap();
    assert_eq!(denied(again.unwrap()), Reason::KeyUnknown);
    allowed(
        authenticate(&auth, keys[1].secret.expose())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(fx.store.key_lookups.load(SeqCst), lookups);
}
