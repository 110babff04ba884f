//! The store contract every engine keeps, run on the harness's engine
//! (`KEYGATE_TEST_STORE`, see `common/store.rs`): concurrent transactions
//! keep their own fate (committed ones are all there and survive a reopen,
//! a dropped or failed one takes nothing else with it), the audit chain
//! stays one unbroken chain, and no lease is written for an ended task.
//! What only one engine does (SQLite's WAL) is checked for that engine.
//! What session checks and agent lookups read: `store_reads.rs`; task
//! opens: `store_contract_tasks.rs`; PostgreSQL's connections:
//! `store_contract_pool.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;

use common::store::{Engine, engine};
use keygate::audit::{Actor, AuditEvent, GENESIS_HASH, verify_chain};
use keygate::store::{AuditFilter, Store, StoreError};

/// The engine's store at `path`'s directory, opened (or reopened).
pub(crate) async fn open(path: &str) -> Arc<dyn Store> {
    common::store::open_store(std::path::Path::new(path).parent().unwrap()).await
}

/// A database path in a fresh temp dir (removed on drop).
pub(crate) struct Db(std::path::PathBuf);

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn db_path() -> (Db, String) {
    let dir = std::env::temp_dir().join(format!("keygate-group-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keygate.db").to_string_lossy().into_owned();
    (Db(dir), path)
}

pub(crate) async fn events(store: &dyn Store) -> Vec<AuditEvent> {
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

pub(crate) fn reasons(evs: &[AuditEvent]) -> Vec<String> {
    let mut r: Vec<String> = evs.iter().filter_map(|e| e.reason.clone()).collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_all_land_and_dropped_ones_take_nothing() {
    let (_dir, path) = db_path();
    let store = open(&path).await;
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
    let reopened = open(&path).await;
    let evs = events(reopened.as_ref()).await;
    expected.push("last".into());
    expected.sort();
    assert_eq!(reasons(&evs), expected);
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).unwrap();
}

#[tokio::test]
async fn a_failed_statement_leaves_the_group_intact() {
    let (_dir, path) = db_path();
    let store = open(&path).await;
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
async fn sqlite_the_wal_stays_bounded_under_constant_reads() {
    if engine() != Engine::Sqlite {
        return; // SQLite's write-ahead log only; no other engine has one.
    }
    let (_dir, path) = db_path();
    let store = open(&path).await;
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
    // About 48 MiB of audit rows, several groups' worth at a time: three
    // times what the WAL may hold (16 MiB, to which each restart cuts it).
    let filler = "x".repeat(4096);
    for round in 0..120 {
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
    // At most the limit, and what the groups since the last restart added.
    assert!(
        wal < 20 << 20,
        "the WAL grew to {wal} bytes: checkpoints are not keeping up"
    );
    assert_eq!(events(store.as_ref()).await.len(), 12000);
}

/// An agent `a1`, and `tasks` of it, open unless named in `ended`.
pub(crate) async fn agent_with_tasks(store: &dyn Store, tasks: &[&str], ended: &[&str]) {
    use keygate::model::{TaskState, now};
    use keygate::store::TaskSelector;
    let t = now();
    let agent = common::store::test_agent();
    let mut tx = store.begin().await.unwrap();
    tx.insert_agent(&agent).await.unwrap();
    for id in tasks {
        let task = common::store::open_task(id, t);
        assert!(tx.insert_task(&task).await.unwrap());
    }
    for id in ended {
        tx.end_tasks(
            &TaskSelector::Task((*id).into()),
            TaskState::Revoked,
            "test",
            t,
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

/// A pending lease of `a1` in `task`, with a fresh id.
pub(crate) fn lease_in(task: &str) -> keygate::model::Lease {
    let t = keygate::model::now();
    keygate::model::Lease {
        id: keygate::model::new_id("ls"),
        agent_id: "a1".into(),
        task_id: task.into(),
        scope: "s".into(),
        provider: "p".into(),
        state: keygate::model::LeaseState::Pending,
        revocability: None,
        handle: None,
        created_at: t,
        expires_at: t + time::Duration::minutes(5),
        ended_at: None,
        end_reason: None,
        attempts: 0,
        last_error: None,
        next_attempt_at: None,
        revocation_id: None,
        boot_id: None,
        source: None,
    }
}

/// A request that passed its session check just before its task ended must
/// not gain a lease that nothing would ever revoke.
#[tokio::test]
async fn no_lease_is_written_for_an_ended_task() {
    use keygate::model::{TaskState, now};
    use keygate::store::TaskSelector;
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_1"], &[]).await;
    let mut tx = store.begin().await.unwrap();
    assert!(tx.insert_lease(&lease_in("tk_1")).await.unwrap().written());
    tx.end_tasks(
        &TaskSelector::Task("tk_1".into()),
        TaskState::Revoked,
        "test",
        now(),
    )
    .await
    .unwrap();
    assert!(!tx.insert_lease(&lease_in("tk_1")).await.unwrap().written());
    tx.commit().await.unwrap();
}

/// A revocation is unfinished while any of its leases waits for its
/// provider (what the kill switch's `wait` polls), finished once the last
/// is confirmed, and its progress counts agree.
#[tokio::test]
async fn a_revocation_is_unfinished_until_its_last_lease_is_confirmed() {
    use keygate::model::{LeaseState, now};
    use keygate::store::LeaseSelector;
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_1"], &[]).await;
    let leases = [lease_in("tk_1"), lease_in("tk_1")];
    let mut tx = store.begin().await.unwrap();
    for l in &leases {
        assert!(tx.insert_lease(l).await.unwrap().written());
    }
    tx.insert_revocation(&revocation("rv_1")).await.unwrap();
    let tasks = LeaseSelector::Tasks(vec!["tk_1".into()]);
    let queued = tx
        .queue_revocations(&tasks, "test", Some("rv_1"), now())
        .await
        .unwrap();
    assert_eq!(queued.len(), 2);
    tx.commit().await.unwrap();
    assert!(store.revocation_unfinished("rv_1").await.unwrap());
    assert!(!store.revocation_unfinished("rv_none").await.unwrap());
    for (i, l) in leases.iter().enumerate() {
        let mut tx = store.begin().await.unwrap();
        tx.finish_revocations(std::slice::from_ref(&l.id), LeaseState::Revoked, now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let last = i + 1 == leases.len();
        assert_eq!(store.revocation_unfinished("rv_1").await.unwrap(), !last);
        let p = store.revocation_progress("rv_1").await.unwrap();
        assert_eq!(
            (p.found, p.revoked, p.pending),
            (2, i as u64 + 1, 1 - i as u64)
        );
    }
}

/// An emergency revocation of agent `a1` that suspended two agents.
fn revocation(id: &str) -> keygate::model::Revocation {
    keygate::model::Revocation {
        id: id.into(),
        selector: keygate::model::Selector::Agent("a1".into()),
        reason: "test".into(),
        operator: "op".into(),
        created_at: keygate::model::now(),
        tasks_ended: 0,
        agents_suspended: 2,
        fence_failures: Vec::new(),
    }
}

/// A lease already being revoked counts towards every emergency revocation
/// that selects it: one queued without a revocation (its task ended) takes
/// the first's id; one the first queued stays the first's and counts for the
/// second too (it no longer moves, leaving the first to report done early).
/// A revocation keeps what it suspended and every fence failure added.
#[tokio::test]
async fn overlapping_revocations_each_count_the_leases_they_select() {
    use keygate::model::{FenceFailure, LeaseState, Selector, now};
    use keygate::store::LeaseSelector;
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_1", "tk_2"], &[]).await;
    let (ended, held) = (lease_in("tk_1"), lease_in("tk_2"));
    let failure = FenceFailure {
        provider: "aws".into(),
        target: Some("role".into()),
        name: None,
        agent: Some("a1".into()),
        error: "denied".into(),
    };
    let agent = LeaseSelector::Emergency(Selector::Agent("a1".into()));
    let mut tx = store.begin().await.unwrap();
    for l in [&ended, &held] {
        assert!(tx.insert_lease(l).await.unwrap().written());
    }
    tx.queue_revocations(
        &LeaseSelector::Task("tk_1".into()),
        "task ended",
        None,
        now(),
    )
    .await
    .unwrap();
    tx.insert_revocation(&revocation("rv_1")).await.unwrap();
    let mut first = tx
        .queue_revocations(&agent, "test", Some("rv_1"), now())
        .await
        .unwrap();
    tx.insert_revocation(&revocation("rv_2")).await.unwrap();
    let mut second = tx
        .queue_revocations(&agent, "test", Some("rv_2"), now())
        .await
        .unwrap();
    tx.add_fence_failures("rv_2", std::slice::from_ref(&failure))
        .await
        .unwrap();
    tx.add_fence_failures("rv_2", std::slice::from_ref(&failure))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut both = vec![ended.id.clone(), held.id.clone()];
    both.sort();
    first.sort();
    second.sort();
    assert_eq!((&first, &second), (&both, &both));
    for rv in ["rv_1", "rv_2"] {
        let p = store.revocation_progress(rv).await.unwrap();
        assert_eq!((p.found, p.pending), (2, 2), "{rv}");
        assert!(store.revocation_unfinished(rv).await.unwrap(), "{rv}");
    }
    let mut tx = store.begin().await.unwrap();
    tx.finish_revocations(&both, LeaseState::Revoked, now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for rv in ["rv_1", "rv_2"] {
        let p = store.revocation_progress(rv).await.unwrap();
        assert_eq!((p.found, p.revoked), (2, 2), "{rv}");
        assert!(!store.revocation_unfinished(rv).await.unwrap(), "{rv}");
    }
    let r = store.get_revocation("rv_2").await.unwrap().unwrap();
    assert_eq!(r.agents_suspended, 2);
    assert_eq!(r.fence_failures, vec![failure.clone(), failure]);
    let r = store.get_revocation("rv_1").await.unwrap().unwrap();
    assert!(r.fence_failures.is_empty());
}

/// Lease writes racing each other (the SQLite engine batches them into
/// one statement): each keeps its own fate. A lease of an ended task is
/// refused without taking the others in its batch with it, every lease
/// reported written is there with its event, nothing else is, and the audit
/// chain stays unbroken. Then a duplicate id among them: whatever it costs
/// the others, nobody is told a lease was written that is not, and the
/// duplicate is not written twice. Transactions of their own write leases
/// among them, so some batches run alone and some inside a group that
/// holds others' writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_lease_writes_keep_each_its_fate() {
    use keygate::model::LeaseFilter;
    use keygate::store::LeaseInsert;
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_open", "tk_gone"], &["tk_gone"]).await;
    // Round by round: every lease of an open task; every fifth batched one
    // of an ended task; then also two with the same id.
    let gone = |round: usize, i: usize| round > 0 && i < 120 && i.is_multiple_of(5);
    let mut written = Vec::new();
    let mut dup_written = 0;
    for round in 0..3 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..120 {
            let store = Arc::clone(&store);
            let mut lease = lease_in(if gone(round, i) { "tk_gone" } else { "tk_open" });
            if round == 2 && (i == 41 || i == 42) {
                lease.id = "ls_dup".into();
            }
            set.spawn(async move {
                let ev = AuditEvent::new(&Actor::System, "test.lease")
                    .lease(&lease.id)
                    .reason(lease.id.clone());
                let r = store.insert_lease_audited(&lease, vec![ev]).await;
                (i, lease.id, r)
            });
        }
        for i in 120..140 {
            let store = Arc::clone(&store);
            let lease = lease_in("tk_open");
            set.spawn(async move {
                let ev = AuditEvent::new(&Actor::System, "test.lease")
                    .lease(&lease.id)
                    .reason(lease.id.clone());
                let r = async {
                    let mut tx = store.begin().await?;
                    let written = tx.insert_lease(&lease).await?;
                    tx.audit(ev).await?;
                    tx.commit().await?;
                    Ok::<_, StoreError>(written)
                }
                .await;
                (i, lease.id, r)
            });
        }
        for (i, id, r) in set.join_all().await {
            match r {
                Ok(LeaseInsert::Written { .. }) => {
                    assert!(!gone(round, i), "lease {i} of the ended task was written");
                    dup_written += usize::from(id == "ls_dup");
                    written.push(id);
                }
                Ok(LeaseInsert::TaskEnded) => {
                    assert!(gone(round, i), "lease {i} (round {round}) was refused");
                }
                // A failed statement may cost the others in its group (the
                // duplicate's round only); they are told.
                Err(e) => assert!(
                    round == 2 && !gone(round, i),
                    "lease {i} (round {round}): {e}"
                ),
            }
        }
        if round < 2 {
            assert_eq!(written.len(), if round == 0 { 140 } else { 256 });
        }
    }
    assert!(
        dup_written <= 1,
        "the duplicate id was reported written twice"
    );
    written.sort();
    let mut stored: Vec<String> = store
        .list_leases(&LeaseFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    stored.sort();
    assert_eq!(
        stored, written,
        "the leases stored are those reported written"
    );
    let evs = events(store.as_ref()).await;
    let mut audited: Vec<String> = evs.iter().filter_map(|e| e.reason.clone()).collect();
    audited.sort();
    assert_eq!(
        audited, written,
        "each written lease has its event, no other has one"
    );
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
}
