//! The audit chain when its writers are many: replicas committing at once
//! extend one chain with every committed event once; and on PostgreSQL,
//! where a transaction stages its events for a chainer to chain after the
//! commit, events a writer staged and never chained (its replica died
//! between the two) are chained by a read of the log and, with no read, by
//! a replica's chainer on its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use crate::common;
use crate::store_contract::{db_path, events, open, reasons};
use common::store::{Engine, engine};
use keygate::audit::{Actor, AuditEvent, GENESIS_HASH, verify_chain};
use keygate::store::Store;

async fn commit_one(store: &dyn Store, reason: String) {
    let mut tx = store.begin().await.unwrap();
    tx.audit(AuditEvent::new(&Actor::System, "test.write").reason(reason.clone()))
        .await
        .unwrap();
    tx.audit(AuditEvent::new(&Actor::System, "test.second").reason(format!("{reason}+")))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_committing_at_once_write_one_chain() {
    if engine() != Engine::Postgres {
        return; // One SQLite file has one broker.
    }
    let (_dir, path) = db_path();
    let a = open(&path).await;
    let b = open(&path).await;
    let mut set = tokio::task::JoinSet::new();
    let mut expected = Vec::new();
    for i in 0..300 {
        let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
        let reason = format!("r{i:03}");
        expected.extend([reason.clone(), format!("{reason}+")]);
        set.spawn(async move { commit_one(store.as_ref(), reason).await });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
    expected.sort();
    // Read from either replica: everything committed before the read.
    for store in [&b, &a] {
        let evs = events(store.as_ref()).await;
        assert_eq!(reasons(&evs), expected, "every committed event, once");
        verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
        // A transaction's events stay together and in order.
        for pair in evs.windows(2) {
            if pair[0].action == "test.write" {
                assert_eq!(pair[1].action, "test.second", "{:?}", pair[0].reason);
                assert_eq!(
                    pair[1].reason,
                    pair[0].reason.as_ref().map(|r| format!("{r}+"))
                );
            }
        }
    }
}

/// What a writer whose replica died between its commit and the chaining
/// left: events staged, unchained.
async fn stage_as_a_dead_replica(dir: &std::path::Path, reason: &str) {
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&Engine::Postgres.url(dir))
        .await
        .unwrap();
    let ev = AuditEvent::new(&Actor::System, "test.orphaned").reason(reason);
    sqlx::query("INSERT INTO audit_pending (events) VALUES ($1)")
        .bind(serde_json::to_string(&[ev]).unwrap())
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
}

async fn pending(dir: &std::path::Path) -> i64 {
    use sqlx::Connection;
    let mut db = sqlx::PgConnection::connect(&Engine::Postgres.url(dir))
        .await
        .unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM audit_pending")
        .fetch_one(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_a_dead_replica_staged_are_chained() {
    if engine() != Engine::Postgres {
        return; // SQLite chains in the writer's own transaction.
    }
    let (_dir, path) = db_path();
    let dir = std::path::Path::new(&path).parent().unwrap().to_owned();
    let store = open(&path).await;
    commit_one(store.as_ref(), "before".into()).await;

    // A read right after finds the staged events chained: it chains them
    // itself, before the chainer's next sweep.
    stage_as_a_dead_replica(&dir, "read").await;
    let evs = events(store.as_ref()).await;
    assert_eq!(reasons(&evs), ["before", "before+", "read"]);
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
    assert_eq!(pending(&dir).await, 0);

    // With nobody reading, the replica's chainer finds them on its own.
    stage_as_a_dead_replica(&dir, "swept").await;
    let mut waited = Duration::ZERO;
    while pending(&dir).await > 0 {
        assert!(
            waited < Duration::from_secs(30),
            "staged events were never chained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    let evs = events(store.as_ref()).await;
    assert_eq!(reasons(&evs), ["before", "before+", "read", "swept"]);
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
}

/// An event carrying a NUL character (a refused token request names the
/// client id it was given, `%00` included) is kept, and the chain goes on
/// after it: PostgreSQL's text cannot hold NUL, and one staged as it was
/// would have stopped every chaining pass after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_a_nul_character_does_not_stop_the_chain() {
    let (_dir, path) = db_path();
    let store = open(&path).await;
    let mut tx = store.begin().await.unwrap();
    tx.audit(
        AuditEvent::new(&Actor::Agent("bad\0id".into()), "test.nul")
            .agent("bad\0id")
            .reason("nul\0here")
            .details(serde_json::json!({ "client_id": "x\0y", "k\0": ["\0"] })),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    commit_one(store.as_ref(), "after".into()).await;
    let evs = events(store.as_ref()).await;
    let got = reasons(&evs);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[2].starts_with("nul"), "{got:?}");
    assert_eq!(&got[..2], ["after", "after+"]);
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
}
