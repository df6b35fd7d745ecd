//! Connection workers: the gRPC port served by several current-thread
//! runtimes, one OS thread each. The accept loop runs on the main runtime
//! and deals every accepted connection, round-robin, to the next worker;
//! that worker then runs the connection (TLS, HTTP/2, every call on it)
//! without waking another thread. A tokio worker per core pays 5–10 µs
//! of cross-thread wake-ups per call on the cached paths (BENCHMARKS.md
//! §2); this shape does not, and still uses every core.
//!
//! Lifetimes: stopping (`Stop::graceful`) ends the accept loop and lets
//! each worker finish its in-flight calls (tonic's graceful shutdown).
//! The worker threads, and with them their runtimes, live on until
//! [`Lifetime`] is dropped: database connections a worker opened are
//! registered with its runtime and stay usable by the final flushes of
//! shutdown, which run after the calls have drained.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Router;

use crate::net::Slotted;

/// Ends the worker threads (and any call still running on them) when
/// dropped. Held by `Running` until its shutdown has flushed everything.
#[derive(Debug)]
pub struct Lifetime {
    exit: watch::Sender<bool>,
    dealt: Arc<[AtomicU64]>,
}

impl Lifetime {
    /// Connections dealt to each worker so far.
    pub fn dealt(&self) -> Vec<u64> {
        self.dealt
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        let _ = self.exit.send(true);
    }
}

/// The number of connection workers when none is configured: one per core
/// this process may use (cgroup CPU limits included), at least one.
pub fn per_core() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `n` connection workers serving `router` and returns the future
/// of the accept loop (it resolves once `stop` resolves and every worker
/// has drained its calls) with the workers' [`Lifetime`].
pub fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<Arc<crate::tls::Reloading>>,
    n: usize,
    slots: crate::net::Slots,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(
    impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    Lifetime,
)> {
    let (exit, exiting) = watch::channel(false);
    let (drain, draining) = watch::channel(false);
    let n = n.max(1);
    let dealt: Arc<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let mut deal = Vec::with_capacity(n);
    let mut done = Vec::with_capacity(n);
    for worker in 0..n {
        let (tx, rx) = mpsc::unbounded_channel::<Dealt>();
        let (served_tx, served) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (router, tls) = (router.clone(), tls.clone());
        let (mut exiting, mut draining) = (exiting.clone(), draining.clone());
        std::thread::Builder::new()
            .name(format!("tollgate-conn-{worker}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let exit = exiting.clone();
                    let drained = async move {
                        let _ = draining.wait_for(|d| *d).await;
                    };
                    let served = tokio::select! {
                        served = run(router, rx, tls, drained) => served,
                        _ = wait_for_exit(exit) => Ok(()),
                    };
                    let _ = served_tx.send(served);
                    // Keep the runtime (and the I/O it owns) alive until
                    // the process is done with it.
                    let _ = exiting.wait_for(|e| *e).await;
                });
            })?;
        deal.push(tx);
        done.push(served);
    }
    let counts = dealt.clone();
    let accept = async move {
        let mut stop = std::pin::pin!(stop);
        let mut next = 0usize;
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, _)) => {
                    // Over the cap: closed on arrival (dropped), counted.
                    let Some(slot) = slots.take() else { continue };
                    let Ok(tcp) = tcp.into_std() else { continue };
                    if deal_to_next(&deal, &counts, &mut next, (tcp, slot)).is_err() {
                        tracing::error!("every connection worker is gone; the gRPC port stops");
                        break;
                    }
                }
                Err(e) => tokio::select! {
                    () = &mut stop => break,
                    () = crate::net::accept_failed("grpc", &e) => {}
                },
            }
        }
        drop(listener);
        drop(deal);
        let _ = drain.send(true);
        let mut result = Ok(());
        for served in done {
            match served.await {
                Ok(Err(e)) if result.is_ok() => result = Err(e),
                Ok(_) => {}
                Err(_) => tracing::error!("a connection worker stopped unexpectedly"),
            }
        }
        result
    };
    Ok((accept, Lifetime { exit, dealt }))
}

/// Deals `tcp` to the next worker in turn; a worker that is gone (its
/// thread ended) is passed over. `Err` only when every worker is gone.
fn deal_to_next(
    deal: &[mpsc::UnboundedSender<Dealt>],
    counts: &[AtomicU64],
    next: &mut usize,
    mut tcp: Dealt,
) -> Result<(), ()> {
    for _ in 0..deal.len() {
        let worker = *next % deal.len();
        *next = next.wrapping_add(1);
        match deal[worker].send(tcp) {
            Ok(()) => {
                counts[worker].fetch_add(1, Ordering::Relaxed);
                metrics::counter!(
                    crate::telemetry::CONNECTIONS_DEALT,
                    "worker" => worker.to_string()
                )
                .increment(1);
                return Ok(());
            }
            Err(mpsc::error::SendError(back)) => tcp = back,
        }
    }
    Err(())
}

async fn wait_for_exit(mut exiting: watch::Receiver<bool>) {
    let _ = exiting.wait_for(|e| *e).await;
}

/// A connection dealt to a worker, with the port slot it holds.
type Dealt = (std::net::TcpStream, OwnedSemaphorePermit);

/// One worker: serves the connections dealt to it until `drained`.
async fn run(
    router: Router,
    dealt: mpsc::UnboundedReceiver<Dealt>,
    tls: Option<Arc<crate::tls::Reloading>>,
    drained: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // Registers each connection with this worker's runtime.
    let tcp = UnboundedReceiverStream::new(dealt).filter_map(|(std, slot)| {
        let tcp = TcpStream::from_std(std).ok()?;
        // Small gRPC frames must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        Some(Slotted::new(tcp, slot))
    });
    match tls {
        Some(tls) => {
            let incoming = crate::tls::handshakes(Box::pin(tcp), tls);
            router.serve_with_incoming_shutdown(incoming, drained).await
        }
        None => {
            let incoming = tcp.map(Ok::<_, std::io::Error>);
            router.serve_with_incoming_shutdown(incoming, drained).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(listener: &std::net::TcpListener) -> Dealt {
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let slot = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        (tcp, slot)
    }

    #[test]
    fn connections_go_to_each_worker_in_turn_passing_over_workers_that_are_gone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut deal, mut receivers) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (tx, rx) = mpsc::unbounded_channel();
            deal.push(tx);
            receivers.push(Some(rx));
        }
        let counts: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let mut next = 0;
        for _ in 0..3 {
            deal_to_next(&deal, &counts, &mut next, connection(&listener)).unwrap();
        }
        // Worker 1's thread ended: its connections go to the others.
        receivers[1] = None;
        for _ in 0..3 {
            deal_to_next(&deal, &counts, &mut next, connection(&listener)).unwrap();
        }
        let dealt: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(dealt, [3, 1, 2]);
        receivers.clear();
        assert!(
            deal_to_next(&deal, &counts, &mut next, connection(&listener)).is_err(),
            "no worker left"
        );
    }
}
