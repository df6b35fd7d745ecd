//! Micro-benchmarks of the request hot path, in-process (no gRPC, no
//! Postgres). Every bench checks once, outside the timed loop, that the
//! operation did what it should, so a broken setup fails loudly instead of
//! timing a denial.
//!
//! - `key/parse_and_checksum`: strict parse of a default-profile key (`tg_`,
//!   64 hex characters) including the CRC32 check.
//!   `key/parse_and_checksum_base62`: the same for a MailSage key (`ms_`,
//!   20 base62 characters).
//! - `key/digest`: `HMAC-SHA256(pepper, key)`, the store lookup digest.
//! - `decide/cached`: `Authenticator::decide` (cost 1) over the in-memory
//!   store, for a key and tenant already in the caches; enterprise plan, so
//!   no limits apply. `decide/cached_with_rate_limit`: the same with a key
//!   carrying its own (never reached) per-second rate limit, so one GCRA cell
//!   is taken per decision. `decide/cached_with_quota`: a key with its own
//!   (never reached) monthly quota, so one unit is taken from the local lease.
//!   `decide/cached_counted`: `decide/cached` with per-key request counting
//!   on (`RequestCounts`, as the server runs): its cost is the difference.
//! - `request_counts/count`: one `RequestCounts::count` (a key's slot found,
//!   one atomic add), what counting adds to a decision;
//!   `request_counts/count_1000_keys`: the same over 1,000 keys in turn.
//! - `check_quota/cached_credential`: `Authenticator::check_quota` by API key
//!   (identify, then consume 1 of that quota), as the CheckQuota RPC does.
//! - `runtime/block_on_ready`: `block_on` of an already-ready future on the
//!   current-thread runtime the `decide` benches run on: their harness
//!   overhead, to subtract.
//! - `gcra/cell_take`: `Cell::take` on the allowing path (time advances one
//!   emission interval per call). `gcra/step`: the pure GCRA step.
//! - `quota/lease_take`: `Quotas::take` served from a lease already held
//!   locally (the fast path, no store round trip), polled once without a
//!   runtime `block_on`.
//!
//! The `decide` and `check_quota` benches run over a [`SpyStore`] (the
//! in-memory store, its reads counted) and assert that no key or tenant
//! read happened while they were timed: a change that bypassed the caches
//! would fail them, not just time slower. `cargo test --benches` (part of
//! `scripts/test`) runs every bench once, with these checks.
//!
//! Run: `cargo bench --bench hotpath`; a quick pass:
//! `cargo bench --bench hotpath -- --warm-up-time 1 --measurement-time 2`;
//! one group: `cargo bench --bench hotpath -- decide`.

use std::hint::black_box;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use tokio::runtime::Runtime;

use tollgate::authz::{AuthInput, Authenticator, QuotaSubject, RequestCounts, UsageRecorder};
use tollgate::cache::{CacheSettings, Caches};
use tollgate::clock::Clock;
use tollgate::crypto::{Pepper, Peppers};
use tollgate::domain::{Decision, LimitPeriod, LimitScope, LimitSpec, TenantId, Verdict};
use tollgate::limits::gcra::{step, Cell, Rate};
use tollgate::limits::quota::Quotas;
use tollgate::limits::{quota_counter, Subject};
use tollgate::manage::{CreateKeyInput, CreateTenantInput, Manager};
use tollgate::profile::Profile;
use tollgate::store::{MemoryStore, Store};

#[path = "../tests/support/spy_store.rs"]
mod spy_store;
use spy_store::SpyStore;

const MAILSAGE: &str = include_str!("../profiles/mailsage.toml");
const SEC: u64 = 1_000_000_000;

fn pepper() -> Pepper {
    Pepper::new(1, vec![0x5a; Pepper::MIN_LEN]).expect("a 32-byte pepper")
}

