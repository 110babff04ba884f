//! Task trees ended from two sides at once: a root task's own end (its
//! session token revoked, as a completion ends it) racing the kill switch
//! by team, which reaches the sub-agents' delegated tasks in its own
//! order. Both end, neither fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::delegation::{exchange, introspect, start_with};
use serde_json::json;

/// Eight orchestrator tasks, each with a task delegated to a sub-agent of
/// the same team, ended by their own tokens' revocation while the kill
/// switch takes the team: the kill switch answers 200, each revocation 200
/// (or 401, its task ended by the kill switch first), and every task of
/// the team is ended. On PostgreSQL both lock the tasks of a tree before
/// ending them, in one order; taken in each statement's own order, the
/// root's end (root, then child) and the kill switch (in its scan of the
/// team, a child before its root) would lock them crosswise and one would
/// fail as a deadlock.
#[tokio::test]
async fn a_tree_ended_by_its_root_and_by_the_kill_switch_at_once_ends_once() {
    let (b, c) = start_with("[limits]\nper_client_per_minute = 0\n").await;
    for round in 0..3 {
        let mut tokens = Vec::new();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let parent = b.token_ttl(&c.orch, Some(3600)).await;
            let child = exchange(&b, &parent.token, &c.sub, Some("x509-svid"))
                .await
                .expect(200);
            tokens.push(child["access_token"].as_str().unwrap().to_owned());
            tokens.push(parent.token);
        }
        let roots: Vec<String> = tokens.iter().skip(1).step_by(2).cloned().collect();
        for token in roots {
            let (http, url) = (b.http.clone(), b.url("/oauth/revoke"));
            set.spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth(&token)
                    .form(&[("token", token.as_str())])
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            });
        }
        let body = json!({ "team": "research", "reason": format!("race {round}") });
        let kill = b.post("/v1/revocations", Some(&b.ops.secops), &body).await;
        assert_eq!(kill.status, 200, "round {round}: {}", kill.text);
        for (status, text) in set.join_all().await {
            // Revoked, or ended by the kill switch first (its token then
            // no longer authenticates the call): never a failure.
            assert!(
                status == 200 || (status == 401 && text.contains("has ended")),
                "round {round}: {status} {text}"
            );
        }
        for token in &tokens {
            assert_eq!(introspect(&b, token).await, json!({ "active": false }));
        }
    }
    // Not by running again: they never collided.
    assert!(!b.log().contains("collided"), "{}", b.log());
}
