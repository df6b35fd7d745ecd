//! Unit tests of the lock-free per-key counters and their flush.

use super::*;
use std::sync::Arc;

#[tokio::test]
async fn counts_are_exact_per_key_and_drained_once() {
    let counts = RequestCounts::default();
    let (a, b) = (KeyId::new_v4(), KeyId::new_v4());
    for _ in 0..5 {
        counts.count(a, true);
    }
    counts.count(a, false);
    counts.count(b, false);
    let mut drained = counts.drain().await;
    drained.sort_by_key(|c| c.allowed);
    assert_eq!(
        drained,
        vec![
            KeyCounts {
                key: b,
                allowed: 0,
                denied: 1
            },
            KeyCounts {
                key: a,
                allowed: 5,
                denied: 1
            },
        ]
    );
    assert!(counts.drain().await.is_empty(), "drained once");
    counts.restore(&[KeyCounts {
        key: a,
        allowed: 2,
        denied: 0,
    }]);
    counts.count(a, true);
    assert_eq!(
        counts.drain().await,
        vec![KeyCounts {
            key: a,
            allowed: 3,
            denied: 0
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_counts_and_flushes_lose_nothing() {
    let counts = Arc::new(RequestCounts::default());
    let keys: Vec<KeyId> = (0..8).map(|_| KeyId::new_v4()).collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (counts, keys) = (counts.clone(), keys.clone());
            std::thread::spawn(move || {
                for i in 0..20_000 {
                    counts.count(keys[(i + t) % keys.len()], i % 3 != 0);
                }
            })
        })
        .collect();
    let mut total = (0, 0);
    while threads.iter().any(|t| !t.is_finished()) {
        for c in counts.drain().await {
            total = (total.0 + c.allowed, total.1 + c.denied);
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    for c in counts.drain().await {
        total = (total.0 + c.allowed, total.1 + c.denied);
    }
    let denied_per_thread = (0..20_000).filter(|i| i % 3 == 0).count() as u64;
    assert_eq!(
        total,
        (4 * (20_000 - denied_per_thread), 4 * denied_per_thread)
    );
    assert_eq!(counts.overflowed(), 0);
}

#[tokio::test]
async fn flushes_add_up_per_hour_and_per_utc_day_in_the_memory_store() {
    use crate::domain::usage::{day_of, hour_of};
    use crate::store::{MemoryStore, Store};
    let store = MemoryStore::new();
    let counts = RequestCounts::default();
    let key = KeyId::new_v4();
    // 23:00:10 UTC, then 00:00:10 the next day.
    let day = 1_800_000_000 - 1_800_000_000 % 86_400;
    let late = chrono::DateTime::from_timestamp(day + 23 * 3600 + 10, 0).unwrap();
    let next = late + chrono::Duration::hours(1);
    counts.count(key, true);
    counts.count(key, true);
    assert_eq!(counts.flush(&store, late).await.unwrap(), 1);
    counts.count(key, false);
    assert_eq!(counts.flush(&store, next).await.unwrap(), 1);
    counts.count(key, true);
    assert_eq!(counts.flush(&store, next).await.unwrap(), 1);
    let series = store
        .request_counts(key, day_of(late), hour_of(late))
        .await
        .unwrap();
    let totals = |v: &[crate::domain::usage::RequestTotal]| {
        v.iter()
            .map(|t| (t.start.timestamp(), t.allowed, t.denied))
            .collect::<Vec<_>>()
    };
    let midnight = day + 86_400;
    assert_eq!(totals(&series.daily), vec![(day, 2, 0), (midnight, 1, 1)]);
    assert_eq!(
        totals(&series.hourly),
        vec![(day + 23 * 3600, 2, 0), (midnight, 1, 1)]
    );
    let later = store
        .request_counts(key, day_of(next), hour_of(next))
        .await
        .unwrap();
    assert_eq!(totals(&later.daily), vec![(midnight, 1, 1)]);
}

#[tokio::test]
async fn a_full_table_counts_overflow_instead_of_blocking() {
    let counts = RequestCounts::default();
    for _ in 0..SLOTS + 100 {
        counts.count(KeyId::new_v4(), true);
    }
    let drained = counts.drain().await.len() as u64;
    assert_eq!(drained + counts.overflowed(), (SLOTS + 100) as u64);
    assert!(counts.overflowed() >= 100);
}

#[test]
fn a_batch_names_each_key_once_in_key_order() {
    let (a, b) = (KeyId::from_u128(1), KeyId::from_u128(2));
    let batch = vec![
        KeyCounts {
            key: b,
            allowed: 1,
            denied: 0,
        },
        KeyCounts {
            key: a,
            allowed: 2,
            denied: 1,
        },
        KeyCounts {
            key: b,
            allowed: 0,
            denied: 3,
        },
    ];
    assert_eq!(
        merge_by_key(batch),
        vec![
            KeyCounts {
                key: a,
                allowed: 2,
                denied: 1
            },
            KeyCounts {
                key: b,
                allowed: 1,
                denied: 3
            },
        ]
    );
}
