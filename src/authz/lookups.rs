//! Cache-miss key lookups, grouped into few store queries ("group commit").
//!
//! A miss is asked at once, alone, in the caller's own future while fewer
//! than `in_flight` lookups run: no timer, no wait without concurrency. A
//! miss arriving while `in_flight` run waits in a queue; when one of them
//! ends, the queue (up to `max_digests` distinct digests) goes as the next
//! query, in a task spawned on the runtime of whoever ended it, so no
//! caller's cancellation strands the others and callers may live on
//! different runtimes. Each waiter gets its own answer, or the query's
//! error. A waiter whose query was dropped unanswered (its runtime shut
//! down) asks again.
//!
//! A waiter's query always starts after it queued (a batch takes the queue
//! as it starts), so the cache generation it noted before asking still
//! guards what it caches (`cache.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::cache::LookupBatching;
use crate::crypto::KeyDigest;
use crate::domain::KeyRecord;
use crate::store::{Store, StoreError};
use crate::telemetry;

/// What one waiter is told: its key as decisions keep it
/// ([`KeyRecord::for_decisions`], shared by every waiter for that digest),
/// none, or the query's error.
type Answer = Result<Option<Arc<KeyRecord>>, StoreError>;

/// One replica's cache-miss key lookups.
pub(crate) struct KeyLookups {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    batching: LookupBatching,
    state: Mutex<State>,
    /// Misses waiting, for tests to wait on instead of sleeping.
    #[cfg(test)]
    waiting: tokio::sync::watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    /// Queries running now (lone misses and batches).
    running: usize,
    waiting: VecDeque<Waiter>,
}

struct Waiter {
    digest: KeyDigest,
    answer: oneshot::Sender<Answer>,
    home: Home,
}

/// Where a waiter waits: its thread and that thread's runtime. A batch
/// answers the callers on each other thread in one task spawned there, so
/// it wakes each other runtime once (one eventfd write), not once per
/// waiter (connection workers are one runtime per thread).
struct Home {
    thread: ThreadId,
    runtime: Option<Handle>,
}

impl Home {
    fn here() -> Self {
        Self {
            thread: std::thread::current().id(),
            runtime: Handle::try_current().ok(),
        }
    }
}

/// The waiters one query answers, and the distinct digests it asks for.
struct Batch {
    digests: Vec<KeyDigest>,
    waiters: Vec<Waiter>,
}

/// One running query's place among `in_flight`; given up on drop (query
/// done or its future dropped), which starts the next batch if misses wait.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl KeyLookups {
    pub(crate) fn new(store: Arc<dyn Store>, batching: LookupBatching) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                batching,
                state: Mutex::default(),
                #[cfg(test)]
                waiting: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// The stored key whose digest is `digest` (compared in constant time),
    /// read alone or with other misses waiting at the same moment.
    pub(crate) async fn find(&self, digest: &KeyDigest) -> Answer {
        loop {
            let queued = {
                let mut state = self.shared.lock();
                if state.running < self.shared.batching.in_flight && state.waiting.is_empty() {
                    state.running += 1;
                    None
                } else {
                    let (answer, told) = oneshot::channel();
                    state.waiting.push_back(Waiter {
                        digest: *digest,
                        answer,
                        home: Home::here(),
                    });
                    self.shared.note_waiting(&state);
                    Some(told)
                }
            };
            let Some(told) = queued else {
                let _slot = Slot(self.shared.clone());
                let records =
                    query(self.shared.store.as_ref(), std::slice::from_ref(digest)).await?;
                return Ok(records
                    .into_iter()
                    .find(|r| r.digest.ct_eq(digest))
                    .map(|r| Arc::new(r.for_decisions())));
            };
            match told.await {
                Ok(answer) => return answer,
                // Its query was dropped unanswered: ask again.
                Err(_) => continue,
            }
        }
    }

    /// Misses waiting for a query, as they change.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.waiting.subscribe()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_waiting(&self, _state: &State) {
        #[cfg(test)]
        self.waiting.send_replace(_state.waiting.len());
    }

    /// A query ended or was dropped: the next batch, if misses wait, takes
    /// its place, spawned on the current runtime.
    fn release(self: &Arc<Self>) {
        let batch = {
            let mut state = self.lock();
            state.running -= 1;
            let batch = take_batch(&mut state.waiting, self.batching.max_digests);
            if batch.is_some() {
                state.running += 1;
            }
            self.note_waiting(&state);
            batch
        };
        let Some(batch) = batch else { return };
        // Made before the task: if the runtime drops the task unpolled
        // (shutting down), the slot is still given back.
        let slot = Slot(self.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let found = query(slot.0.store.as_ref(), &batch.digests).await;
                    batch.answer(found);
                    drop(slot);
                });
            }
            Err(_) => {
                // No runtime here (a future dropped outside one): every
                // waiter is woken unanswered and asks again on its own.
                self.lock().waiting.clear();
                drop(batch);
                drop(slot);
            }
        }
    }
}

