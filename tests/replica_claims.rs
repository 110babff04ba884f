//! The claim protocol of several replicas on one PostgreSQL, below the
//! API: what `tests/replicas.rs` relies on when it kills replicas under load.

use std::sync::Arc;

use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::common;
use common::eventually;

/// The claim protocol on its own, below the API: two replicas' stores on
/// one database claim disjoint work while both live; when one dies (its
/// lock's connection is cut, as SIGKILL would), the other takes its claimed
/// leases and its in-flight issues at once, not when the claims expire.
#[tokio::test(flavor = "multi_thread")]
async fn claims_are_disjoint_while_both_live_and_a_dead_ones_are_void_at_once() {
    use keygate::model::{Lease, LeaseState, now};
    use keygate::store::{LeaseSelector, Store};
    let pg = common::store::cluster();
    let name = format!("kg_claims_{}", uuid::Uuid::new_v4().simple());
    let url = pg.create_database(&name);
    let direct = format!(
        "postgres://postgres:{}@127.0.0.1:{}/{name}",
        pg.password, pg.port
    );
    let password = secrecy::SecretString::from(pg.password.clone());
    let a: Arc<dyn Store> = keygate::store::open_with(&url, Some(&password))
        .await
        .unwrap();
    let b: Arc<dyn Store> = keygate::store::open_with(&url, Some(&password))
        .await
        .unwrap();
    a.register_replica("boot-a").await.unwrap();
    b.register_replica("boot-b").await.unwrap();

    let t = now();
    let agent = common::store::test_agent();
    let task = |id: &str| common::store::open_task(id, t);
    let lease = |task: &str, boot: &str| Lease {
        id: keygate::model::new_id("ls"),
        agent_id: "a1".into(),
        task_id: task.into(),
        scope: "s".into(),
        provider: "p".into(),
        state: LeaseState::Pending,
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
        boot_id: Some(boot.into()),
        source: None,
    };
    let mut tx = a.begin().await.unwrap();
    tx.insert_agent(&agent).await.unwrap();
    assert!(tx.insert_task(&task("queued")).await.unwrap());
    assert!(tx.insert_task(&task("in-flight")).await.unwrap());
    for _ in 0..300 {
        let l = lease("queued", "boot-a");
        tx.insert_lease(&l).await.unwrap();
        tx.record_issued(
            &l.id,
            &json!({ "serial": "x" }),
            keygate::model::Revocability::Revocable,
            l.expires_at,
        )
        .await
        .unwrap();
    }
    // Being issued by replica A right now: nobody else may touch it.
    let in_flight = lease("in-flight", "boot-a");
    tx.insert_lease(&in_flight).await.unwrap();
    tx.queue_revocations(&LeaseSelector::Task("queued".into()), "test", None, t)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // Both claim, at the same time, in rounds: never the same lease.
    let hold = t + time::Duration::minutes(10);
    let old = t - time::Duration::hours(1);
    let mut seen = std::collections::BTreeMap::new();
    let mut held_by_a = Vec::new();
    for round in 0..5u32 {
        let n = 20 + round * 7;
        let (x, y) = tokio::join!(
            a.claim_revocations(now(), old, "boot-a", hold, n),
            b.claim_revocations(now(), old, "boot-b", hold, n + 3)
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(
            !x.is_empty() && !y.is_empty(),
            "round {round}: {} {}",
            x.len(),
            y.len()
        );
        // A replica may take up its own claims again (a pass whose record
        // failed); never the other's.
        for (who, l) in x.iter().map(|l| ("a", l)).chain(y.iter().map(|l| ("b", l))) {
            let first = seen.entry(l.id.clone()).or_insert(who);
            assert_eq!(*first, who, "lease {} claimed by both", l.id);
            assert!(l.handle.is_some(), "an in-flight issue was claimed");
        }
        held_by_a.extend(x.into_iter().map(|l| l.id));
    }
    // A claim of a live replica holds: B gets none of A's again.
    let again = b
        .claim_revocations(now(), old, "boot-b", hold, 1000)
        .await
        .unwrap();
    assert!(again.iter().all(|l| !held_by_a.contains(&l.id)));
    let mut tx = b.begin().await.unwrap();
    assert!(
        tx.queue_orphans(old, "boot-b", now())
            .await
            .unwrap()
            .is_empty(),
        "A is alive"
    );
    tx.commit().await.unwrap();

    // A dies: its lock's connection is cut.
    let mut c = PgConnection::connect(&direct).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(l.pid))::bigint FROM pg_locks l JOIN replicas r \
         ON l.locktype = 'advisory' AND l.classid = 19271 AND l.objid::bigint = r.lock_key \
         WHERE r.boot_id = 'boot-a'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    // At once (the claims run ten more minutes): B takes what A held, and
    // A's in-flight issue is an orphan.
    let taken = std::sync::Mutex::new(Vec::new());
    eventually("B to take over A's claims", || async {
        let got = b
            .claim_revocations(now(), old, "boot-b", hold, 1000)
            .await
            .unwrap();
        let mut taken = taken.lock().unwrap();
        taken.extend(got.into_iter().map(|l| l.id));
        (held_by_a.iter().all(|id| taken.contains(id))).then_some(())
    })
    .await;
    let mut tx = b.begin().await.unwrap();
    let orphans = tx.queue_orphans(old, "boot-b", now()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(orphans, std::slice::from_ref(&in_flight.id));
    // A takes its lock again by itself, and is ready again.
    eventually("A to hold its lock again", || async {
        let mut c = PgConnection::connect(&direct).await.unwrap();
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*)::bigint FROM pg_locks l JOIN replicas r ON l.locktype = 'advisory' \
             AND l.granted AND l.classid = 19271 AND l.objid::bigint = r.lock_key \
             WHERE r.boot_id = 'boot-a'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        (held == 1).then_some(())
    })
    .await;
    eventually("A to be ready again", || async {
        a.ping().await.is_ok().then_some(())
    })
    .await;
}
