//! The store contract for what the reaper and a rewrite decide on, on the
//! harness's engine: expired leases read a page at a time and queued only
//! while still expired (a renewal the reaper overtook included), and an
//! agent read inside a transaction as committed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::store_contract::{agent_with_tasks, db_path, lease_in, open};

/// Writes lease `l` as issued (revocable) until `until`.
async fn issued_until(
    tx: &mut dyn keygate::store::StoreTx,
    l: &keygate::model::Lease,
    until: time::OffsetDateTime,
) {
    assert!(tx.insert_lease(l).await.unwrap().written());
    tx.record_issued(
        &l.id,
        &serde_json::json!({}),
        keygate::model::Revocability::Revocable,
        until,
    )
    .await
    .unwrap();
}

/// The reaper reads expired active leases a page at a time, in order of
/// expiry then id, and only those queued by id whose expiry passed are.
#[tokio::test]
async fn expired_leases_are_read_in_pages_and_queued_by_id() {
    use keygate::model::{now, unix};
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_1"], &[]).await;
    let t = now();
    let leases = [
        lease_in("tk_1"),
        lease_in("tk_1"),
        lease_in("tk_1"),
        lease_in("tk_1"),
    ];
    let mut tx = store.begin().await.unwrap();
    for (i, l) in leases.iter().enumerate() {
        // Two share an expiry; the last has not expired.
        let until = match i {
            0 | 1 => t - time::Duration::seconds(10),
            2 => t - time::Duration::seconds(5),
            _ => t + time::Duration::minutes(5),
        };
        issued_until(tx.as_mut(), l, until).await;
    }
    tx.commit().await.unwrap();
    let mut read = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .expired_active_leases(t, after.take(), 2)
            .await
            .unwrap();
        read.extend(page.iter().map(|l| l.id.clone()));
        match page.last() {
            Some(l) if page.len() == 2 => after = Some((unix(l.expires_at), l.id.clone())),
            _ => break,
        }
    }
    let mut first_two = [leases[0].id.clone(), leases[1].id.clone()];
    first_two.sort();
    assert_eq!(read, [&first_two[..], &[leases[2].id.clone()]].concat());
    let mut tx = store.begin().await.unwrap();
    let ids = [leases[2].id.clone(), leases[3].id.clone()];
    assert_eq!(
        tx.queue_expired(&ids, t).await.unwrap(),
        [leases[2].id.clone()]
    );
    tx.commit().await.unwrap();
}

/// A renewal the reaper overtook: the lease is `expired`, the renewal's
/// update finds it no longer active, and the lease is queued for revocation
/// after all (its backend extended it); only an expired lease is.
#[tokio::test]
async fn an_expired_lease_a_renewal_extended_is_queued_for_revocation() {
    use keygate::model::{LeaseState, now};
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_1"], &[]).await;
    let (expired, active) = (lease_in("tk_1"), lease_in("tk_1"));
    let t = now();
    let mut tx = store.begin().await.unwrap();
    for (l, until) in [
        (&expired, t - time::Duration::seconds(1)),
        (&active, t + time::Duration::minutes(5)),
    ] {
        issued_until(tx.as_mut(), l, until).await;
    }
    let gone = tx.expire_leases(t).await.unwrap();
    assert_eq!(
        gone.iter().map(|l| &l.id).collect::<Vec<_>>(),
        [&expired.id]
    );
    assert!(
        !tx.renew_lease(&expired.id, t + time::Duration::minutes(5))
            .await
            .unwrap()
    );
    assert!(
        tx.revoke_expired(&expired.id, "renewed as it expired", t)
            .await
            .unwrap()
    );
    assert!(!tx.revoke_expired(&expired.id, "twice", t).await.unwrap());
    assert!(
        !tx.revoke_expired(&active.id, "not expired", t)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let state = |id: String| {
        let store = std::sync::Arc::clone(&store);
        async move { store.get_lease(&id).await.unwrap().unwrap().state }
    };
    assert_eq!(state(expired.id.clone()).await, LeaseState::Revoking);
    assert_eq!(state(active.id.clone()).await, LeaseState::Active);
}

/// What a rewrite of an agent is decided on: the agent as the transaction
/// sees it, with what other transactions committed before (a review).
#[tokio::test]
async fn a_transaction_reads_the_agent_as_committed() {
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &[], &[]).await;
    let stored = store.get_agent("a1").await.unwrap().unwrap();
    let mut tx = store.begin().await.unwrap();
    assert_eq!(tx.agent("a1").await.unwrap().as_ref(), Some(&stored));
    assert!(tx.agent("nobody").await.unwrap().is_none());
    tx.commit().await.unwrap();

    let at = keygate::model::now();
    let mut tx = store.begin().await.unwrap();
    tx.mark_reviewed("a1", at).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    let seen = tx.agent("a1").await.unwrap().unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seen.last_review_at, Some(at));
    assert_ne!(seen, stored);
}

/// Fences change one at a time across every process sharing a PostgreSQL
/// store (replicas): while one holds the fences' lock, another waits for
/// it, and takes it once the first lets go. On PostgreSQL whatever the
/// harness's engine: only there is a store shared.
#[tokio::test]
async fn the_fences_lock_is_held_across_processes_sharing_a_store() {
    use std::time::Duration;
    let pg = crate::common::store::cluster();
    let name = format!("kg_fences_{}", uuid::Uuid::new_v4().simple());
    pg.create_database(&name);
    let url = format!("postgres://postgres@127.0.0.1:{}/{name}", pg.port);
    let password = secrecy::SecretString::from(pg.password.clone());
    let a = keygate::store::open_with(&url, Some(&password))
        .await
        .unwrap();
    let b = keygate::store::open_with(&url, Some(&password))
        .await
        .unwrap();
    let held = a.hold_fences().await.unwrap();
    let waiting = tokio::spawn(async move { b.hold_fences().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "taken while another process held it"
    );
    drop(held);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("still waiting once it was let go")
        .unwrap()
        .unwrap();
}
