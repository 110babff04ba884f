//! Separation of duties beyond the approval's own record: a sponsor named
//! after the request was made answers for the agent too, a request asked
//! in a delegated task is every delegator's, so the highest risk tier on
//! the chain sets the quorum and no delegator's sponsor approves it alone,
//! a risk tier raised while it waits (the agent's or a delegator's) raises
//! its quorum, and an approval counts only while whoever gave it still may
//! decide.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::approvals::{SIGNING_SECRET, ask, decide, world, world_with};
use crate::common::slack::{click_body, post_click};
use crate::common::{TestAgent, TestBroker, unix_now};
use serde_json::json;

/// Lets tier-3 agents reach the CA's scopes too (the world's own permit
/// stops at tier 2).
const PERMIT_TIER_3: &str = r#"
@id("test-permit-tier-3-ca")
permit (principal, action == Keygate::Action::"request_credential", resource)
when { resource.provider == "ca" && principal.risk_tier == 3 };
"#;

/// `orchestrator` (tier `tier`, sponsored by `owner@keygate.test`, the
/// operator `owner`) delegates `any-approver` to a tier-1 sub-agent with a
/// sponsor of its own; the sub-agent's child-task token and the
/// orchestrator's id.
async fn delegated(b: &TestBroker, prefix: &str, tier: u8) -> (String, String) {
    let sub = TestAgent::new(&format!("{prefix}-sub"), "ES256");
    let mut spec = sub.spec("platform");
    spec["risk_tier"] = json!(1);
    spec["sponsor"] = json!("sub-owner@keygate.test");
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let orch = TestAgent::new(&format!("{prefix}-orch"), "ES256");
    let mut spec = orch.spec("platform");
    spec["risk_tier"] = json!(tier);
    spec["delegation"] = json!({ "max_depth": 1, "targets": [sub.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let parent = b.token(&orch).await;
    let r = b
        .exchange(&parent.token, &sub, Some("any-approver"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    (
        r.json()["access_token"].as_str().unwrap().to_owned(),
        orch.id,
    )
}

/// `operator` may not approve `id` alone: separation of duties.
async fn refused_alone(b: &TestBroker, operator: &str, id: &str) {
    let r = decide(b, operator, id, "approve").await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("separation of duties"), "{}", r.text);
}

#[tokio::test]
async fn a_delegated_request_is_approved_as_its_highest_delegator_would_be() {
    let w = world_with("", &[("tier3.cedar", PERMIT_TIER_3)]).await;
    let (b, ap) = (&w.b, &w.ap);

    // A tier-1 sub-agent asking for a tier-3 orchestrator: tier 3's quorum.
    let (token, _) = delegated(b, "t3", 3).await;
    let id = ask(b, &token, "any-approver").await;
    let a = b.admin_get(&format!("/v1/approvals/{id}")).await;
    assert_eq!(a["required"], 2, "{a}");

    // The orchestrator's sponsor may not be the only approver.
    let (token, _) = delegated(b, "t1", 1).await;
    let id = ask(b, &token, "any-approver").await;
    refused_alone(b, &ap.owner, &id).await;
    let v = decide(b, &ap.carol, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");
}

/// A sponsor named after the request was made answers for the agent just
/// the same: they may not be the only approver either.
#[tokio::test]
async fn a_sponsor_named_meanwhile_cannot_approve_alone() {
    let w = world("").await;
    let (b, ap) = (&w.b, &w.ap);
    let (agent, s) = b.agent_with_task("resp", "platform").await;
    let id = ask(b, &s.token, "any-approver").await;
    let r = b
        .patch_agent(&agent.id, &json!({ "sponsor": "carol" }))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    refused_alone(b, &ap.carol, &id).await;
    let v = decide(b, &ap.alice, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");
}

/// Approval `id` asks one approver, decidable in Slack; `raised` is raised
/// to tier 3 (the agent itself or a delegator): a Slack click is refused,
/// one approval leaves it pending (`what` if not), and two grant it.
async fn raised_to_tier_3(w: &crate::approvals::World, id: &str, raised: &str, what: &str) {
    let (b, ap) = (&w.b, &w.ap);
    let a = b.admin_get(&format!("/v1/approvals/{id}")).await;
    assert_eq!(
        (&a["required"], &a["confirm_in_api"]),
        (&json!(1), &json!(false)),
        "{a}"
    );
    b.patch_agent(raised, &json!({ "risk_tier": 3 }))
        .await
        .expect(200);
    let click = click_body("UALICE", "keygate_approve", id, &w.slack.response_url(3));
    let v = post_click(b, &click, Some(SIGNING_SECRET), unix_now())
        .await
        .expect(200);
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("must be decided in Keygate")),
        "{v}"
    );
    let v = decide(b, &ap.alice, id, "approve").await.expect(200);
    assert_eq!(v["state"], "pending", "{what}: {v}");
    assert_eq!(
        (&v["required"], &v["confirm_in_api"]),
        (&json!(2), &json!(true)),
        "{v}"
    );
    let v = decide(b, &ap.bob, id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");
}

/// An approval counts towards the quorum only while whoever gave it still
/// may decide: one given by an approver who departed since does not.
#[tokio::test]
async fn a_departed_approvers_earlier_approval_no_longer_counts() {
    let w = world("").await;
    let (b, ap) = (&w.b, &w.ap);
    let (_, s) = b.agent_with_task("quorum", "platform").await;
    // Bob sponsors another agent: the people API knows him by that.
    let other = TestAgent::new("quorum-bobs", "ES256");
    let mut spec = other.spec("platform");
    spec["sponsor"] = json!("bob@keygate.test");
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let id = ask(b, &s.token, "two-approvers").await;
    decide(b, &ap.bob, &id, "approve").await.expect(200);
    b.admin_post(
        "/v1/people/bob@keygate.test/depart",
        &json!({ "reason": "left" }),
    )
    .await
    .expect(200);
    let v = decide(b, &ap.alice, &id, "approve").await.expect(200);
    assert_eq!(
        v["state"], "pending",
        "a departed approver made up the quorum: {v}"
    );
    let v = decide(b, &ap.carol, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");
}

/// Raised to tier 3 while its request waits, the agent's request needs
/// tier 3's quorum (2) and must be decided in Keygate if tier 3 must.
#[tokio::test]
async fn a_risk_tier_raised_while_a_request_waits_raises_its_bar() {
    let w = world("[approvals]\nconfirm_in_api_tiers = [3]\n").await;
    let b = &w.b;
    let (agent, s) = b.agent_with_task("raised", "platform").await;
    let id = ask(b, &s.token, "any-approver").await;
    raised_to_tier_3(&w, &id, &agent.id, "one approval granted a tier-3 request").await;
}

/// The chain as it is at the decision: a delegator raised to tier 3 while
/// its sub-agent's request waits raises the request's quorum and sends it
/// to Keygate, as a tier raised on the agent itself does.
#[tokio::test]
async fn a_delegators_tier_raised_while_a_request_waits_raises_its_bar() {
    let w = world_with(
        "[approvals]\nconfirm_in_api_tiers = [3]\n",
        &[("tier3.cedar", PERMIT_TIER_3)],
    )
    .await;
    let b = &w.b;
    let (token, orch) = delegated(b, "draised", 1).await;
    let id = ask(b, &token, "any-approver").await;
    raised_to_tier_3(
        &w,
        &id,
        &orch,
        "one approval granted a request a tier-3 delegator answers for",
    )
    .await;
}

/// A delegator's sponsor named after its sub-agent's request was made may
/// not approve that request alone either.
#[tokio::test]
async fn a_delegators_sponsor_named_meanwhile_cannot_approve_alone() {
    let w = world("").await;
    let (b, ap) = (&w.b, &w.ap);
    let (token, orch) = delegated(b, "dsponsor", 1).await;
    let id = ask(b, &token, "any-approver").await;
    b.patch_agent(&orch, &json!({ "sponsor": "carol" }))
        .await
        .expect(200);
    refused_alone(b, &ap.carol, &id).await;
    let v = decide(b, &ap.alice, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");
}

/// A held policy set answers for every agent it widens: the sponsor of any
/// of them (not only the one its approval hangs on) may not approve it
/// alone; nor may the sponsor a held change would name approve that.
#[tokio::test]
async fn no_sponsor_of_an_agent_a_change_is_for_approves_it_alone() {
    let w = world("[provisioning]\nrequire_approval = true\napprovals = 1\n").await;
    let (b, ap) = (&w.b, &w.ap);
    let first = TestAgent::new("rx-a", "ES256");
    for (agent, sponsor) in [
        (first.clone(), "owner@keygate.test"),
        (TestAgent::new("rx-b", "ES256"), "carol"),
    ] {
        let mut spec = agent.spec("research");
        spec["risk_tier"] = json!(3);
        spec["sponsor"] = json!(sponsor);
        let held = b.admin_post("/v1/agents", &spec).await.expect(202);
        let id = held["approval"]["id"].as_str().unwrap();
        decide(b, &ap.alice, id, "approve").await.expect(200);
    }
    std::fs::write(b.dir.join("policies/tier3.cedar"), PERMIT_TIER_3).unwrap();
    let r = b.admin_post("/v1/policy/reload", &json!({})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let held = r.json()["held"].clone();
    assert!(
        held["agent_id"].as_str().unwrap().starts_with("rx-a"),
        "{held}"
    );
    let id = held["id"].as_str().unwrap();
    refused_alone(b, &ap.carol, id).await;
    let v = decide(b, &ap.alice, id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");

    let held = b
        .patch_agent(&first.id, &json!({ "sponsor": "bob" }))
        .await
        .expect(202);
    let id = held["approval"]["id"].as_str().unwrap();
    refused_alone(b, &ap.bob, id).await;
    decide(b, &ap.alice, id, "approve").await.expect(200);
}
