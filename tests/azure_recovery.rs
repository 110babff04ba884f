//! What survives crashes and outages, through Keygate's HTTP API: a broker
//! killed between `addPassword` and recording the lease, leftovers the
//! sweeper finds at start and later, and a Graph outage that queues
//! revocations until Graph answers again.
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::azure::{APP_OBJECT, AzurePeers, scopes};
use common::{TestBroker, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// How many times the Graph fake has answered an application read (each
/// sweep reads the app once).
fn app_reads(peers: &AzurePeers) -> usize {
    peers
        .graph
        .calls()
        .iter()
        .filter(|c| c.method == "GET" && c.status == 200)
        .count()
}

#[tokio::test]
async fn a_crash_after_add_password_is_revoked_by_name_on_restart() {
    let peers = AzurePeers::start().await;
    let mut b = TestBroker::start_with(peers.setup(&scopes(5))).await;
    let (agent, s) = b.agent_with_task("crashy", "platform").await;
    // Graph adds the password but does not answer; the broker dies waiting.
    let hold = peers.graph.hold_next_add();
    let url = b.url("/v1/credentials");
    let http = b.http.clone();
    let token = s.token.clone();
    let request = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(token)
            .json(&json!({ "scope": "deploy-app", "ttl": 600 }))
            .send()
            .await
    });
    let name = eventually("graph to hold the new password", || async {
        peers
            .keygate_passwords()
            .first()
            .and_then(|p| p.display_name.clone())
    })
    .await;
    b.kill().await;
    assert!(request.await.unwrap().is_err(), "the broker answered");
    let lease_id = name.rsplit(':').next().unwrap().to_owned();
    assert_eq!(
        name,
        format!("keygate:{}:{}:{lease_id}", agent.id, s.task_id)
    );
    hold.notify_one();

    // On restart the pending lease is an orphan: revoked by lease id, so
    // its password is found by name and removed.
    b.restart().await;
    eventually("the orphan's password to be removed", || async {
        peers.keygate_passwords().is_empty().then_some(())
    })
    .await;
    let state = eventually("the orphaned lease to be revoked", || async {
        let st = b.lease_state(&lease_id).await;
        (st == "revoked").then_some(st)
    })
    .await;
    assert_eq!(state, "revoked");
    let orphaned = b.audit("action=lease.orphaned").await;
    assert_eq!(orphaned.len(), 1);
    assert_eq!(orphaned[0]["lease"], lease_id.as_str());
    let revoked = b.audit("action=lease.revoked").await;
    assert_eq!(revoked[0]["details"]["result"], "revoked", "{revoked:?}");
    // The revocation queue did it; the sweeper found nothing of its own.
    assert!(b.audit("action=provider.swept").await.is_empty());
}

#[tokio::test]
async fn the_sweeper_removes_leftovers_and_nothing_else() {
    let peers = AzurePeers::start().await;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    // Left by a broker whose store no longer knows the lease (a lost
    // database, a restore from an older backup), and one long expired.
    let ghost = peers.graph.add_password(
        APP_OBJECT,
        "keygate:ghost-agent:tk_ghost:ls_ghost",
        now + day,
    );
    let expired =
        peers
            .graph
            .add_password(APP_OBJECT, "keygate:old-agent:tk_old:ls_old", now - day);
    // Not Keygate's, or not in Keygate's format: never touched.
    let ci = peers
        .graph
        .add_password(APP_OBJECT, "CI deploy secret", now + day);
    let odd = peers
        .graph
        .add_password(APP_OBJECT, "keygate:notes", now + day);

    let mut setup = peers.setup(&scopes(5));
    setup.extra_config = peers.provider_toml(1);
    let b = TestBroker::start_with(setup).await;
    let swept = eventually("the start-up sweep to audit two removals", || async {
        let ev = b.audit("action=provider.swept").await;
        (ev.len() == 2).then_some(ev)
    })
    .await;
    let by_lease = |id: &str| -> &Value {
        swept
            .iter()
            .find(|e| e["lease"] == id)
            .unwrap_or_else(|| panic!("no sweep of {id}: {swept:?}"))
    };
    let g = by_lease("ls_ghost");
    assert_eq!(g["actor"], "system");
    assert!(
        g["reason"].as_str().unwrap().contains("lease is not live"),
        "{g}"
    );
    assert_eq!(g["details"]["provider"], "azure");
    assert_eq!(g["details"]["backend"]["key_id"], ghost.as_str());
    assert_eq!(g["details"]["backend"]["agent"], "ghost-agent");
    let o = by_lease("ls_old");
    assert_eq!(o["reason"], "it expired");
    assert_eq!(o["details"]["backend"]["key_id"], expired.as_str());
    let mut left: Vec<String> = peers
        .graph
        .passwords(APP_OBJECT)
        .into_iter()
        .map(|p| p.key_id)
        .collect();
    left.sort();
    let mut kept = vec![ci, odd];
    kept.sort();
    assert_eq!(left, kept);

    // A live lease's password survives later sweeps.
    let (_, s) = b.agent_with_task("live", "platform").await;
    let cred = b
        .credential(&s.token, "deploy-app", Some(600), None)
        .await
        .expect(201);
    let reads = app_reads(&peers);
    eventually("two more sweeps", || async {
        (app_reads(&peers) >= reads + 2).then_some(())
    })
    .await;
    let lease = cred["lease_id"].as_str().unwrap();
    let mut names: Vec<String> = peers
        .keygate_passwords()
        .into_iter()
        .filter_map(|p| p.display_name)
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with(lease), "{names:?}");
    assert_eq!(names[1], "keygate:notes");
    assert_eq!(b.audit("action=provider.swept").await.len(), 2);
    assert!(peers.graph.secret_works(
        APP_OBJECT,
        cred["credential"]["client_secret"].as_str().unwrap()
    ));
}