fn current_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn key_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("key");

    let default = Profile::embedded_default();
    let key = default.key_format.generate("live").into_exposed();
    let parsed = default
        .key_format
        .parse(&key)
        .expect("a generated key parses");
    assert_eq!(parsed.environment(), "live");
    g.bench_function("parse_and_checksum", |b| {
        b.iter(|| default.key_format.parse(black_box(&key)))
    });

    let mailsage = Profile::from_toml(MAILSAGE).expect("the MailSage profile is valid");
    let ms_key = mailsage.key_format.generate("live").into_exposed();
    assert!(ms_key.starts_with("ms_live_"));
    assert!(mailsage.key_format.parse(&ms_key).is_ok());
    g.bench_function("parse_and_checksum_base62", |b| {
        b.iter(|| mailsage.key_format.parse(black_box(&ms_key)))
    });

    let pepper = pepper();
    assert_eq!(pepper.digest(&key), pepper.digest(&key));
    assert_ne!(pepper.digest(&key), pepper.digest(&ms_key));
    g.bench_function("digest", |b| b.iter(|| pepper.digest(black_box(&key))));

    g.finish();
}

/// One replica over the in-memory store: an `Authenticator` and a `Manager`
/// sharing profile, peppers, clock and caches, as `app::start` wires them.
struct Replica {
    auth: Authenticator,
    manager: Manager,
    caches: Arc<Caches>,
    /// The store, its key and tenant reads counted.
    store: Arc<SpyStore>,
}

impl Replica {
    fn new() -> Self {
        Self::with_counts(None)
    }

    /// With per-key request counting on (as `app::start` wires it).
    fn with_counts(counts: Option<Arc<RequestCounts>>) -> Self {
        let profile = Arc::new(Profile::embedded_default());
        let peppers = || Peppers::new(pepper(), vec![]).expect("one pepper");
        let spy = Arc::new(SpyStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn Store> = spy.clone();
        let clock = Clock::system();
        let caches = Arc::new(Caches::new(&CacheSettings::default()));
        let auth = Authenticator::new(
            profile.clone(),
            peppers(),
            store.clone(),
            caches.clone(),
            Arc::new(UsageRecorder::default()),
            clock.clone(),
        );
        let auth = match counts {
            Some(counts) => auth.with_request_counts(counts),
            None => auth,
        };
        let manager = Manager::new(profile, peppers(), store, clock).with_caches(caches.clone());
        Self {
            auth,
            manager,
            caches,
            store: spy,
        }
    }

    /// Fails if the store was read since `before` (the caches answered).
    fn assert_no_reads_since(&self, before: usize, bench: &str) {
        let reads = self.store.reads() - before;
        assert_eq!(reads, 0, "{bench}: {reads} store reads while timed");
    }

    /// Creates a key of `tenant` with its own `limits` (empty: the plan's).
    async fn key(&self, tenant: &str, limits: Vec<LimitSpec>) -> String {
        let issued = self
            .manager
            .create_key(CreateKeyInput {
                tenant_id: tenant.into(),
                name: "bench key".into(),
                limits,
                ..Default::default()
            })
            .await
            .expect("key created");
        issued.secret.into_exposed()
    }

    /// One decision, as the Authenticate RPC / ext_authz Check make it.
    async fn decide(&self, key: &str, scopes: &[String]) -> Verdict {
        let input = AuthInput {
            api_key: key,
            required_scopes: scopes,
            ..AuthInput::default()
        };
        self.auth.decide(input, 1).await.expect("no store error")
    }
}

fn assert_allowed(v: &Verdict, limits: &[&str]) {
    assert!(
        matches!(v.decision, Decision::Allow(_)),
        "decision should allow: {v:?}"
    );
    let names: Vec<&str> = v.limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, limits, "limits evaluated");
    assert_eq!(v.shadow_denial, None);
}

