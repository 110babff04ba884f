//! Approvals that policy and provisioning decide through the real server:
//! new agents and widening changes held for a human, policy approving by
//! itself, and what a tier-three agent must still confirm in Keygate. Split
//! from `approvals.rs`, whose world and helpers these tests share.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use super::approvals::*;
use common::slack::{click_body, post_click};
use common::{TestAgent, eventually, unix_now};
use serde_json::{Value, json};

#[tokio::test]
async fn provisioning_approval_holds_new_agents_and_widening_changes() {
    let w = world(
        "[provisioning]\nrequire_approval = true\napprovals = 2\napprover_teams = [\"payments\"]\n",
    )
    .await;
    let (b, ap) = (&w.b, &w.ap);
    let agent = TestAgent::new("prov", "ES256");
    // Tier 3: the test policy lets it reach no scope.
    let mut spec = agent.spec("finance");
    spec["risk_tier"] = json!(3);
    let held = b.admin_post("/v1/agents", &spec).await.expect(202);
    assert_eq!(held["agent"]["status"], "pending");
    let id = held["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(held["approval"]["kind"], "provisioning");
    // A pending agent cannot open a task.
    let r = b.token_with_assertion(&agent.id, &agent.assertion()).await;
    assert_eq!(r.status, 401, "{}", r.text);
    // An admin without the approver role cannot approve; Carol is not in
    // the approving team.
    assert_eq!(decide(b, &b.ops.admin, &id, "approve").await.status, 403);
    let r = decide(b, &ap.carol, &id, "approve").await;
    assert_eq!(r.status, 403, "carol is not in payments: {}", r.text);
    decide(b, &ap.alice, &id, "approve").await.expect(200);
    let agent_url = format!("/v1/agents/{}", agent.id);
    assert_eq!(b.admin_get(&agent_url).await["status"], "pending");

    // Dave holds both roles and is in the team: only the requester rule
    // can stop him approving the agent he registered himself.
    let own = TestAgent::new("prov-own", "ES256");
    let mine = b
        .post("/v1/agents", Some(&ap.dave), &own.spec("finance"))
        .await
        .expect(202);
    let mine = mine["approval"]["id"].as_str().unwrap().to_owned();
    let r = decide(b, &ap.dave, &mine, "approve").await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.text
            .contains("asked for this change and cannot also decide it"),
        "{}",
        r.text
    );
    // ... while he may approve what someone else asked for.
    decide(b, &ap.dave, &id, "approve").await.expect(200);
    assert_eq!(b.admin_get(&agent_url).await["status"], "active");
    b.token(&agent).await;

    let patch = |body: Value| {
        let url = agent_url.clone();
        async move {
            b.call(
                reqwest::Method::PATCH,
                &url,
                Some(&b.ops.admin),
                Some(&body),
            )
            .await
        }
    };
    // A change that reaches no new scope applies at once.
    let r = patch(json!({ "purpose": "reconcile invoices" })).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["purpose"], "reconcile invoices");

    // Tier 2 makes every CA scope reachable: the change waits.
    let r = patch(json!({ "risk_tier": 2 })).await;
    let held = r.expect(202);
    let widened = held["widened_scopes"].as_array().unwrap();
    assert!(widened.contains(&json!("payments-ca")), "{held}");
    assert_eq!(held["agent"]["risk_tier"], 3);
    let change = held["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(b.admin_get(&agent_url).await["risk_tier"], 3);
    decide(b, &ap.alice, &change, "approve").await.expect(200);
    decide(b, &ap.bob, &change, "approve").await.expect(200);
    assert_eq!(b.admin_get(&agent_url).await["risk_tier"], 2);

    // The provisioning records an auditor asks for.
    for a in [&id, &change] {
        assert_eq!(audited(b, "approval.requested", a).await.len(), 1);
        let want = if a == &id { 4 } else { 2 };
        assert_eq!(audited(b, "approval.decision", a).await.len(), want);
        assert_eq!(audited(b, "approval.approved", a).await.len(), 1);
    }
}

#[tokio::test]
async fn policy_can_auto_approve_and_tier_three_must_confirm_in_keygate() {
    const AUTO: &str = r#"
@id("auto-approve-short-any-approver")
permit (principal, action == Keygate::Action::"auto_approve", resource == Keygate::Scope::"any-approver")
when { context.ttl <= 60 };
"#;
    let w = world_with(
        "[approvals]\nconfirm_in_api_tiers = [2]\n",
        &[("auto.cedar", AUTO)],
    )
    .await;
    let (b, ap) = (&w.b, &w.ap);
    let (agent, s) = b.agent_with_task("appr", "platform").await;

    // Short enough: policy approves without a human, and says which policy.
    let cred = b
        .post(
            "/v1/credentials",
            Some(&s.token),
            &json!({ "scope": "any-approver", "ttl": 60, "justification": "quick check" }),
        )
        .await
        .expect(201);
    assert!(cred["lease_id"].is_string());
    let auto = b.audit("action=approval.auto_approved").await;
    assert_eq!(auto.len(), 1);
    assert_eq!(auto[0]["agent"], agent.id.as_str());
    assert_eq!(
        auto[0]["policy_ids"],
        json!(["auto-approve-short-any-approver"])
    );

    // Longer: a human decides, and for this tier not by a Slack click.
    let id = ask(b, &s.token, "any-approver").await;
    let posted = eventually("the Slack request message", || async {
        w.slack
            .calls("/api/chat.postMessage")
            .into_iter()
            .find(|c| c.body.to_string().contains(&id))
    })
    .await;
    let text = posted.body.to_string();
    assert!(
        text.contains("Review in Keygate") && !text.contains("keygate_approve"),
        "{text}"
    );
    // The button opens the console's page of this approval.
    assert!(text.contains(&format!("/ui/approvals/{id}")), "{text}");
    let click = click_body("UALICE", "keygate_approve", &id, &w.slack.response_url(3));
    let v = post_click(b, &click, Some(SIGNING_SECRET), unix_now())
        .await
        .expect(200);
    assert_eq!(v["ok"], false);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("must be decided in Keygate"),
        "{v}"
    );
    let v = decide(b, &ap.alice, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved");
}

/// Asked again while it waits, a request is the same approval even when what
/// would be granted shrank: with no TTL asked, the task's time left, one
/// second less a second later. Another TTL asked is another request.
#[tokio::test]
async fn asking_again_a_second_later_is_the_same_approval() {
    let w = world("").await;
    let b = &w.b;
    let (agent, _) = b.agent_with_task("again", "platform").await;
    let s = b.token_ttl(&agent, Some(300)).await;
    let ask = |body: Value| {
        let token = s.token.clone();
        async move {
            b.post("/v1/credentials", Some(&token), &body)
                .await
                .expect(202)["approval_id"]
                .clone()
        }
    };
    let body = json!({ "scope": "any-approver", "justification": "invoice" });
    let first = ask(body.clone()).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(ask(body).await, first);
    let other = json!({ "scope": "any-approver", "justification": "invoice", "ttl": 120 });
    assert_ne!(ask(other).await, first);
}
