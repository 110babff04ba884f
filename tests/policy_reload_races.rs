//! Policy reloads racing what they judge: credential requests decided
//! under the old set while the new one forbids them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker, eventually};
use serde_json::{Value, json};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::policy_reload::{RESEARCH_JWT, narrowed, policy_dir};

/// Four clients asking for X.509-SVIDs with `token` (`rounds` each) until
/// refused (403); once 20 are issued, `change` runs. Every certificate
/// handed over, once the clients have stopped.
async fn race_x509(
    b: &Arc<TestBroker>,
    token: &str,
    rounds: usize,
    change: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let issued = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (b, token, issued) = (b.clone(), token.to_owned(), issued.clone());
        workers.push(tokio::spawn(async move {
            let mut certs = Vec::new();
            for _ in 0..rounds {
                let r = b.credential(&token, "x509-svid", Some(600), None).await;
                match r.status.as_u16() {
                    201 => {
                        let v: Value = serde_json::from_str(&r.text).unwrap();
                        certs.push(v["credential"]["certificate"].as_str().unwrap().to_owned());
                        issued.fetch_add(1, Ordering::SeqCst);
                    }
                    // Refused by the change, or judged again and refused.
                    403 => break,
                    other => panic!("unexpected {other}: {}", r.text),
                }
            }
            certs
        }));
    }
    eventually("some certificates issued", || async {
        (issued.load(Ordering::SeqCst) >= 20).then_some(())
    })
    .await;
    change.await;
    let mut certs = Vec::new();
    for w in workers {
        certs.extend(w.await.unwrap());
    }
    assert!(certs.len() >= 20, "{}", certs.len());
    certs
}

/// `agent`'s X.509 leases in `state`.
async fn x509_leases(b: &TestBroker, agent: &str, state: &str) -> usize {
    b.leases(&format!("agent={agent}&state={state}&limit=1000"))
        .await
        .into_iter()
        .filter(|l| l["scope"] == "x509-svid")
        .count()
}

/// Waits until none of `agent`'s X.509 leases is live, then checks every
/// one of `certs` is on the CRL (`what`: the change they must not outlive).
async fn nothing_live(b: &TestBroker, agent: &str, certs: &[String], what: &str) {
    eventually("every x509 lease ended", || async {
        let mut n = 0;
        for state in ["active", "pending", "revoking"] {
            n += x509_leases(b, agent, state).await;
        }
        (n == 0).then_some(())
    })
    .await;
    for cert in certs {
        let v = b.verify(&json!({ "x509_svid": cert })).await;
        assert_eq!(v["valid"], false, "a certificate outlived {what}: {v}");
    }
}

/// X.509-SVID requests racing a reload that forbids them: the local CA
/// signs before its lease is written (one commit, nothing exists outside
/// the process until then), so a request decided under the old set can
/// commit its lease after the reload's scan. Whatever the interleaving,
/// once the reload has answered and the requests stopped, no X.509 lease
/// of the agent is live and every certificate handed over is on the CRL.
#[tokio::test]
async fn requests_racing_a_reload_that_forbids_them_leave_nothing_live() {
    let b = Arc::new(TestBroker::start_with(Setup::default()).await);
    let agent = TestAgent::new("racer", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let certs = race_x509(&b, &s.token, 150, async {
        std::fs::write(policy_dir(&b).join("agents.cedar"), narrowed()).unwrap();
        b.post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
            .await
            .expect(200);
    })
    .await;
    nothing_live(&b, &agent.id, &certs, "the reload").await;
    assert!(
        x509_leases(&b, &agent.id, "revoked").await >= certs.len(),
        "every one handed over was revoked"
    );
}

/// X.509-SVID requests racing an admin's exclusion of their scope.
/// Whatever the interleaving — the exclusion committed before a lease's
/// write (the write sees it and the lease is revoked at once), or after
/// (the exclusion's own transaction finds the lease) — once the exclusion
/// has answered and the requests stopped, no lease of the excluded scope
/// is live, and every certificate handed over is on the CRL.
#[tokio::test]
async fn requests_racing_an_exclusion_leave_nothing_live_in_its_scope() {
    let b = Arc::new(TestBroker::start_with(Setup::default()).await);
    let agent = TestAgent::new("excluded-racer", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let certs = race_x509(&b, &s.token, 200, async {
        b.post(
            &format!("/v1/agents/{}/exclusions", agent.id),
            Some(&b.ops.admin),
            &json!({ "scope": "x509-svid", "reason": "racing test" }),
        )
        .await
        .expect(200);
    })
    .await;
    nothing_live(&b, &agent.id, &certs, "the exclusion").await;
    // The exclusion holds for new requests.
    b.credential(&s.token, "x509-svid", Some(60), None)
        .await
        .expect(403);
}

/// X.509-SVID requests racing an admin's move of their agent to a team that
/// may not hold them (but may hold JWT-SVIDs, so its task stays open): a
/// request that read its agent before the move and wrote its lease after
/// the move's scan of what the agent holds judges that lease again.
/// Whatever the interleaving, once the move has answered and the requests
/// stopped, no X.509 lease of the agent is live and every certificate
/// handed over is on the CRL.
#[tokio::test]
async fn requests_racing_an_agents_move_leave_nothing_live_it_may_no_longer_hold() {
    let b = Arc::new(
        TestBroker::start_with(Setup {
            policies: vec![("research.cedar".into(), RESEARCH_JWT.into())],
            ..Setup::default()
        })
        .await,
    );
    let agent = TestAgent::new("mover", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let certs = race_x509(&b, &s.token, 150, async {
        let r = b
            .patch_agent(&agent.id, &json!({ "team": "research" }))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    })
    .await;
    nothing_live(&b, &agent.id, &certs, "the move").await;
    // The task itself stays open: the agent still reaches JWT-SVIDs.
    b.jwt_svid(&s.token, Some(60)).await;
}
