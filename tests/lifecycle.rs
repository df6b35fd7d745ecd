//! A key's lifecycle beyond the four products' documents, over real gRPC
//! against real Postgres: labels and metadata (set at create and update,
//! bounded and validated, filterable, sent upstream where the profile asks)
//! and import at cut-over (`lifecycle/import.rs`).

mod common;
#[path = "lifecycle/import.rs"]
mod import;
#[path = "support/spy_store.rs"]
mod spy_store;

use std::collections::HashMap;

use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn labelled(t: &mut Tollgate, tenant: &str, pairs: &[(&str, &str)]) -> (String, pb::ApiKey) {
    t.create_key_with(pb::CreateKeyRequest {
        tenant_id: tenant.into(),
        name: "labelled".into(),
        labels: labels(pairs),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn list(
    t: &mut Tollgate,
    tenant: &str,
    selector: &[(&str, &str)],
    page_size: u32,
) -> Vec<pb::ApiKey> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = t
            .auth
            .list_keys(op(pb::ListKeysRequest {
                tenant_id: tenant.into(),
                page_size,
                page_token,
                label_selector: labels(selector),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.keys);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

#[sqlx::test]
async fn messagesmart_keys_carry_a_plan_label_that_groups_them_and_goes_upstream(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // "Plan: optional tier or plan label for grouping keys".
    let mut t = spawn(&conn, "messagesmart").await;
    t.create_tenant("shop", "default").await;
    let (gold_secret, gold) =
        labelled(&mut t, "shop", &[("plan", "gold"), ("team", "checkout")]).await;
    assert_eq!(
        gold.labels,
        labels(&[("plan", "gold"), ("team", "checkout")])
    );
    let mut silver_ids = Vec::new();
    for _ in 0..3 {
        silver_ids.push(
            labelled(&mut t, "shop", &[("plan", "silver")])
                .await
                .1
                .key_id,
        );
    }
    let (plain_secret, _) = t.create_key("shop").await;

    // Filter: every key holding all the selector's labels, across pages.
    let silver: Vec<String> = list(&mut t, "shop", &[("plan", "silver")], 2)
        .await
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert_eq!(silver, silver_ids, "all three, in order, over two pages");
    let both = list(
        &mut t,
        "shop",
        &[("plan", "gold"), ("team", "checkout")],
        50,
    )
    .await;
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].key_id, gold.key_id);
    assert!(list(&mut t, "shop", &[("plan", "gold"), ("team", "x")], 50)
        .await
        .is_empty());
    assert_eq!(list(&mut t, "shop", &[], 50).await.len(), 5);

    // Upstream: the profile sends `plan` (only), in the principal.
    let p = t.authenticate(&gold_secret).await.principal.unwrap();
    assert_eq!(p.labels, labels(&[("plan", "gold")]), "team is not sent");
    let p = t.authenticate(&plain_secret).await.principal.unwrap();
    assert!(p.labels.is_empty());

    // Update replaces the labels; the decision sees the change at once.
    let mut rx = t.invalidations();
    let updated = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: gold.key_id.clone(),
            update_mask: vec!["labels".into()],
            labels: labels(&[("plan", "platinum")]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(updated.labels, labels(&[("plan", "platinum")]));
    wait_for(&mut rx, |e| {
        matches!(e, tollgate::store::Invalidation::Key(_))
    })
    .await;
    let p = t.authenticate(&gold_secret).await.principal.unwrap();
    assert_eq!(p.labels, labels(&[("plan", "platinum")]));

    // Rotation keeps them.
    let rotated = t
        .auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: gold.key_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.key.unwrap().labels, labels(&[("plan", "platinum")]));

    // Other fields in the mask leave labels alone; an empty map clears them.
    let renamed = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: silver_ids[0].clone(),
            update_mask: vec!["name".into()],
            name: "renamed".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(renamed.labels, labels(&[("plan", "silver")]));
    let cleared = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: silver_ids[0].clone(),
            update_mask: vec!["labels".into()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(cleared.labels.is_empty());
}

#[sqlx::test]
async fn bad_labels_are_refused_naming_each_field_and_change_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.create_tenant("shop", "default").await;
    let bad = labels(&[
        ("Plan", "gold"),
        ("tier", ""),
        ("note", " padded"),
        ("team", &"x".repeat(129)),
        ("ok", "fine"),
    ]);
    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "bad".into(),
            labels: bad.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut fields = violations(&err);
    fields.sort();
    assert_eq!(
        fields,
        ["labels.Plan", "labels.note", "labels.team", "labels.tier"]
    );
    let too_many: HashMap<String, String> = (0..17)
        .map(|i| (format!("l{i}"), "v".to_string()))
        .collect();
    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "many".into(),
            labels: too_many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["labels"]);
    assert!(
        list(&mut t, "shop", &[], 50).await.is_empty(),
        "nothing created"
    );

    let (_, key) = labelled(&mut t, "shop", &[("plan", "gold")]).await;
    let err = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: key.key_id.clone(),
            update_mask: vec!["labels".into()],
            labels: bad,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&err).len(), 4);
    let err = t
        .auth
        .list_keys(op(pb::ListKeysRequest {
            tenant_id: "shop".into(),
            label_selector: labels(&[("Plan", "gold")]),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), ["label_selector.Plan"]);
    let key = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: key.key_id,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.labels, labels(&[("plan", "gold")]), "unchanged");
}
