//! The store contract for task opens, on the harness's engine: racing
//! opens spend each `jti` once, and an open overtaken by its agent's
//! suspension or its parent's end writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use crate::store_contract::{agent_with_tasks, db_path, events, open, reasons};

use std::sync::Arc;

use keygate::audit::{Actor, AuditEvent, GENESIS_HASH, verify_chain};
use keygate::store::Store;

/// Opens `task` of `a1` with assertion id `jti` and an event whose reason
/// is the task's id.
async fn open_with_event(
    store: &dyn Store,
    jti: &str,
    task: &keygate::model::Task,
    t: time::OffsetDateTime,
) -> keygate::store::TaskOpen {
    let use_ = keygate::store::JtiUse {
        agent_id: "a1".into(),
        jti: jti.into(),
        expires_at: t + time::Duration::minutes(5),
    };
    let ev = AuditEvent::new(&Actor::System, "test.open")
        .task(&task.id)
        .reason(task.id.clone());
    store
        .open_task_recorded(&use_, task, vec![ev])
        .await
        .unwrap()
}

/// Task opens racing each other (the SQLite engine batches them): each
/// `jti` opens one task however many present it at once, a `jti` seen
/// before opens none, and every task reported open is there with its
/// event, nothing else is, with the audit chain unbroken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_task_opens_spend_each_jti_once() {
    use keygate::model::now;
    use keygate::store::{JtiUse, TaskOpen};
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &[], &[]).await;
    let t = now();
    // First 60 distinct ids at once, then 150 where every tenth id is
    // presented three times at once.
    let round = |ids: std::ops::Range<usize>| {
        let mut set = tokio::task::JoinSet::new();
        for i in ids {
            let store = Arc::clone(&store);
            let jti = if i < 1000 && i % 10 < 3 {
                format!("j-shared-{}", i / 10)
            } else {
                format!("j-{i}")
            };
            set.spawn(async move {
                let task = common::store::open_task(&format!("tk_{i:04}"), t);
                let opened = open_with_event(store.as_ref(), &jti, &task, t).await;
                (jti, task.id, opened == TaskOpen::Opened)
            });
        }
        set.join_all()
    };
    let mut results = round(1000..1060).await;
    results.extend(round(0..150).await);
    let mut opened = Vec::new();
    let mut per_jti = std::collections::HashMap::<String, usize>::new();
    for (jti, task, fresh) in results {
        if fresh {
            *per_jti.entry(jti).or_default() += 1;
            opened.push(task);
        }
    }
    assert_eq!(per_jti.len(), 60 + 150 - 15 * 2, "every jti opened a task");
    assert!(
        per_jti.values().all(|n| *n == 1),
        "a jti opened two tasks: {per_jti:?}"
    );
    // A jti seen before opens nothing, alone as in a batch.
    let again = JtiUse {
        agent_id: "a1".into(),
        jti: "j-5".into(),
        expires_at: t + time::Duration::minutes(5),
    };
    let mut task = store.get_task(&opened[0]).await.unwrap().unwrap();
    task.id = "tk_replayed".into();
    assert_eq!(
        store
            .open_task_recorded(&again, &task, Vec::new())
            .await
            .unwrap(),
        TaskOpen::Replayed
    );
    assert!(store.get_task("tk_replayed").await.unwrap().is_none());
    for id in &opened {
        assert!(
            store.get_task(id).await.unwrap().is_some(),
            "{id} reported open, not stored"
        );
    }
    opened.sort();
    let evs = events(store.as_ref()).await;
    let mut audited: Vec<String> = evs.iter().filter_map(|e| e.reason.clone()).collect();
    audited.sort();
    assert_eq!(
        audited, opened,
        "each opened task has its event, no other has one"
    );
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
    let agent = store.get_agent("a1").await.unwrap().unwrap();
    assert!(agent.last_used_at.is_some(), "the agent is marked used");
}

