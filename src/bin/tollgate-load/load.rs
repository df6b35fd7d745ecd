//! The load loop: connections, concurrency, warm-up, optional pacing, and
//! an HDR histogram of latencies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::MissedTickBehavior;
use tonic::transport::{Channel, Endpoint};

use crate::scenario::Scenario;

/// How hard to push.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadOpts {
    /// HTTP/2 connections to open.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight (spread over the connections).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Total requests per second (paced); unset = as fast as answers come.
    #[arg(long)]
    pub rate: Option<u64>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub concurrency: usize,
    pub connections: usize,
    pub rate: Option<u64>,
    /// A sample error, when there were any.
    pub first_error: Option<String>,
}

impl Report {
    /// One line for people.
    pub fn line(&self) -> String {
        format!(
            "{:<28} {:>9.0} req/s  p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  allowed {} denied {} errors {}",
            self.name, self.rps, self.p50_us, self.p99_us, self.p999_us, self.allowed, self.denied, self.errors
        )
    }
}

/// Opens `n` separate HTTP/2 connections to `target`.
pub async fn connect(target: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = Endpoint::from_shared(target.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {target}"))?;
        out.push(ch);
    }
    Ok(out)
}

#[derive(Default)]
struct Tally {
    allowed: u64,
    denied: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `scenario` against `target` and reports.
pub async fn run(
    name: &str,
    target: &str,
    scenario: Arc<Scenario>,
    opts: &LoadOpts,
) -> anyhow::Result<Report> {
    let channels = connect(target, opts.connections).await?;
    let concurrency = opts.concurrency.max(1);
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let period = opts
        .rate
        .map(|r| Duration::from_secs_f64(concurrency as f64 / r.max(1) as f64));
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let channel = channels[t % channels.len()].clone();
        let scenario = scenario.clone();
        let (recording, stop) = (recording.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)
                .expect("valid histogram bounds");
            let mut tally = Tally::default();
            let mut client = scenario.client(channel);
            let mut ticker = period.map(|p| {
                let mut i = tokio::time::interval_at(
                    tokio::time::Instant::now() + p.mul_f64(t as f64 / concurrency as f64),
                    p,
                );
                i.set_missed_tick_behavior(MissedTickBehavior::Burst);
                i
            });
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let started = Instant::now();
                let outcome = client.call(i).await;
                let took = started.elapsed();
                i = i.wrapping_add(concurrency);
                if !recording.load(Ordering::Relaxed) {
                    continue;
                }
                let _ = hist.record((took.as_nanos() as u64).clamp(1_000, 60_000_000_000));
                match outcome {
                    Ok(true) => tally.allowed += 1,
                    Ok(false) => tally.denied += 1,
                    Err(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (hist, tally)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(opts.warmup)).await;
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.duration)).await;
    recording.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);

    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut tally = Tally::default();
    for task in tasks {
        let (h, t) = task.await?;
        hist.add(&h)?;
        tally.allowed += t.allowed;
        tally.denied += t.denied;
        tally.errors += t.errors;
        if tally.first_error.is_none() {
            tally.first_error = t.first_error;
        }
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1_000.0;
    let requests = hist.len();
    Ok(Report {
        name: name.to_owned(),
        requests,
        allowed: tally.allowed,
        denied: tally.denied,
        errors: tally.errors,
        seconds,
        rps: requests as f64 / seconds,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: hist.max() as f64 / 1_000.0,
        concurrency,
        connections: channels.len(),
        rate: opts.rate,
        first_error: tally.first_error,
    })
}
