//! What survives crashes and outages, through Keygate's HTTP API: a broker
//! killed between `addPassword` and recording the lease, leftovers the
//! sweeper finds at start and later, and a Graph outage that queues
//! revocations until Graph answers again.
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

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

/// Keygate's client secret by `file:` reference is read at first use and
/// read again after Entra refuses it: rotating the secret on disk (as a
/// secrets operator does) heals the broker without a restart.
#[tokio::test]
async fn a_rotated_client_secret_is_read_again_after_a_refusal() {
    let peers = AzurePeers::start().await;
    let secret_file = peers.dir.join("rotating-secret");
    std::fs::write(&secret_file, "kg~an-old-rotated-out-secret").unwrap();
    let mut setup = peers.setup(&scopes(5));
    setup.extra_config = setup.extra_config.replace(
        &format!("env:{}", common::azure::KEYGATE_SECRET_ENV),
        &format!("file:{}", secret_file.display()),
    );
    assert!(
        setup.extra_config.contains("file:"),
        "{}",
        setup.extra_config
    );
    let b = TestBroker::start_with(setup).await;
    let (_, s) = b.agent_with_task("rotated", "platform").await;
    let r = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(502);
    assert!(
        r["message"].as_str().unwrap().contains("AADSTS7000215"),
        "{r}"
    );
    // Rotated on disk: the next request reads it and gets in.
    std::fs::write(&secret_file, &peers.keygate_secret).unwrap();
    let cred = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(201);
    assert_eq!(peers.keygate_passwords().len(), 1);
    assert!(!b.log().contains(&peers.keygate_secret));
    b.complete(&s.token).await.expect(200);
    assert!(peers.keygate_passwords().is_empty(), "{cred}");
}

/// A sweep Graph cuts short is audited as `provider.sweep_failed` with
/// Graph's answer, removes nothing, and the next sweep finishes the job.
#[tokio::test]
async fn a_sweep_cut_short_is_audited_and_retried() {
    let peers = AzurePeers::start().await;
    let now = OffsetDateTime::now_utc();
    let ghost = peers.graph.add_password(
        APP_OBJECT,
        "keygate:ghost-agent:tk_ghost:ls_ghost",
        now + time::Duration::days(1),
    );
    peers.graph.set_outage(true);
    let mut setup = peers.setup(&scopes(5));
    setup.extra_config = peers.provider_toml(1);
    let b = TestBroker::start_with(setup).await;
    let failed = eventually("a failed sweep audited", || async {
        b.audit("action=provider.sweep_failed").await.pop()
    })
    .await;
    assert_eq!(failed["actor"], "system");
    assert_eq!(failed["outcome"], "failure");
    assert_eq!(failed["details"]["provider"], "azure");
    assert!(
        failed["reason"].as_str().unwrap().contains("503"),
        "{failed}"
    );
    assert_eq!(
        peers.graph.passwords(APP_OBJECT).len(),
        1,
        "nothing removed"
    );
    assert!(b.audit("action=provider.swept").await.is_empty());

    peers.graph.set_outage(false);
    let swept = eventually("the next sweep removes the leftover", || async {
        b.audit("action=provider.swept").await.pop()
    })
    .await;
    assert_eq!(swept["details"]["backend"]["key_id"], ghost.as_str());
    assert!(peers.graph.passwords(APP_OBJECT).is_empty());
}