/// A task open that finds its agent no longer active, or its parent task
/// ended, writes nothing, in a batch as alone: it read them before a
/// suspension, the kill switch or the parent's end committed, and no task
/// outlives those (a token for it would come back to life when the agent
/// is resumed). Its `jti` is not spent either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_open_overtaken_by_a_suspension_or_its_parents_end_writes_nothing() {
    use keygate::model::{AgentStatus, Task, TaskState, now};
    use keygate::store::{TaskOpen, TaskSelector};
    let (_dir, path) = db_path();
    let store = open(&path).await;
    agent_with_tasks(store.as_ref(), &["tk_parent"], &[]).await;
    let t = now();
    let child = |id: &str| {
        let mut c = common::store::open_task(id, t);
        c.parent_task_id = Some("tk_parent".into());
        c.depth = 1;
        c
    };
    // Opens at once (batched where the engine batches), each with its
    // event; what each did.
    let opens = |tasks: Vec<(Task, &'static str)>| {
        let mut set = tokio::task::JoinSet::new();
        for (task, jti) in tasks {
            let store = Arc::clone(&store);
            set.spawn(async move {
                let opened = open_with_event(store.as_ref(), jti, &task, t).await;
                (task.id, opened)
            });
        }
        set.join_all()
    };
    const JTIS: [&str; 6] = ["j-0", "j-1", "j-2", "j-3", "j-4", "j-5"];
    let r = opens(vec![(child("tk_child"), "j-child")]).await;
    assert_eq!(r, vec![("tk_child".to_owned(), TaskOpen::Opened)]);

    let end = |sel: TaskSelector| {
        let store = Arc::clone(&store);
        async move {
            let mut tx = store.begin().await.unwrap();
            tx.end_tasks(&sel, TaskState::Revoked, "test", t)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    end(TaskSelector::Task("tk_parent".into())).await;
    let children = JTIS.iter().enumerate();
    let r = opens(
        children
            .map(|(i, j)| (child(&format!("tk_late{i}")), *j))
            .collect(),
    )
    .await;
    assert!(
        r.iter().all(|(_, o)| *o == TaskOpen::Overtaken),
        "a child opened under an ended parent: {r:?}"
    );
    // Not spent: the same `jti`s open tasks of the agent's own.
    let roots = JTIS.iter().enumerate();
    let r = opens(
        roots
            .map(|(i, j)| (common::store::open_task(&format!("tk_root{i}"), t), *j))
            .collect(),
    )
    .await;
    assert!(r.iter().all(|(_, o)| *o == TaskOpen::Opened), "{r:?}");

    let mut tx = store.begin().await.unwrap();
    let suspended = tx
        .set_agent_status("a1", &[AgentStatus::Active], AgentStatus::Suspended, t)
        .await
        .unwrap();
    assert!(suspended.is_some());
    tx.commit().await.unwrap();
    let late = (0..6).map(|i| (common::store::open_task(&format!("tk_gone{i}"), t), JTIS[i]));
    let mut late: Vec<_> = late.collect();
    late.push((common::store::open_task("tk_gone_fresh", t), "j-fresh"));
    let r = opens(late).await;
    assert!(
        r.iter().all(|(_, o)| *o != TaskOpen::Opened),
        "a task opened for a suspended agent: {r:?}"
    );
    assert!(r.contains(&("tk_gone_fresh".to_owned(), TaskOpen::Overtaken)));

    let mut named: Vec<String> = ["tk_parent", "tk_child", "tk_gone_fresh"]
        .map(String::from)
        .to_vec();
    for i in 0..6 {
        named.extend([
            format!("tk_late{i}"),
            format!("tk_root{i}"),
            format!("tk_gone{i}"),
        ]);
    }
    let mut stored: Vec<String> = store
        .tasks(&named)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    stored.sort();
    let mut expected: Vec<String> = ["tk_child", "tk_parent"].map(String::from).to_vec();
    expected.extend((0..6).map(|i| format!("tk_root{i}")));
    expected.sort();
    assert_eq!(stored, expected, "only the tasks reported open are stored");
    let mut opened = expected.clone();
    opened.retain(|id| id != "tk_parent");
    assert_eq!(reasons(&events(store.as_ref()).await), opened);
    let evs = events(store.as_ref()).await;
    verify_chain(&evs, 0, GENESIS_HASH.to_owned()).expect("one unbroken chain");
}
