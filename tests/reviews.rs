//! Access review campaigns through the real server: attest, narrow,
//! retire, two reviewers for tier 3, escalation, racing reviewers. Time
//! passes by moving dates back in the store, never by sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::governance::{
    DAY, SPONSOR, campaign_due, compliance, exec, issue, item_of, start, sweep,
};
use common::{TestAgent, TestBroker};
use serde_json::{Value, json};

pub(super) async fn decide(b: &TestBroker, token: &str, item: &str, body: Value) -> common::Resp {
    b.post(
        &format!("/v1/reviews/items/{item}/decision"),
        Some(token),
        &body,
    )
    .await
}

#[tokio::test]
async fn a_campaign_attests_narrows_and_retires_and_skips_agents_with_nothing_to_review() {
    let (b, people) = start("").await;
    let keep = TestAgent::new("rv-keep", "ES256");
    let narrow = TestAgent::new("rv-narrow", "ES256");
    let retire = TestAgent::new("rv-retire", "ES256");
    let empty = TestAgent::new("rv-empty", "ES256");
    for a in [&keep, &narrow, &retire, &empty] {
        b.register(a, "platform").await;
    }
    // `empty` may reach nothing once every scope is excluded: no reviewer
    // is asked about it.
    for scope in ["x509-svid", "jwt-svid", "payments-ca"] {
        b.admin_post(
            &format!("/v1/agents/{}/exclusions", empty.id),
            &json!({ "scope": scope, "reason": "not needed" }),
        )
        .await
        .expect(200);
    }
    let s = b.token(&narrow).await;
    let held = b.x509(&s.token, Some(600)).await;

    let started = b
        .admin_post(
            "/v1/reviews",
            &json!({ "name": "2026-Q4", "team": "platform" }),
        )
        .await
        .expect(201);
    let skipped: Vec<&str> = started["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, [empty.id.as_str()], "{started}");
    let it = item_of(&started, &narrow.id);
    assert_eq!(it["reviewer"], SPONSOR);
    assert_eq!(it["attestations"], 1);
    let snap_scopes: Vec<&str> = it["snapshot"]["permitted_scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap())
        .collect();
    assert!(snap_scopes.contains(&"x509-svid"), "{it}");
    let used = it["snapshot"]["permitted_scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == "x509-svid")
        .unwrap();
    assert_eq!(
        used["credentials"], 1,
        "per-scope use in the snapshot: {used}"
    );
    // The same name twice is a conflict, not a second campaign.
    let dup = b
        .admin_post("/v1/reviews", &json!({ "name": "2026-Q4" }))
        .await;
    assert_eq!(dup.status, 409, "{}", dup.text);

    // The sponsor attests her own tier-2 agent: that is enough.
    let keep_item = item_of(&started, &keep.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = decide(
        &b,
        &people.olga,
        &keep_item,
        json!({ "decision": "attest", "note": "still runs the nightly job" }),
    )
    .await
    .expect(200);
    assert_eq!(r["state"], "attested", "{r}");
    let a = b.admin_get(&format!("/v1/agents/{}", keep.id)).await;
    assert!(a["last_review_at"].is_string(), "{a}");
    // A decided item cannot be decided again.
    let again = decide(
        &b,
        &b.ops.admin,
        &keep_item,
        json!({ "decision": "retire" }),
    )
    .await;
    assert_eq!(again.status, 409, "{}", again.text);

    // Narrow: x509-svid is taken away; the held certificate's lease is
    // revoked and a new request is refused with the reason and the way back.
    let narrow_item = item_of(&started, &narrow.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad = decide(
        &b,
        &b.ops.admin,
        &narrow_item,
        json!({ "decision": "narrow", "scopes": ["no-such"] }),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert!(
        bad.text.contains("not among the scopes under review"),
        "{}",
        bad.text
    );
    let r = decide(
        &b,
        &b.ops.admin,
        &narrow_item,
        json!({ "decision": "narrow", "scopes": ["x509-svid"] }),
    )
    .await
    .expect(200);
    assert_eq!(r["state"], "narrowed", "{r}");
    let lease = held["lease_id"].as_str().unwrap();
    common::eventually("the narrowed scope's lease revoked", || async {
        (b.lease_state(lease).await == "revoked").then_some(())
    })
    .await;
    let refused = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert!(
        refused.text.contains("excluded from agent"),
        "{}",
        refused.text
    );
    assert!(
        refused.text.contains("keygate agents include"),
        "{}",
        refused.text
    );
    // Other scopes still work, and the compliance view no longer counts it.
    b.jwt_svid(&s.token, Some(60)).await;
    let c = compliance(&b, &narrow.id).await;
    assert!(c["excluded_scopes"]["x509-svid"].is_object(), "{c}");
    assert!(
        !c["permitted_scopes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["scope"] == "x509-svid"),
        "{c}"
    );
    // An admin lifts it: policy alone decides again.
    b.call(
        reqwest::Method::DELETE,
        &format!("/v1/agents/{}/exclusions/x509-svid", narrow.id),
        Some(&b.ops.admin),
        None,
    )
    .await
    .expect(200);
    b.x509(&s.token, Some(60)).await;

    // Retire: the agent is decommissioned and its sessions stop.
    let retire_item = item_of(&started, &retire.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rs = b.token(&retire).await;
    // Olga is the reviewer of every item here, but an auditor who is not
    // assigned may not decide: she may, as the assigned reviewer.
    let r = decide(
        &b,
        &people.olga,
        &retire_item,
        json!({ "decision": "retire", "note": "project ended" }),
    )
    .await
    .expect(200);
    assert_eq!(r["state"], "retired");
    let a = b.admin_get(&format!("/v1/agents/{}", retire.id)).await;
    assert_eq!(a["status"], "decommissioned", "{a}");
    let dead = b.credential(&rs.token, "jwt-svid", Some(60), None).await;
    assert_eq!(dead.status, 401, "{}", dead.text);

    // The campaign's counts, and the audit trail of each decision.
    let view = b
        .get("/v1/reviews/2026-Q4", Some(&b.ops.auditor))
        .await
        .expect(200);
    assert_eq!(
        (view["open"].as_u64(), view["decided"].as_u64()),
        (Some(0), Some(3)),
        "{view}"
    );
    for action in [
        "review.campaign_started",
        "review.attested",
        "review.narrowed",
        "review.retired",
        "agent.scope_excluded",
        "agent.scope_included",
    ] {
        assert!(
            !b.audit(&format!("action={action}")).await.is_empty(),
            "{action} audited"
        );
    }
}

/// A tier-3 agent registered, and a campaign started over it.
async fn tier_3_under_review(b: &TestBroker, prefix: &str) -> (TestAgent, Value) {
    let agent = TestAgent::new(prefix, "ES256");
    let mut spec = agent.spec("platform");
    spec["risk_tier"] = 3.into();
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": prefix, "due_days": 7 }))
        .await
        .expect(201);
    (agent, started)
}

#[tokio::test]
async fn a_tier_3_agent_needs_a_second_reviewer_who_is_not_the_sponsor() {
    let (b, people) = start("").await;
    let (agent, started) = tier_3_under_review(&b, "rv-tier3").await;
    let it = item_of(&started, &agent.id);
    assert_eq!(it["attestations"], 2, "{it}");
    let id = it["id"].as_str().unwrap().to_owned();

    // An operator who is neither the reviewer nor an admin/approver: refused.
    let auditor = decide(&b, &b.ops.auditor, &id, json!({ "decision": "attest" })).await;
    assert_eq!(auditor.status, 403, "{}", auditor.text);

    let first = decide(&b, &people.olga, &id, json!({ "decision": "attest" }))
        .await
        .expect(200);
    assert_eq!(
        first["state"], "open",
        "the sponsor alone is not enough: {first}"
    );
    let twice = decide(&b, &people.olga, &id, json!({ "decision": "attest" })).await;
    assert_eq!(twice.status, 409, "{}", twice.text);
    let a = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert!(a["last_review_at"].is_null(), "not reviewed yet: {a}");

    let done = decide(&b, &b.ops.approver, &id, json!({ "decision": "attest" }))
        .await
        .expect(200);
    assert_eq!(done["state"], "attested", "{done}");
    let by: Vec<&str> = done["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["olga", "test-approver"]);
    let ev = b.audit("action=review.attestation_recorded").await;
    assert!(
        ev[0]["reason"]
            .as_str()
            .unwrap()
            .contains("another reviewer"),
        "{ev:?}"
    );
}

/// A narrowing takes the scope away at once, but at tier 3 one reviewer's
/// narrowing is one decision of two: the agent counts as reviewed (and the
/// item closes, narrowed) only once a second reviewer attests.
#[tokio::test]
async fn a_tier_3_agent_narrowed_by_one_reviewer_still_needs_a_second() {
    let (b, people) = start("").await;
    let (agent, started) = tier_3_under_review(&b, "rv-t3-narrow").await;
    let id = item_of(&started, &agent.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = decide(
        &b,
        &people.olga,
        &id,
        json!({ "decision": "narrow", "scopes": ["x509-svid"] }),
    )
    .await
    .expect(200);
    assert_eq!(
        first["state"], "open",
        "the sponsor alone reviewed it: {first}"
    );
    let a = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert!(a["last_review_at"].is_null(), "not reviewed yet: {a}");
    assert!(a["excluded_scopes"]["x509-svid"].is_object(), "{a}");
    let again = decide(&b, &people.olga, &id, json!({ "decision": "attest" })).await;
    assert_eq!(again.status, 409, "{}", again.text);
    let done = decide(&b, &b.ops.approver, &id, json!({ "decision": "attest" }))
        .await
        .expect(200);
    assert_eq!(done["state"], "narrowed", "{done}");
    let a = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert!(!a["last_review_at"].is_null(), "{a}");
}

/// An agent raised to tier 3 after its campaign began needs the two
/// attestations too: the sponsor alone does not settle its item.
#[tokio::test]
async fn an_agent_raised_to_tier_3_during_a_campaign_needs_a_second_reviewer() {
    let (b, people) = start("").await;
    let agent = TestAgent::new("rv-raised", "ES256");
    b.register(&agent, "platform").await;
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": "raised", "due_days": 7 }))
        .await
        .expect(201);
    let it = item_of(&started, &agent.id);
    assert_eq!(it["attestations"], 1, "{it}");
    let id = it["id"].as_str().unwrap().to_owned();
    let r = b.patch_agent(&agent.id, &json!({ "risk_tier": 3 })).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let first = decide(&b, &people.olga, &id, json!({ "decision": "attest" }))
        .await
        .expect(200);
    assert_eq!(
        (first["state"].as_str(), first["attestations"].as_u64()),
        (Some("open"), Some(2)),
        "the sponsor alone is not enough at tier 3: {first}"
    );
    let a = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert!(a["last_review_at"].is_null(), "not reviewed yet: {a}");
    let done = decide(&b, &b.ops.approver, &id, json!({ "decision": "attest" }))
        .await
        .expect(200);
    assert_eq!(done["state"], "attested", "{done}");
}

#[tokio::test]
async fn an_overdue_review_escalates_to_the_team_lead_then_the_overdue_action() {
    let (b, _people) =
        start("[[lifecycle]]\nname = \"strict\"\noverdue_action = \"suspend\"\ngrace_days = 3\n")
            .await;
    let agent = TestAgent::new("rv-late", "ES256");
    b.register(&agent, "platform").await;
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": "late", "due_days": 7 }))
        .await
        .expect(201);
    let cid = started["campaign"]["id"].as_str().unwrap().to_owned();
    assert!(sweep(&b).await["escalated"] == 0);

    // Eight days on: due yesterday. Escalated once, to the lead.
    campaign_due(&b, &cid, 1).await;
    let r = sweep(&b).await;
    assert_eq!(r["escalated"], 1, "{r}");
    assert_eq!(sweep(&b).await["escalated"], 0, "escalated once");
    let ev = b.audit("action=review.escalated").await;
    assert_eq!(
        ev[0]["details"]["escalated_to"], "lead@keygate.test",
        "{ev:?}"
    );
    let c = compliance(&b, &agent.id).await;
    let overdue = issue(&c, "review_item_overdue").unwrap();
    assert_eq!(overdue["action"], "suspend", "{c}");
    assert_eq!(c["status"], "active");

    // Past the grace: suspended without an operator.
    campaign_due(&b, &cid, 4).await;
    sweep(&b).await;
    let a = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert_eq!(a["status"], "suspended", "{a}");
}

#[tokio::test]
async fn racing_reviewers_and_a_decommission_mid_review_leave_a_consistent_record() {
    let (b, people) = start("").await;
    let agent = TestAgent::new("rv-race", "ES256");
    let mut spec = agent.spec("platform");
    spec["risk_tier"] = 3.into();
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let gone = TestAgent::new("rv-gone", "ES256");
    b.register(&gone, "platform").await;
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": "race" }))
        .await
        .expect(201);
    let id = item_of(&started, &agent.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Two reviewers attest at once: never attested on one attestation, and
    // never the same reviewer twice.
    let body = json!({ "decision": "attest" });
    let (r1, r2) = tokio::join!(
        decide(&b, &b.ops.admin, &id, body.clone()),
        decide(&b, &people.root2, &id, body.clone()),
    );
    for r in [&r1, &r2] {
        assert!(r.status == 200 || r.status == 409, "{}", r.text);
    }
    let item = b
        .get(&format!("/v1/reviews/items/{id}"), Some(&b.ops.auditor))
        .await
        .expect(200);
    let n = item["decisions"].as_array().unwrap().len();
    match item["state"].as_str().unwrap() {
        "attested" => assert_eq!(n, 2, "{item}"),
        "open" => assert_eq!(n, 1, "{item}"),
        other => panic!("unexpected state {other}: {item}"),
    }

    // Decommissioned by an admin while its item is open: deciding is a
    // conflict, and the sweep cancels the item.
    let gid = item_of(&started, &gone.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.admin_post(&format!("/v1/agents/{}/decommission", gone.id), &json!({}))
        .await
        .expect(200);
    let late = decide(&b, &b.ops.admin, &gid, json!({ "decision": "attest" })).await;
    assert_eq!(late.status, 409, "{}", late.text);
    sweep(&b).await;
    let item = b
        .get(&format!("/v1/reviews/items/{gid}"), Some(&b.ops.auditor))
        .await
        .expect(200);
    assert_eq!(item["state"], "cancelled", "{item}");

    // Unknown items, bad bodies and bad names are clear errors.
    let r = decide(&b, &b.ops.admin, "ri_nope", json!({ "decision": "attest" })).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = decide(&b, &b.ops.admin, &id, json!({ "decision": "approve" })).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = b
        .admin_post("/v1/reviews", &json!({ "name": "../../etc" }))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

/// `review_every_days` schedules reviews: an agent whose review falls due
/// (from `remind_before_days` before) is put in an automatic campaign by
/// the sweep, once; a fresh agent is not; attesting ends it.
#[tokio::test]
async fn the_sweep_schedules_a_review_when_one_falls_due_once() {
    let (b, people) = start("").await;
    let due = TestAgent::new("rv-due", "ES256");
    b.register(&due, "platform").await;
    let fresh = TestAgent::new("rv-fresh", "ES256");
    b.register(&fresh, "platform").await;
    // Registered 80 days ago: due in ten days, inside the 14-day reminder.
    let then = (common::unix_now() - 80 * DAY).to_string();
    exec(
        &b,
        "UPDATE agents SET created_at = ? WHERE id = ?",
        &[&then, &due.id],
    )
    .await;

    let r = sweep(&b).await;
    let name = r["scheduled"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_owned();
    assert!(name.starts_with("auto-"), "{name}");
    let campaign = b.admin_get(&format!("/v1/reviews/{name}")).await;
    let items = campaign["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "only the due agent: {campaign}");
    assert_eq!(items[0]["agent_id"], due.id.as_str());
    assert_eq!(items[0]["reviewer"], SPONSOR);
    let started = b.audit("action=review.campaign_started").await;
    assert_eq!(started[0]["actor"], "system", "{started:?}");

    // Its item is open: the next sweep schedules nothing.
    assert!(sweep(&b).await.get("scheduled").is_none());
    // Attested, the review is no longer due.
    let item = items[0]["id"].as_str().unwrap();
    decide(&b, &people.olga, item, json!({ "decision": "attest" }))
        .await
        .expect(200);
    assert!(sweep(&b).await.get("scheduled").is_none());
}
