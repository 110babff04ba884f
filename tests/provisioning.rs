//! The two-person rule on agent identities, through the real server, tried
//! as one admin acting alone would: a `pending` agent becomes `active` only by
//! a granted provisioning approval (suspend then resume returns it to
//! `pending`), an approval granted after the agent left `pending` revives
//! nothing, and a change to what proves an agent's identity or who answers
//! for it waits for approval like a widening does — whatever the hour.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker};
use serde_json::{Value, json};

const PROVISIONING: &str = "[provisioning]\nrequire_approval = true\napprovals = 1\n";

async fn start(policies: Vec<(String, String)>) -> TestBroker {
    let mut setup = Setup::permissive();
    setup.policies.extend(policies);
    setup.extra_config = PROVISIONING.into();
    TestBroker::start_with(setup).await
}

async fn decide(b: &TestBroker, id: &str, decision: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": decision, "reason": "checked" }),
    )
    .await
}

async fn admin(b: &TestBroker, agent: &str, verb: &str) -> common::Resp {
    b.admin_post(
        &format!("/v1/agents/{agent}/{verb}"),
        &json!({ "reason": "one admin alone" }),
    )
    .await
}

async fn patch(b: &TestBroker, agent: &str, body: Value) -> common::Resp {
    b.call(
        reqwest::Method::PATCH,
        &format!("/v1/agents/{agent}"),
        Some(&b.ops.admin),
        Some(&body),
    )
    .await
}

/// Registers `agent` (held); returns its provisioning approval id.
async fn register_pending(b: &TestBroker, agent: &TestAgent) -> String {
    register_in(b, agent, "platform").await
}

async fn register_in(b: &TestBroker, agent: &TestAgent, team: &str) -> String {
    let held = b
        .admin_post("/v1/agents", &agent.spec(team))
        .await
        .expect(202);
    assert_eq!(held["agent"]["status"], "pending", "{held}");
    held["approval"]["id"].as_str().unwrap().to_owned()
}

async fn status(b: &TestBroker, agent: &str) -> Value {
    b.admin_get(&format!("/v1/agents/{agent}")).await["status"].clone()
}

async fn approval(b: &TestBroker, id: &str) -> Value {
    b.admin_get(&format!("/v1/approvals/{id}")).await
}

/// Open provisioning approvals of `agent`.
async fn open_approvals(b: &TestBroker, agent: &str) -> Vec<Value> {
    b.admin_get(&format!(
        "/v1/approvals?state=pending&kind=provisioning&agent={agent}"
    ))
    .await
    .as_array()
    .cloned()
    .unwrap_or_default()
}

