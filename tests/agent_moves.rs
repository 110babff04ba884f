//! What an agent's attributes changing does to what it holds, through the
//! real server: moved where it may reach nothing, it loses its open tasks
//! even with no credential to revoke; a move held for provisioning approval
//! is judged, once granted, exactly as one applied at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker, eventually};
use serde_json::json;

/// An agent moved where it may reach nothing loses its open tasks even when
/// it holds no credential the move forbids: its session token stops working
/// at once.
#[tokio::test]
async fn an_agent_moved_to_a_team_without_access_loses_its_tasks_without_leases() {
    let b = TestBroker::start_with(Setup::default()).await;
    let agent = TestAgent::new("bare", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let r = b
        .patch_agent(&agent.id, &json!({ "team": "research" }))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let refused = b.credential(&s.token, "jwt-svid", Some(60), None).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
    let ev = b.audit("action=agent.tasks_ended_by_policy").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["details"]["tasks"], json!([s.task_id]), "{ev:?}");
    assert_eq!(ev[0]["details"]["leases"], json!([]), "{ev:?}");
}

/// The same move held for approval (`require_approval`): once granted, what
/// the agent holds is judged on its new team as when the change applies at
/// once, not left live until its TTL.
#[tokio::test]
async fn a_move_granted_through_approval_revokes_what_the_new_team_may_not_hold() {
    let b = TestBroker::start_with(Setup {
        extra_config: "[provisioning]\nrequire_approval = true\napprovals = 1\n".into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("held-move", "ES256");
    let decide = |id: String| {
        let b = &b;
        async move {
            b.post(
                &format!("/v1/approvals/{id}/decision"),
                Some(&b.ops.approver),
                &json!({ "decision": "approve", "reason": "checked" }),
            )
            .await
            .expect(200)
        }
    };
    let held = b
        .admin_post("/v1/agents", &agent.spec("platform"))
        .await
        .expect(202);
    decide(held["approval"]["id"].as_str().unwrap().to_owned()).await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let lease = b.x509(&s.token, Some(600)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = b
        .patch_agent(&agent.id, &json!({ "team": "research" }))
        .await;
    let held = r.expect(202);
    // Held: nothing changes yet.
    assert_eq!(b.lease_state(&lease).await, "active");
    decide(held["approval"]["id"].as_str().unwrap().to_owned()).await;
    eventually("the lease revoked", || async {
        (b.lease_state(&lease).await == "revoked").then_some(())
    })
    .await;
    let ev = b.audit("action=lease.policy_revoked").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    let refused = b.credential(&s.token, "jwt-svid", Some(60), None).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
}
