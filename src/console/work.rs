//! A bounded queue in front of argon2: a few slots (one per core), a
//! bounded number of callers waiting for one, and a bounded wait. When the
//! queue is full, or the wait runs out, the caller is told to come back
//! later (`Error::Overloaded`) instead of piling up memory and latency:
//! the console's password calls are mostly unauthenticated.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The queue is full or the wait ran out; retry after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub retry_after_seconds: u64,
}

/// Slots for password hashing.
#[derive(Debug)]
pub struct WorkQueue {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
}

/// Leaves the waiting line when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WorkQueue {
    /// `slots` computations at once, `max_waiting` callers waiting at most
    /// `max_wait` each.
    pub fn new(slots: usize, max_waiting: usize, max_wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait,
        }
    }

    fn busy(&self) -> Busy {
        Busy {
            retry_after_seconds: self.max_wait.as_secs().max(1),
        }
    }

    /// A slot: at once if one is free, else after waiting in line.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(self.busy());
        }
        let _line = Waiting(&self.waiting);
        match tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(self.busy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once_and_frees_on_release() {
        let q = WorkQueue::new(1, 0, Duration::from_secs(3));
        let held = q.enter().await.unwrap();
        assert_eq!(
            q.enter().await.unwrap_err(),
            Busy {
                retry_after_seconds: 3
            }
        );
        drop(held);
        let _again = q.enter().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_the_bounded_wait() {
        let q = WorkQueue::new(1, 1, Duration::from_secs(2));
        let _held = q.enter().await.unwrap();
        // With the clock paused, the wait runs out as soon as nothing else
        // can run: no real time passes.
        assert!(q.enter().await.is_err());
        assert_eq!(q.waiting.load(Ordering::SeqCst), 0, "the line is left");
    }
}