/// Takes waiters from the front of the queue up to `max` distinct digests,
/// skipping those whose caller went away.
fn take_batch(waiting: &mut VecDeque<Waiter>, max: usize) -> Option<Batch> {
    let mut digests = Vec::new();
    let mut seen = HashSet::new();
    let mut waiters = Vec::new();
    while let Some(next) = waiting.front() {
        if next.answer.is_closed() {
            waiting.pop_front();
            continue;
        }
        if !seen.contains(&next.digest) {
            if digests.len() == max {
                break;
            }
            seen.insert(next.digest);
            digests.push(next.digest);
        }
        waiters.extend(waiting.pop_front());
    }
    (!waiters.is_empty()).then_some(Batch { digests, waiters })
}

impl Batch {
    /// Gives every waiter its own record (only one whose digest equals its
    /// own), or the query's error.
    fn answer(self, found: Result<Vec<KeyRecord>, StoreError>) {
        let answers: Vec<(Waiter, Answer)> = match found {
            Ok(records) => {
                let by_digest: HashMap<KeyDigest, Arc<KeyRecord>> = records
                    .into_iter()
                    .map(|r| (r.digest, Arc::new(r.for_decisions())))
                    .collect();
                self.waiters
                    .into_iter()
                    .map(|w| {
                        let record = by_digest
                            .get(&w.digest)
                            .filter(|r| r.digest.ct_eq(&w.digest))
                            .cloned();
                        (w, Ok(record))
                    })
                    .collect()
            }
            Err(e) => self
                .waiters
                .into_iter()
                .map(|w| (w, Err(e.clone())))
                .collect(),
        };
        let (here, away) = by_home(answers, std::thread::current().id());
        // A waiter whose caller went away needs no answer: sends may fail.
        for (answer, a) in here {
            let _ = answer.send(a);
        }
        // Dropped unsent if that runtime is shutting down: its callers are
        // gone, or ask again.
        for (runtime, group) in away {
            runtime.spawn(async move {
                for (answer, a) in group {
                    let _ = answer.send(a);
                }
            });
        }
    }
}

type Delivery = (oneshot::Sender<Answer>, Answer);

/// Splits answers into those for callers on thread `here` (or on no
/// runtime) and one group per other thread, with that thread's runtime.
fn by_home(
    answers: Vec<(Waiter, Answer)>,
    here: ThreadId,
) -> (Vec<Delivery>, Vec<(Handle, Vec<Delivery>)>) {
    let mut local = Vec::new();
    let mut away: HashMap<ThreadId, (Handle, Vec<Delivery>)> = HashMap::new();
    for (w, a) in answers {
        match w.home.runtime {
            Some(runtime) if w.home.thread != here => away
                .entry(w.home.thread)
                .or_insert_with(|| (runtime, Vec::new()))
                .1
                .push((w.answer, a)),
            _ => local.push((w.answer, a)),
        }
    }
    (local, away.into_values().collect())
}

/// One store query for `digests`, its size recorded.
async fn query(store: &dyn Store, digests: &[KeyDigest]) -> Result<Vec<KeyRecord>, StoreError> {
    metrics::histogram!(telemetry::KEY_LOOKUP_BATCH_SIZE).record(digests.len() as f64);
    store.find_keys_by_digests(digests).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(thread: ThreadId, runtime: Option<&tokio::runtime::Runtime>) -> (Waiter, Answer) {
        let (answer, _told) = oneshot::channel();
        let home = Home {
            thread,
            runtime: runtime.map(|r| r.handle().clone()),
        };
        let w = Waiter {
            digest: KeyDigest::from_bytes([0; 32]),
            answer,
            home,
        };
        (w, Ok(None))
    }

    #[test]
    fn a_batch_wakes_each_other_thread_once_with_all_its_answers() {
        let other = || {
            std::thread::spawn(|| std::thread::current().id())
                .join()
                .unwrap()
        };
        let (a, b, here) = (other(), other(), std::thread::current().id());
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        };
        let (rt_a, rt_b, rt_here) = (runtime(), runtime(), runtime());
        let answers = vec![
            waiter(a, Some(&rt_a)),
            waiter(b, Some(&rt_b)),
            waiter(here, Some(&rt_here)),
            waiter(a, Some(&rt_a)),
            waiter(a, None),
            waiter(b, Some(&rt_b)),
            waiter(a, Some(&rt_a)),
        ];
        let (local, away) = by_home(answers, here);
        // This thread's caller and the one on no runtime: answered at once.
        assert_eq!(local.len(), 2);
        let mut sizes: Vec<usize> = away.iter().map(|(_, group)| group.len()).collect();
        sizes.sort();
        assert_eq!(sizes, [2, 3]);
    }
}