#[tokio::test]
async fn revocations_wait_out_a_graph_outage() {
    let peers = AzurePeers::start().await;
    let b = TestBroker::start_with(peers.setup(&scopes(5))).await;
    let (_, s) = b.agent_with_task("patient", "platform").await;
    let cred = b
        .credential(&s.token, "deploy-app", Some(600), None)
        .await
        .expect(201);
    let lease = cred["lease_id"].as_str().unwrap().to_owned();
    let secret = cred["credential"]["client_secret"]
        .as_str()
        .unwrap()
        .to_owned();

    peers.graph.set_outage(true);
    // An issue during the outage fails with Graph's own answer...
    let refused = b
        .credential(&s.token, "deploy-app", Some(600), None)
        .await
        .expect(502);
    let msg = refused["message"].as_str().unwrap();
    assert!(
        msg.contains("backend unavailable") && msg.contains("answered 503 serviceNotAvailable"),
        "{msg}"
    );
    // ...and a release leaves the lease queued with the error, visibly.
    let released = b
        .call(
            Method::DELETE,
            &format!("/v1/credentials/{lease}"),
            Some(&s.token),
            None,
        )
        .await
        .expect(200);
    assert_eq!(released["state"], "revoking", "{released}");
    assert!(
        released["last_error"]
            .as_str()
            .unwrap()
            .contains("graph `removePassword` answered 503"),
        "{released}"
    );
    assert!(peers.graph.secret_works(APP_OBJECT, &secret));
    let queued = b.leases("state=revoking").await;
    assert_eq!(
        queued.len(),
        2,
        "the failed issue is queued too: {queued:?}"
    );
    let failures = b.audit("action=lease.revoked").await;
    assert!(failures.iter().any(|e| e["outcome"] == "failure"));

    // Graph is back: both resolve, the password is gone.
    peers.graph.set_outage(false);
    eventually("both leases revoked", || async {
        let all = b.leases(&format!("task={}", s.task_id)).await;
        all.iter().all(|l| l["state"] == "revoked").then_some(())
    })
    .await;
    assert!(!peers.graph.secret_works(APP_OBJECT, &secret));
    assert!(peers.keygate_passwords().is_empty());

    // Throttled (429 `TooManyRequests` with `Retry-After`): a release waits
    // in the queue with Graph's answer, and completes once Graph lets it.
    let (_, s) = b.agent_with_task("throttled", "platform").await;
    let cred = b
        .credential(&s.token, "deploy-app", Some(600), None)
        .await
        .expect(201);
    let lease = cred["lease_id"].as_str().unwrap().to_owned();
    let secret = cred["credential"]["client_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    peers.graph.throttle_next(usize::MAX / 2);
    let released = b
        .call(
            Method::DELETE,
            &format!("/v1/credentials/{lease}"),
            Some(&s.token),
            None,
        )
        .await
        .expect(200);
    assert_eq!(released["state"], "revoking", "{released}");
    assert!(
        released["last_error"]
            .as_str()
            .unwrap()
            .contains("answered 429 TooManyRequests"),
        "{released}"
    );
    assert!(peers.graph.secret_works(APP_OBJECT, &secret));
    peers.graph.throttle_next(0);
    eventually("the throttled release completes", || async {
        (b.lease_state(&lease).await == "revoked").then_some(())
    })
    .await;
    assert!(!peers.graph.secret_works(APP_OBJECT, &secret));
}
