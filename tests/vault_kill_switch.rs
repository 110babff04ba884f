//! The kill switch while OpenBao is down: its `wait`, a waiting look at its
//! progress and `keygate revoke` each run out on time with the leases still
//! pending, and answer revoked once OpenBao is back.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use crate::vault_outage::{mint, nothing_left};

use common::peers::Storage;
use common::vault::{VaultPeers, broker_setup};
use common::{TestAgent, TestBroker};
use serde_json::Value;

/// A kill switch's `wait`, and a look at its progress with `wait`, run out
/// while Vault is down: each answers once its seconds pass, not sooner and
/// not never, with the leases still pending; once Vault is back a look
/// that waits answers with every lease revoked.
#[tokio::test]
async fn a_kill_switch_waits_out_its_seconds_while_vault_is_down() {
    let mut peers = VaultPeers::start(Storage::Raft).await;
    let b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("waits", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let creds = mint(&b, &s).await;
    let other = TestAgent::new("follows", "ES256");
    b.register(&other, "platform").await;
    let others = mint(&b, &b.token(&other).await).await;

    peers.bao.stop().await;
    // `keygate revoke` follows the progress until its timeout, then says
    // what is still pending and fails.
    let t0 = std::time::Instant::now();
    let args = [
        "revoke",
        "--agent",
        &other.id,
        "--reason",
        "outage",
        "--timeout",
        "2",
    ];
    let out = b.cli(&args, Some(&b.ops.secops)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("3 lease(s) still pending"), "{stderr}");
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
    let followed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let followed = format!(
        "/v1/revocations/{}",
        followed["revocation_id"].as_str().unwrap()
    );

    let t0 = std::time::Instant::now();
    let body = serde_json::json!({ "agent": agent.id, "reason": "outage", "wait": 2 });
    let rv = b
        .post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    let waited = t0.elapsed();
    assert!(waited >= std::time::Duration::from_secs(2), "{waited:?}");
    assert!(waited < std::time::Duration::from_secs(30), "{waited:?}");
    assert_eq!(
        (rv["found"].as_u64(), rv["pending"].as_u64()),
        (Some(3), Some(3)),
        "{rv}"
    );
    let path = format!("/v1/revocations/{}", rv["revocation_id"].as_str().unwrap());
    let t0 = std::time::Instant::now();
    let look = b
        .get(&format!("{path}?wait=1"), Some(&b.ops.auditor))
        .await
        .expect(200);
    assert!(t0.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(look["pending"].as_u64(), Some(3), "{look}");
    assert_eq!(look["revoked"].as_u64(), Some(0), "{look}");
    // Many waiting looks at once (they share one check a moment): each
    // answers after its second with the same progress.
    let mut looks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (http, url) = (b.http.clone(), b.url(&format!("{path}?wait=1")));
        let auditor = b.ops.auditor.clone();
        looks.spawn(async move {
            let t0 = std::time::Instant::now();
            let r = http.get(url).bearer_auth(auditor).send().await.unwrap();
            (
                r.status().as_u16(),
                t0.elapsed(),
                r.json::<Value>().await.unwrap(),
            )
        });
    }
    for (status, took, look) in looks.join_all().await {
        assert_eq!(status, 200, "{look}");
        assert!(took >= std::time::Duration::from_secs(1), "{took:?}");
        assert_eq!(look["pending"].as_u64(), Some(3), "{look}");
    }
    assert!(
        peers.pg.can_login(&creds.0, &creds.1).await,
        "nothing revoked while Vault is down"
    );

    peers.bao.restart().await;
    let done = b
        .get(&format!("{path}?wait=60"), Some(&b.ops.auditor))
        .await
        .expect(200);
    assert_eq!(done["pending"].as_u64(), Some(0), "{done}");
    assert_eq!(done["revoked"].as_u64(), Some(3), "{done}");
    let done = b
        .get(&format!("{followed}?wait=60"), Some(&b.ops.auditor))
        .await
        .expect(200);
    assert_eq!(done["revoked"].as_u64(), Some(3), "{done}");
    nothing_left(&peers, &creds).await;
    nothing_left(&peers, &others).await;
}
