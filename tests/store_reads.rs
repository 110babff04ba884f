//! What session checks and task opens read, on the harness's engine: racing
//! reads each get their own rows, and what a read returns (the SQLite
//! engine batches these reads and answers repeats from memory while the
//! store has not changed) is what the store holds after every kind of write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use crate::common;
use crate::store_contract::{agent_with_tasks, db_path, lease_in, open};
use keygate::store::Store;

/// Session checks racing each other (the SQLite engine reads them in
/// batches): each gets its own task and agent, a task asked for by many at
/// once is answered to each, an unknown one is `None`, and a task ended
/// before a check is seen ended by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_session_reads_each_get_their_own_task() {
    use keygate::model::{TaskState, now};
    use keygate::store::TaskSelector;
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_a", "tk_b", "tk_c"], &["tk_c"]).await;
    let read_all = |ids: Vec<&'static str>| {
        let mut set = tokio::task::JoinSet::new();
        for (i, id) in ids.into_iter().cycle().take(200).enumerate() {
            let store = Arc::clone(&store);
            set.spawn(async move { (i, id, store.task_with_agent(id).await.unwrap()) });
        }
        set.join_all()
    };
    for (i, id, found) in read_all(vec!["tk_a", "tk_b", "tk_c", "tk_none", "tk_a"]).await {
        match (id, found) {
            ("tk_none", None) => {}
            (_, Some((task, agent))) => {
                assert_eq!(task.id, id, "read {i}");
                assert_eq!(agent.expect("its agent").id, "a1");
                let ended = task.state != TaskState::Open;
                assert_eq!(ended, id == "tk_c", "read {i}: {id} is {:?}", task.state);
            }
            (id, None) => panic!("read {i}: {id} not found"),
        }
    }
    let mut tx = store.begin().await.unwrap();
    tx.end_tasks(
        &TaskSelector::Task("tk_a".into()),
        TaskState::Revoked,
        "test",
        now(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    for (i, _, found) in read_all(vec!["tk_a"]).await {
        let (task, _) = found.expect("tk_a");
        assert_ne!(
            task.state,
            TaskState::Open,
            "read {i} after the end saw it open"
        );
    }
}

/// Agent lookups racing each other (the SQLite engine reads them in
/// batches, like session checks): each gets the agent it named, one named
/// by many at once is answered to each, an unknown one is `None`, and an
/// agent suspended before a lookup is seen suspended by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agent_lookups_each_get_their_own_agent() {
    use keygate::model::AgentStatus;
    let (_dir, path) = db_path();
    let store = open(&path).await;
    let mut tx = store.begin().await.unwrap();
    for id in ["a1", "a2"] {
        let mut agent = common::store::test_agent();
        agent.id = id.into();
        tx.insert_agent(&agent).await.unwrap();
    }
    tx.commit().await.unwrap();
    let look_up = |ids: Vec<&'static str>| {
        let mut set = tokio::task::JoinSet::new();
        for (i, id) in ids.into_iter().cycle().take(200).enumerate() {
            let store = Arc::clone(&store);
            set.spawn(async move { (i, id, store.get_agent(id).await.unwrap()) });
        }
        set.join_all()
    };
    for (i, id, found) in look_up(vec!["a1", "a2", "none", "a1"]).await {
        match (id, found) {
            ("none", None) => {}
            (_, Some(agent)) => {
                assert_eq!(agent.id, id, "lookup {i}");
                assert_eq!(agent.status, AgentStatus::Active, "lookup {i}");
            }
            (id, None) => panic!("lookup {i}: {id} not found"),
        }
    }
    let mut tx = store.begin().await.unwrap();
    let left = tx
        .set_agent_status(
            "a2",
            &[AgentStatus::Active],
            AgentStatus::Suspended,
            keygate::model::now(),
        )
        .await
        .unwrap();
    assert_eq!(left, Some(AgentStatus::Active));
    tx.commit().await.unwrap();
    for (i, id, found) in look_up(vec!["a1", "a2"]).await {
        let agent = found.expect("found");
        let suspended = agent.status == AgentStatus::Suspended;
        assert_eq!(
            suspended,
            id == "a2",
            "lookup {i} of {id} after the suspension"
        );
    }
}

