//! Group commit in the SQLite store: concurrent transactions share fsyncs
//! but keep their own fate. Committed ones are all there (and survive a
//! reopen), a dropped or failed one takes nothing else with it, and the
//! audit chain stays one unbroken chain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use keygate::audit::{Actor, AuditEvent, GENESIS_HASH, verify_chain};
use keygate::store::{AuditFilter, SqliteStore, Store, StoreError};

/// A database path in a fresh temp dir (removed on drop).
struct Db(std::path::PathBuf);

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn db_path() -> (Db, String) {
    let dir = std::env::temp_dir().join(format!("keygate-group-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keygate.db").to_string_lossy().into_owned();
    (Db(dir), path)
}

async fn events(store: &dyn Store) -> Vec<AuditEvent> {
    store
        .audit_events(&AuditFilter {
            after_seq: 0,
            agent: None,
            task: None,
            action: None,
            limit: 100_000,
        })
        .await
        .unwrap()
}

fn reasons(evs: &[AuditEvent]) -> Vec<String> {
    let mut r: Vec<String> = evs.iter().filter_map(|e| e.reason.clone()).collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_all_land_and_dropped_ones_take_nothing() {
    let (_dir, path) = db_path();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let mut handles = Vec::new();
    for i in 0..200 {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            tx.audit(AuditEvent::new(&Actor::System, "test.write").reason(format!("e{i:03}")))
                .await
                .unwrap();
            if i % 10 == 3 {
                // Two events, then an abandoned transaction: neither lands.
                tx.audit(AuditEvent::new(&Actor::System, "test.write").reason(format!("x{i:03}")))
                    .await
                    .unwrap();
                drop(tx);
                false
            } else {
                tx.commit().await.unwrap();
                true
            }
        }));
    }
    let mut expected = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if h.await.unwrap() {
            expected.push(format!("e{i:03}"));
        }
    }
    let evs = events(store.as_ref()).await;
    assert_eq!(reasons(&evs), expected, "exactly the committed events");
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");

    // One transaction with more events than one insert statement carries,
    // then one dropped with events of its own, last before the flush.
    let mut tx = store.begin().await.unwrap();
    for i in 0..1200 {
        tx.audit(AuditEvent::new(&Actor::System, "test.write").reason(format!("m{i:04}")))
            .await
            .unwrap();
        expected.push(format!("m{i:04}"));
    }
    tx.commit().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.audit(AuditEvent::new(&Actor::System, "test.write").reason("dropped"))
        .await
        .unwrap();
    drop(tx);
    // A commit after the last dropped transaction still works, and the
    // reopened file holds everything a commit returned for.
    let mut tx = store.begin().await.unwrap();
    tx.audit(AuditEvent::new(&Actor::System, "test.write").reason("last"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    drop(store);
    let reopened = SqliteStore::open(&path).await.unwrap();
    let evs = events(&reopened).await;
    expected.push("last".into());
    expected.sort();
    assert_eq!(reasons(&evs), expected);
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).unwrap();
}

#[tokio::test]
async fn a_failed_statement_leaves_the_group_intact() {
    let (_dir, path) = db_path();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let agent: keygate::model::Agent = serde_json::from_value(serde_json::json!({
        "id": "dup", "team": "t", "sponsor": "s@example.com", "risk_tier": 1,
        "environment": "test", "purpose": "p", "labels": {}, "status": "active",
        "auth_method": "private_key_jwt", "jwks": { "keys": [] },
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "last_used_at": null, "last_review_at": null,
    }))
    .unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.insert_agent(&agent).await.unwrap();
    tx.commit().await.unwrap();

    // A second insert of the same id fails inside its transaction; the
    // transaction goes on, commits, and only its other write lands.
    let mut tx = store.begin().await.unwrap();
    tx.audit(AuditEvent::new(&Actor::System, "test.write").reason("kept"))
        .await
        .unwrap();
    let err = tx.insert_agent(&agent).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    tx.commit().await.unwrap();
    assert_eq!(reasons(&events(store.as_ref()).await), ["kept"]);
    assert!(store.get_agent("dup").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_constant_reads() {
    let (_dir, path) = db_path();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.ping().await.unwrap();
                let _ = store.get_task("none").await.unwrap();
            }
        })
    };
    // About 24 MiB of audit rows, several groups' worth at a time.
    let filler = "x".repeat(4096);
    for round in 0..60 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100 {
            let (store, filler) = (Arc::clone(&store), filler.clone());
            set.spawn(async move {
                let mut tx = store.begin().await.unwrap();
                tx.audit(
                    AuditEvent::new(&Actor::System, "test.fill")
                        .reason(format!("{round}-{i}"))
                        .details(serde_json::json!({ "filler": filler })),
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
            });
        }
        while set.join_next().await.is_some() {}
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();
    let wal = std::fs::metadata(format!("{path}-wal")).map_or(0, |m| m.len());
    assert!(
        wal < 16 << 20,
        "the WAL grew to {wal} bytes: checkpoints are not keeping up"
    );
    assert_eq!(events(store.as_ref()).await.len(), 6000);
}