fn decide_benches(c: &mut Criterion) {
    let rt = current_thread_runtime();
    let replica = Replica::new();
    let scopes = vec!["read".to_string()];
    // Enterprise: no plan limits. The second key's own limit is far above
    // any rate this loop reaches: 10^9 per second, burst 10^9.
    let per_second = LimitSpec {
        scope: LimitScope::Key,
        period: LimitPeriod::Second,
        limit: 1_000_000_000,
        burst: None,
        environments: vec![],
    };
    // A key quota far above what the loop consumes: 10^12 a month.
    let per_month = LimitSpec {
        scope: LimitScope::Key,
        period: LimitPeriod::Month,
        limit: 1_000_000_000_000,
        burst: None,
        environments: vec![],
    };
    let (plain, limited, quota) = rt.block_on(async {
        replica
            .manager
            .create_tenant(CreateTenantInput {
                tenant_id: "bench".into(),
                name: "Bench tenant".into(),
                plan: "enterprise".into(),
                ..Default::default()
            })
            .await
            .expect("tenant created");
        let plain = replica.key("bench", vec![]).await;
        let limited = replica.key("bench", vec![per_second]).await;
        let quota = replica.key("bench", vec![per_month]).await;
        // Warm the caches: the first decision of each key reads the store.
        assert_allowed(&replica.decide(&plain, &scopes).await, &[]);
        assert_allowed(
            &replica.decide(&limited, &scopes).await,
            &["key_per_second"],
        );
        assert_allowed(&replica.decide(&quota, &scopes).await, &["key_per_month"]);
        (plain, limited, quota)
    });
    // From here on the key and tenant come from the caches.
    let digest = pepper().digest(&plain);
    assert!(replica.caches.key(&digest).is_some(), "key cached");
    let tenant = TenantId::parse("bench").expect("a tenant id");
    assert!(replica.caches.tenant(&tenant).is_some(), "tenant cached");

    let mut g = c.benchmark_group("decide");
    for (name, key) in [
        ("cached", &plain),
        ("cached_with_rate_limit", &limited),
        ("cached_with_quota", &quota),
    ] {
        let before = replica.store.reads();
        g.bench_function(name, |b| {
            b.iter(|| rt.block_on(replica.decide(black_box(key), &scopes)))
        });
        replica.assert_no_reads_since(before, name);
    }
    // The same decision with per-key request counting on: the hot-path
    // cost of counting is `cached_counted` / `cached` (BENCHMARKS.md).
    let counts = Arc::new(RequestCounts::default());
    let counting = Replica::with_counts(Some(counts.clone()));
    let counted_key = rt.block_on(async {
        counting
            .manager
            .create_tenant(CreateTenantInput {
                tenant_id: "bench".into(),
                name: "Bench tenant".into(),
                plan: "enterprise".into(),
                ..Default::default()
            })
            .await
            .expect("tenant created");
        let key = counting.key("bench", vec![]).await;
        assert_allowed(&counting.decide(&key, &scopes).await, &[]);
        let drained = counts.drain().await;
        assert_eq!(drained.len(), 1, "the warm-up decision was counted");
        assert_eq!(drained[0].allowed, 1);
        key
    });
    let before = counting.store.reads();
    // Checked only when timed (a filter may leave it out).
    let mut timed = false;
    g.bench_function("cached_counted", |b| {
        timed = true;
        b.iter(|| rt.block_on(counting.decide(black_box(&counted_key), &scopes)))
    });
    counting.assert_no_reads_since(before, "cached_counted");
    let drained = rt.block_on(counts.drain());
    assert!(
        !timed || (drained.len() == 1 && drained[0].allowed > 0),
        "cached_counted counted its decisions: {drained:?}"
    );
    g.finish();
    // CheckQuota by credential, as the RPC makes it: identify, then consume 1.
    let answer = rt.block_on(
        replica
            .auth
            .check_quota(QuotaSubject::Credential(&quota), 1, false),
    );
    assert!(matches!(
        answer.expect("no store error").verdict.decision,
        Decision::Allow(_)
    ));
    let before = replica.store.reads();
    c.bench_function("check_quota/cached_credential", |b| {
        b.iter(|| {
            rt.block_on(replica.auth.check_quota(
                QuotaSubject::Credential(black_box(&quota)),
                1,
                false,
            ))
        })
    });
    replica.assert_no_reads_since(before, "check_quota/cached_credential");
    // The limit was never reached while timing.
    let v = rt.block_on(replica.decide(&limited, &scopes));
    assert_allowed(&v, &["key_per_second"]);

    c.bench_function("runtime/block_on_ready", |b| {
        b.iter(|| rt.block_on(async { black_box(1u64) }))
    });
}

