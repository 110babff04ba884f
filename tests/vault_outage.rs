//! Revocation survives OpenBao outages and Keygate crashes: leases wait in
//! the durable queue with their error, and are revoked once OpenBao is back
//! (a durable server: file storage, initialised and unsealed by API).
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::peers::Storage;
use common::vault::{VaultPeers, broker_setup};
use common::{Session, TestAgent, TestBroker, eventually};
use serde_json::Value;

/// One credential of each revocable kind; returns (db user, db password,
/// token, serial).
async fn mint(b: &TestBroker, s: &Session) -> (String, String, String, String) {
    let db = b
        .credential(&s.token, "vault-db", Some(300), None)
        .await
        .expect(201);
    let tok = b
        .credential(&s.token, "vault-token", Some(300), None)
        .await
        .expect(201);
    let pki = b
        .credential(&s.token, "vault-pki", Some(300), None)
        .await
        .expect(201);
    let field = |v: &Value, k: &str| v["credential"][k].as_str().unwrap().to_owned();
    (
        field(&db, "username"),
        field(&db, "password"),
        field(&tok, "token"),
        field(&pki, "serial"),
    )
}

/// Waits until every lease of the task is `state`; returns them.
async fn all_leases(
    b: &TestBroker,
    task: &str,
    state: &'static str,
    with_error: bool,
) -> Vec<Value> {
    eventually(&format!("every lease {state}"), || async {
        let leases = b.leases(&format!("task={task}")).await;
        let ok = leases.len() == 3
            && leases
                .iter()
                .all(|l| l["state"] == state && (!with_error || l["last_error"].is_string()));
        ok.then_some(leases)
    })
    .await
}

/// Nothing Keygate minted is alive in OpenBao or PostgreSQL any more.
async fn nothing_left(peers: &VaultPeers, creds: &(String, String, String, String)) {
    let (user, pw, token, serial) = creds;
    assert!(
        peers.live_keygate_tokens().await.is_empty(),
        "a keygate token is still live"
    );
    assert!(
        peers.live_db_leases().await.is_empty(),
        "a database lease is still live"
    );
    assert!(!peers.token_works(token).await);
    assert!(
        !peers.pg.can_login(user, pw).await,
        "the database user still logs in"
    );
    assert!(peers.cert_revoked(serial).await);
}

#[tokio::test]
async fn revocations_wait_out_an_outage() {
    let mut peers = VaultPeers::start(Storage::Raft).await;
    let b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("outage", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let creds = mint(&b, &s).await;
    assert!(peers.pg.can_login(&creds.0, &creds.1).await);

    peers.bao.stop().await;
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["state"], "completed");
    assert_eq!(done["leases"]["pending"], 3, "{done}");
    let waiting = all_leases(&b, &s.task_id, "revoking", true).await;
    for l in &waiting {
        let err = l["last_error"].as_str().unwrap();
        assert!(err.contains("backend unavailable"), "{err}");
    }
    // While Vault is down the credentials still work: that is the outage.
    assert!(peers.pg.can_login(&creds.0, &creds.1).await);

    peers.bao.restart().await;
    let revoked = all_leases(&b, &s.task_id, "revoked", false).await;
    assert!(revoked.iter().all(|l| l["attempts"].as_u64().unwrap() >= 1));
    nothing_left(&peers, &creds).await;
}

#[tokio::test]
async fn the_queue_resumes_after_a_keygate_crash() {
    let mut peers = VaultPeers::start(Storage::Raft).await;
    let mut b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("crash", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let creds = mint(&b, &s).await;

    peers.bao.stop().await;
    b.complete(&s.token).await.expect(200);
    all_leases(&b, &s.task_id, "revoking", true).await;
    // kill -9 while Vault is down, and start again: Keygate must come up
    // without Vault and keep the queue.
    b.restart().await;
    let still = all_leases(&b, &s.task_id, "revoking", true).await;
    assert!(still.iter().all(|l| l["attempts"].as_u64().unwrap() >= 1));

    peers.bao.restart().await;
    all_leases(&b, &s.task_id, "revoked", false).await;
    nothing_left(&peers, &creds).await;
}