#[tokio::test]
async fn suspend_then_resume_returns_a_pending_agent_to_pending() {
    let b = start(Vec::new()).await;
    let agent = TestAgent::new("pend", "ES256");
    let first = register_pending(&b, &agent).await;

    admin(&b, &agent.id, "suspend").await.expect(200);
    assert_eq!(status(&b, &agent.id).await, "suspended");
    // Leaving `pending` cancels the approval it waited for.
    assert_eq!(approval(&b, &first).await["state"], "cancelled");

    let resumed = admin(&b, &agent.id, "resume").await.expect(200);
    assert_eq!(resumed["status"], "pending", "{resumed}");
    let r = b.token_with_assertion(&agent.id, &agent.assertion()).await;
    assert_eq!(r.status, 401, "a pending agent opens no task: {}", r.text);

    // The cancelled approval can no longer activate it; a fresh one can.
    let r = decide(&b, &first, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    let open = open_approvals(&b, &agent.id).await;
    assert_eq!(open.len(), 1, "resume opens a new provisioning approval");
    let second = open[0]["id"].as_str().unwrap();
    assert_ne!(second, first);
    decide(&b, second, "approve").await.expect(200);
    assert_eq!(status(&b, &agent.id).await, "active");
    b.token(&agent).await;

    // An agent suspended while active resumes to active.
    admin(&b, &agent.id, "suspend").await.expect(200);
    assert_eq!(
        admin(&b, &agent.id, "resume").await.expect(200)["status"],
        "active"
    );
    let resumed = b
        .audit(&format!("agent={}&action=agent.resumed", agent.id))
        .await;
    assert_eq!(resumed.len(), 2, "{resumed:?}");
}

#[tokio::test]
async fn an_approval_granted_after_the_agent_left_pending_revives_nothing() {
    let b = start(Vec::new()).await;
    // Decommissioned while pending.
    let gone = TestAgent::new("gone", "ES256");
    let id = register_pending(&b, &gone).await;
    admin(&b, &gone.id, "decommission").await.expect(200);
    let r = decide(&b, &id, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(status(&b, &gone.id).await, "decommissioned");
    let r = b.token_with_assertion(&gone.id, &gone.assertion()).await;
    assert_eq!(r.status, 401, "{}", r.text);

    // Suspended while pending: still suspended after the old approval.
    let held = TestAgent::new("held", "ES256");
    let id = register_pending(&b, &held).await;
    admin(&b, &held.id, "suspend").await.expect(200);
    assert_eq!(decide(&b, &id, "approve").await.status, 409);
    assert_eq!(status(&b, &held.id).await, "suspended");
    let cancelled = b
        .audit(&format!("agent={}&action=approval.cancelled", held.id))
        .await;
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");

    // Suspended while pending by a kill switch on its team: the same.
    let swept = TestAgent::new("swept", "ES256");
    let id = register_in(&b, &swept, "red").await;
    let r = b
        .post(
            "/v1/revocations",
            Some(&b.ops.secops),
            &json!({ "team": "red", "suspend": true, "reason": "team compromised" }),
        )
        .await
        .expect(200);
    assert_eq!(r["agents_suspended"], 1, "{r}");
    assert_eq!(status(&b, &swept.id).await, "suspended");
    assert_eq!(approval(&b, &id).await["state"], "cancelled");
    assert_eq!(decide(&b, &id, "approve").await.status, 409);
    assert_eq!(status(&b, &swept.id).await, "suspended");

    // A denied registration decommissions the agent.
    let denied = TestAgent::new("deny", "ES256");
    let id = register_pending(&b, &denied).await;
    decide(&b, &id, "deny").await.expect(200);
    assert_eq!(status(&b, &denied.id).await, "decommissioned");
}

#[tokio::test]
async fn changes_to_identity_or_accountability_wait_for_approval() {
    let b = start(Vec::new()).await;
    let agent = TestAgent::new("ident", "ES256");
    let id = register_pending(&b, &agent).await;
    decide(&b, &id, "approve").await.expect(200);
    b.token(&agent).await;

    // An attacker's key, a new sponsor, a lower tier, delegation rights, a
    // new team, asserting users: each is held, and nothing changes yet.
    let attacker = TestAgent::new("ident", "ES256");
    let changes = [
        json!({ "jwks": { "keys": [attacker.jwk] } }),
        json!({ "sponsor": "mallory@keygate.test" }),
        json!({ "risk_tier": 1 }),
        json!({ "delegation": { "max_depth": 1, "targets": ["someone-else"] } }),
        json!({ "team": "finance" }),
        json!({ "may_assert_users": true }),
    ];
    let before = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    let mut held = Vec::new();
    for change in changes {
        let r = patch(&b, &agent.id, change.clone()).await;
        let body = r.expect(202);
        assert_eq!(body["approval"]["kind"], "provisioning", "{change}: {body}");
        held.push(body["approval"]["id"].as_str().unwrap().to_owned());
    }
    let now = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    for field in [
        "jwks",
        "sponsor",
        "risk_tier",
        "delegation",
        "team",
        "may_assert_users",
    ] {
        assert_eq!(
            now[field], before[field],
            "{field} changed without approval"
        );
    }
    // The attacker's key opens nothing while the change waits.
    let mut forged = attacker.clone();
    forged.id = agent.id.clone();
    let r = b.token_with_assertion(&agent.id, &forged.assertion()).await;
    assert_eq!(r.status, 401, "{}", r.text);

    // Approved, the key change applies.
    decide(&b, &held[0], "approve").await.expect(200);
    b.token(&forged).await;

    // What neither proves identity nor widens applies at once.
    let r = patch(&b, &agent.id, json!({ "purpose": "reconcile invoices" })).await;
    assert_eq!(r.expect(200)["purpose"], "reconcile invoices");
}

#[tokio::test]
async fn widening_is_found_whatever_the_hour_it_is_asked_at() {
    // A permit that opens a scope only on a day that is not today (UTC), at
    // one hour: a widening now, not only on that day at that hour.
    let tomorrow = (time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .weekday()
        .to_string()
        .to_lowercase();
    let night = format!(
        r#"
@id("night-shift-jwt")
permit (principal, action == Keygate::Action::"request_credential", resource == Keygate::Scope::"jwt-svid")
when {{ principal.purpose == "night shift" && context.weekday == "{tomorrow}" && context.hour_utc == 3 }};
"#
    );
    let b = TestBroker::start_with(Setup {
        policies: vec![("night.cedar".into(), night)],
        extra_config: PROVISIONING.into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("night", "ES256");
    let id = register_in(&b, &agent, "night").await;
    decide(&b, &id, "approve").await.expect(200);

    let r = patch(&b, &agent.id, json!({ "purpose": "night shift" })).await;
    let body = r.expect(202);
    assert_eq!(body["widened_scopes"], json!(["jwt-svid"]), "{body}");
    assert_eq!(
        b.admin_get(&format!("/v1/agents/{}", agent.id)).await["purpose"],
        "integration test agent"
    );
}

/// A held change is judged again on the agent as it is when granted: two
/// changes, each harmless alone (a held sponsor change that also sets a
/// purpose, then an environment applied at once), would together reach a
/// scope no approver was shown; and a change asked of a `pending` agent
/// does not apply to the active agent it became.
#[tokio::test]
async fn a_held_change_is_judged_again_on_the_agent_as_it_is_when_granted() {
    let payroll = r#"
@id("payroll-prod-jwt")
permit (principal, action == Keygate::Action::"request_credential", resource == Keygate::Scope::"jwt-svid")
when { principal.purpose == "payroll" && principal.environment == "prod" };
"#;
    let b = TestBroker::start_with(Setup {
        policies: vec![("payroll.cedar".into(), payroll.into())],
        extra_config: PROVISIONING.into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("combo", "ES256");
    let id = register_in(&b, &agent, "combo").await;
    // Asked while the agent is pending, granted once it is active: refused.
    let early = patch(&b, &agent.id, json!({ "sponsor": "early@keygate.test" }))
        .await
        .expect(202)["approval"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    decide(&b, &id, "approve").await.expect(200);
    assert_eq!(approval(&b, &early).await["state"], "cancelled");
    let r = decide(&b, &early, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);

    let held = patch(
        &b,
        &agent.id,
        json!({ "purpose": "payroll", "sponsor": "carol@keygate.test" }),
    )
    .await
    .expect(202);
    assert_eq!(
        held["approval"]["request"]["widened_scopes"],
        json!([]),
        "{held}"
    );
    let held = held["approval"]["id"].as_str().unwrap().to_owned();
    let r = patch(&b, &agent.id, json!({ "environment": "prod" })).await;
    assert_eq!(r.expect(200)["environment"], "prod");
    let r = decide(&b, &held, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(
        r.text.contains("jwt-svid") && r.text.contains("ask again"),
        "{}",
        r.text
    );
    let now = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert_eq!(
        (now["purpose"].as_str(), now["sponsor"].as_str()),
        (Some("integration test agent"), Some("owner@keygate.test")),
        "{now}"
    );
    assert_eq!(approval(&b, &held).await["state"], "pending");

    // The sponsor a held change names departs before it is granted.
    let other = TestAgent::new("combo-dave", "ES256");
    let mut spec = other.spec("combo");
    spec["sponsor"] = json!("dave@keygate.test");
    b.admin_post("/v1/agents", &spec).await.expect(202);
    let named = patch(&b, &agent.id, json!({ "sponsor": "dave@keygate.test" }))
        .await
        .expect(202)["approval"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.admin_post(
        "/v1/people/dave@keygate.test/depart",
        &json!({ "reason": "left" }),
    )
    .await
    .expect(200);
    let r = decide(&b, &named, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.text.contains("left on"), "{}", r.text);
    let now = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert_eq!(now["sponsor"], "owner@keygate.test", "{now}");
}

/// A denied registration cancels the agent's other changes waiting for
/// approval, as any decommission does.
#[tokio::test]
async fn a_denied_registration_cancels_the_agents_other_held_changes() {
    let b = start(Vec::new()).await;
    let agent = TestAgent::new("denied-too", "ES256");
    let id = register_pending(&b, &agent).await;
    let other = TestAgent::new("denied-too", "ES256");
    patch(&b, &agent.id, json!({ "jwks": { "keys": [other.jwk] } }))
        .await
        .expect(202);
    assert_eq!(open_approvals(&b, &agent.id).await.len(), 2);
    decide(&b, &id, "deny").await.expect(200);
    assert_eq!(status(&b, &agent.id).await, "decommissioned");
    assert_eq!(open_approvals(&b, &agent.id).await, Vec::<Value>::new());
}

/// Lifting an exclusion gives the agent its scope back: a widening, held
/// for approval like any other, and lifted only once it is granted.
#[tokio::test]
async fn lifting_an_exclusion_waits_for_approval() {
    let b = TestBroker::start_with(Setup {
        extra_config: PROVISIONING.into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("included", "ES256");
    let id = register_in(&b, &agent, "platform").await;
    decide(&b, &id, "approve").await.expect(200);
    let path = format!("/v1/agents/{}/exclusions", agent.id);
    b.admin_post(
        &path,
        &json!({ "scope": "x509-svid", "reason": "not needed" }),
    )
    .await
    .expect(200);
    let (lift, body) = (
        format!("{path}/x509-svid"),
        json!({ "reason": "needed again" }),
    );
    let include = || {
        b.call(
            reqwest::Method::DELETE,
            &lift,
            Some(&b.ops.admin),
            Some(&body),
        )
    };
    let held = include().await.expect(202);
    let approval = held["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(held["widened_scopes"], json!(["x509-svid"]), "{held}");
    // Asked again: the same approval; meanwhile the scope stays excluded.
    assert_eq!(
        include().await.expect(202)["approval"]["id"],
        approval.as_str()
    );
    let s = b.token(&agent).await;
    let r = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(r.status, 403, "{}", r.text);

    decide(&b, &approval, "approve").await.expect(200);
    b.x509(&s.token, Some(60)).await;
    let ev = b.audit("action=agent.scope_included").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["details"]["approval"], approval.as_str(), "{ev:?}");
}

/// A held lift of an exclusion is granted only on the agent as it was when
/// asked: suspended meanwhile, the grant is refused (409) and the scope
/// stays excluded, until the agent is active again; a decommissioned
/// agent's exclusions are its record, never lifted.
#[tokio::test]
async fn a_held_lift_of_an_exclusion_applies_only_to_the_agent_as_asked() {
    let b = TestBroker::start_with(Setup {
        extra_config: PROVISIONING.into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("liftsusp", "ES256");
    let id = register_in(&b, &agent, "platform").await;
    decide(&b, &id, "approve").await.expect(200);
    let path = format!("/v1/agents/{}/exclusions", agent.id);
    let (exclusion, lifted) = (
        json!({ "scope": "x509-svid", "reason": "not needed" }),
        json!({ "reason": "needed again" }),
    );
    let lift_path = format!("{path}/x509-svid");
    let exclude = || b.admin_post(&path, &exclusion);
    exclude().await.expect(200);
    let lift = || {
        b.call(
            reqwest::Method::DELETE,
            &lift_path,
            Some(&b.ops.admin),
            Some(&lifted),
        )
    };
    let held = lift().await.expect(202);
    let approval_id = held["approval"]["id"].as_str().unwrap().to_owned();

    admin(&b, &agent.id, "suspend").await.expect(200);
    let r = decide(&b, &approval_id, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.text.contains("suspended now, not active"), "{}", r.text);
    assert_eq!(approval(&b, &approval_id).await["state"], "pending");
    assert!(b.audit("action=agent.scope_included").await.is_empty());

    // Active again, as asked: the grant applies.
    admin(&b, &agent.id, "resume").await.expect(200);
    decide(&b, &approval_id, "approve").await.expect(200);
    assert_eq!(b.audit("action=agent.scope_included").await.len(), 1);

    exclude().await.expect(200);
    admin(&b, &agent.id, "decommission").await.expect(200);
    let r = lift().await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.text.contains("decommissioned"), "{}", r.text);
}

/// The same held change asked again while it waits (an `apply` run twice,
/// a retried PATCH) is the same approval, not a second one an approver
/// could grant after another denied the first; a different change, or the
/// same one asked after the first was decided, is a request of its own.
#[tokio::test]
async fn a_held_change_asked_again_is_the_same_approval() {
    let b = start(Vec::new()).await;
    let agent = TestAgent::new("again", "ES256");
    let id = register_pending(&b, &agent).await;
    decide(&b, &id, "approve").await.expect(200);
    let tier = json!({ "risk_tier": 1 });
    let first = patch(&b, &agent.id, tier.clone()).await.expect(202);
    let first = first["approval"]["id"].as_str().unwrap().to_owned();
    let again = patch(&b, &agent.id, tier.clone()).await.expect(202);
    assert_eq!(again["approval"]["id"], first.as_str(), "{again}");
    assert_eq!(open_approvals(&b, &agent.id).await.len(), 1);

    let other = patch(&b, &agent.id, json!({ "may_assert_users": true }))
        .await
        .expect(202);
    assert_ne!(other["approval"]["id"], first.as_str(), "{other}");
    assert_eq!(open_approvals(&b, &agent.id).await.len(), 2);

    decide(&b, &first, "deny").await.expect(200);
    let after = patch(&b, &agent.id, tier).await.expect(202);
    assert_ne!(after["approval"]["id"], first.as_str(), "{after}");
}

/// A lift of an exclusion waiting for approval does not undo a decision
/// to exclude the scope made after it was asked (a review's narrowing, an
/// admin's): that decision cancels it.
#[tokio::test]
async fn excluding_again_cancels_a_waiting_lift() {
    let b = TestBroker::start_with(Setup {
        extra_config: PROVISIONING.into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("relift", "ES256");
    let id = register_in(&b, &agent, "platform").await;
    decide(&b, &id, "approve").await.expect(200);
    let path = format!("/v1/agents/{}/exclusions", agent.id);
    let exclusion = json!({ "scope": "x509-svid", "reason": "not needed" });
    b.admin_post(&path, &exclusion).await.expect(200);
    let lift = b
        .call(
            reqwest::Method::DELETE,
            &format!("{path}/x509-svid"),
            Some(&b.ops.admin),
            Some(&json!({ "reason": "needed again" })),
        )
        .await
        .expect(202);
    let lift = lift["approval"]["id"].as_str().unwrap().to_owned();

    b.admin_post(
        &path,
        &json!({ "scope": "x509-svid", "reason": "review: still not needed" }),
    )
    .await
    .expect(200);
    let a = approval(&b, &lift).await;
    assert_eq!(a["state"], "cancelled", "{a}");
    let r = decide(&b, &lift, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    let s = b.token(&agent).await;
    let r = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(r.status, 403, "the scope stays excluded: {}", r.text);
}