fn gcra_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("gcra");
    // 100 per second, burst 100: one unit every 10 ms.
    let rate = Rate::new(100, SEC, 100, 1);
    let interval = SEC / 100;
    let t0 = 1_000 * SEC;

    let cell = Cell::default();
    let mut now = t0;
    for _ in 0..1_000 {
        now += interval;
        assert!(cell.take(now, rate, 1).allowed, "steady traffic is allowed");
    }
    g.bench_function("cell_take", |b| {
        b.iter(|| {
            now += interval;
            cell.take(black_box(now), black_box(rate), 1)
        })
    });
    now += interval;
    assert!(
        cell.take(now, rate, 1).allowed,
        "still allowing after timing"
    );

    // Half the burst already used.
    let tat = t0 + SEC / 2;
    let (next, outcome) = step(tat, t0, rate, 1);
    assert!(outcome.allowed);
    assert_eq!(next, Some(tat + interval));
    g.bench_function("step", |b| {
        b.iter(|| step(black_box(tat), black_box(t0), black_box(rate), 1))
    });
    g.finish();
}

fn quota_benches(c: &mut Criterion) {
    let rt = current_thread_runtime();
    let _runtime = rt.enter();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let quotas = Quotas::new(store, Arc::new(AtomicU32::new(1)));
    let tenant = TenantId::parse("bench").expect("a tenant id");
    let subject = Subject {
        key: Some(uuid::Uuid::now_v7()),
        tenant: &tenant,
        billing_day: None,
        environment: Some("live"),
    };
    let limit = 1_000_000_000;
    let per_month = LimitSpec {
        scope: LimitScope::Key,
        period: LimitPeriod::Month,
        limit,
        burst: None,
        environments: vec![],
    };
    let (counter, _end) =
        quota_counter(&subject, &per_month, chrono::Utc::now()).expect("a quota counter");
    let mut now = 1_000 * SEC;
    // The first take leases from the store and may queue a prefetch; let it run.
    rt.block_on(async {
        let o = quotas.take(&counter, limit, 1, now).await.expect("leased");
        assert!(o.allowed);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    });
    // Stand-in for a lease granted earlier: put enough units in the local
    // lease that no iteration goes below the prefetch low-water mark, so each
    // take is an atomic decrement plus bookkeeping, with no store call.
    quotas.refund(&counter, 1 << 40);
    let take = |now| {
        quotas
            .take(&counter, limit, 1, now)
            .now_or_never()
            .expect("served from the local lease, without waiting")
            .expect("no store error")
    };
    assert!(take(now).allowed);

    c.bench_function("quota/lease_take", |b| {
        b.iter(|| {
            now += 1_000;
            take(black_box(now))
        })
    });
    now += 1_000;
    assert!(take(now).allowed, "still allowing after timing");
}

fn request_count_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_counts");
    let counts = RequestCounts::default();
    let key = tollgate::domain::KeyId::new_v4();
    // Each check only when its bench was timed (a filter may leave it out).
    let mut timed = false;
    g.bench_function("count", |b| {
        timed = true;
        b.iter(|| counts.count(black_box(key), true))
    });
    let drained = rt_block_on(counts.drain());
    assert!(
        !timed || (drained.len() == 1 && drained[0].allowed > 0),
        "count counted: {drained:?}"
    );
    // 1,000 keys in turn: each lands in its own slot of the table.
    let keys: Vec<_> = (0..1000)
        .map(|_| tollgate::domain::KeyId::new_v4())
        .collect();
    let (mut i, mut timed) = (0, false);
    g.bench_function("count_1000_keys", |b| {
        timed = true;
        b.iter(|| {
            i = (i + 1) % keys.len();
            counts.count(black_box(keys[i]), true)
        })
    });
    g.finish();
    let drained = rt_block_on(counts.drain());
    assert!(
        !timed || (!drained.is_empty() && drained.iter().all(|c| keys.contains(&c.key))),
        "one row per key counted"
    );
    assert_eq!(counts.overflowed(), 0);
}

fn rt_block_on<F: std::future::Future>(f: F) -> F::Output {
    current_thread_runtime().block_on(f)
}

criterion_group!(
    benches,
    key_benches,
    decide_benches,
    gcra_benches,
    quota_benches,
    request_count_benches
);
criterion_main!(benches);
