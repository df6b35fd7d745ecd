//! Resident memory per cached key: fill the real key cache ([`Caches`])
//! with verified records shaped as the service caches them, and read
//! VmRSS before and after.

use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use tollgate::cache::{CacheSettings, Caches};
use tollgate::crypto::Pepper;
use tollgate::domain::{KeyId, KeyRecord, TenantId};
use tollgate::profile::Profile;

/// This process's resident set, in bytes.
pub fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS in /proc/self/status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

fn record(i: usize, profile: &Profile, pepper: &Pepper, tenants: &[TenantId]) -> KeyRecord {
    let secret = profile.key_format.generate("live");
    let id = KeyId::now_v7();
    KeyRecord {
        id,
        tenant_id: tenants[i % tenants.len()].clone(),
        name: format!("key {i}"),
        environment: "live".into(),
        scopes: vec!["read".into(), "write".into()],
        hint: secret.hint(),
        digest: pepper.digest(secret.expose()),
        pepper_version: 1,
        created_at: Utc::now(),
        expires_at: Some(Utc::now() + chrono::Duration::days(365)),
        revoked_at: None,
        revoke_reason: None,
        last_used_at: None,
        replaced_by: None,
        limits: None,
        lineage_id: id,
        labels: Default::default(),
        legacy: false,
    }
}

pub fn run(keys: usize) -> anyhow::Result<()> {
    let profile = Profile::embedded_default();
    let pepper = Pepper::new(1, vec![7; 32])?;
    let tenants: Vec<TenantId> = (0..1000)
        .map(|t| TenantId::parse(&format!("tenant-{t}")).context("tenant id"))
        .collect::<Result<_, _>>()?;

    let caches = Caches::new(&CacheSettings {
        max_keys: keys as u64 + 1,
        ..CacheSettings::default()
    });
    let before = rss_bytes()?;
    for i in 0..keys {
        // As the service caches it (`Authenticator::find_key`).
        let r = record(i, &profile, &pepper, &tenants).for_decisions();
        caches.insert_key(caches.generation(), r.digest, Arc::new(r));
    }
    let held = caches.key_count();
    let after = rss_bytes()?;
    anyhow::ensure!(held == keys as u64, "the cache holds {held} of {keys} keys");
    let per_key = (after.saturating_sub(before)) as f64 / keys as f64;
    // The records alone, for the breakdown: measured after the cache, since
    // memory freed here stays resident and would be reused by the cache.
    let records_before = rss_bytes()?;
    let records: Vec<Arc<KeyRecord>> = (0..keys)
        .map(|i| Arc::new(record(i, &profile, &pepper, &tenants)))
        .collect();
    let records_only = rss_bytes()?.saturating_sub(records_before) as f64 / keys as f64;
    drop(records);
    println!(
        "cached keys {held}: RSS {:.1} MiB before, {:.1} MiB after: {per_key:.0} bytes per cached key (the records alone: {records_only:.0} bytes each)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!(
        "{}",
        serde_json::json!({"keys": held, "rss_before": before, "rss_after": after, "bytes_per_key": per_key, "record_bytes": records_only})
    );
    Ok(())
}