/// Reads `a1`, `tk_a` and `tk_b` as a session check and a task open do, and
/// asserts they are what plain reads of the store find, twice (the first
/// may read the store, the second may be answered from memory).
async fn assert_current(store: &dyn Store, step: &str) {
    for _ in 0..2 {
        let remembered = store.agent_to_authenticate("a1").await.unwrap();
        let sessions = [
            store.task_with_agent("tk_a").await.unwrap(),
            store.task_with_agent("tk_b").await.unwrap(),
        ];
        let agent = store.get_agent("a1").await.unwrap();
        assert_eq!(remembered, agent, "{step}: the agent a task open reads");
        for (id, found) in ["tk_a", "tk_b"].into_iter().zip(sessions) {
            let task = store.get_task(id).await.unwrap().unwrap();
            assert_eq!(
                found,
                Some((task, agent.clone())),
                "{step}: what a session check of {id} reads"
            );
        }
    }
}

/// What a session check or a task open reads (the SQLite engine answers
/// them from memory while nothing changed) is what the store holds after
/// every kind of write, each made right after both were read: task opens
/// in the same second (the agent's `last_used_at` unchanged), in a later
/// one and in an earlier one (moved), a lease written, a transaction
/// dropped, a task ended, the agent suspended.
#[tokio::test]
async fn what_a_session_check_reads_is_what_the_store_holds() {
    use keygate::model::{AgentStatus, TaskState, now};
    use keygate::store::{JtiUse, TaskSelector};
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_a", "tk_b"], &[]).await;
    assert_current(store.as_ref(), "at the start").await;
    let t = now();
    let open_at = |n: u32, at: time::OffsetDateTime| {
        let store = Arc::clone(&store);
        async move {
            let task = common::store::open_task(&format!("tk_open{n}"), at);
            let jti = JtiUse {
                agent_id: "a1".into(),
                jti: format!("j-{n}"),
                expires_at: at + time::Duration::minutes(5),
            };
            assert_eq!(
                store.open_task_recorded(&jti, &task, vec![]).await.unwrap(),
                keygate::store::TaskOpen::Opened
            );
        }
    };
    open_at(1, t).await;
    assert_current(store.as_ref(), "after a task open").await;
    open_at(2, t).await;
    assert_current(store.as_ref(), "after a task open in the same second").await;
    open_at(3, t + time::Duration::seconds(7)).await;
    assert_current(store.as_ref(), "after a task open 7 s later").await;
    open_at(4, t - time::Duration::seconds(60)).await;
    assert_current(store.as_ref(), "after a task open a minute earlier").await;
    match store
        .insert_lease_audited(&lease_in("tk_a"), vec![])
        .await
        .unwrap()
    {
        keygate::store::LeaseInsert::Written { .. } => {}
        other => panic!("the lease was not written: {other:?}"),
    }
    assert_current(store.as_ref(), "after a lease write").await;
    let mut tx = store.begin().await.unwrap();
    tx.set_agent_status("a1", &[AgentStatus::Active], AgentStatus::Suspended, t)
        .await
        .unwrap();
    drop(tx);
    assert_current(store.as_ref(), "after a dropped suspension").await;
    let mut tx = store.begin().await.unwrap();
    tx.end_tasks(
        &TaskSelector::Task("tk_a".into()),
        TaskState::Completed,
        "test",
        t,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_current(store.as_ref(), "after a task ended").await;
    let mut tx = store.begin().await.unwrap();
    tx.set_agent_status("a1", &[AgentStatus::Active], AgentStatus::Suspended, t)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_current(store.as_ref(), "after the agent was suspended").await;
    let agent = store.get_agent("a1").await.unwrap().unwrap();
    assert_eq!(agent.status, AgentStatus::Suspended);
}
