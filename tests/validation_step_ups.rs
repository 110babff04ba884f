//! Step-ups that reach beyond one request: a new delegation target steps
//! up the orchestrator and every task below it, and neither a suspension,
//! a resume nor the kill switch lifts a step-up or revives the approval it
//! waited on.

use serde_json::{Value, json};

use crate::common;
use crate::validation::{ask, client_from, detectors_of, incidents, open_task};
use common::{Setup, TestAgent, TestBroker};

/// A broker whose one detector, `name`, steps up on `signal` after
/// `warm_up` observations.
async fn stepping_up(name: &str, signal: &str, warm_up: u32) -> TestBroker {
    TestBroker::start_with(Setup {
        extra_config: format!(
            "[validation]\nwarm_up_observations = {warm_up}\n\n[[detectors]]\nname = \"{name}\"\nsignal = \"{signal}\"\nseverity = \"high\"\naction = \"step_up\"\n"
        ),
        ..Setup::permissive()
    })
    .await
}

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

/// A child task for `actor` under the session `parent`: its token.
async fn delegate(b: &TestBroker, parent: &str, actor: &TestAgent) -> String {
    let assertion = actor.assertion();
    let r = b
        .token_form(&[
            ("grant_type", EXCHANGE),
            ("subject_token", parent),
            ("subject_token_type", ACCESS),
            ("actor_token", assertion.as_str()),
            ("actor_token_type", JWT),
        ])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v: Value = serde_json::from_str(&r.text).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_new_delegation_target_steps_up_the_orchestrator_and_every_request_made_below_it() {
    let b = stepping_up("new-delegate", "new_delegation_target", 3).await;
    let (orch, first, second) = (
        TestAgent::new("orch", "ES256"),
        TestAgent::new("helper", "ES256"),
        TestAgent::new("stranger", "ES256"),
    );
    let mut spec = orch.spec("platform");
    spec["delegation"] = json!({ "max_depth": 2, "targets": [first.id, second.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    b.register(&first, "platform").await;
    b.register(&second, "platform").await;
    let http = reqwest::Client::new();
    let t = open_task(&b, &http, &orch).await;
    assert_eq!(ask(&b, &http, &t, "x509-svid").await, 201);
    // Its usual helper, learned during the warm-up, then again.
    let helper = delegate(&b, &t, &first).await;
    delegate(&b, &t, &first).await;
    assert_eq!(ask(&b, &http, &helper, "x509-svid").await, 201);
    assert!(incidents(&b, &orch).await.is_empty());
    // A target it never delegated to: the orchestrator is stepped up.
    let stranger = delegate(&b, &t, &second).await;
    let list = incidents(&b, &orch).await;
    assert_eq!(detectors_of(&list), ["new-delegate"], "{list:?}");
    assert_eq!(list[0]["evidence"]["target"], second.id.as_str());
    // Its own requests, and those of every task below it (opened before
    // or after), need a human; the sub-agents' own tasks do not.
    assert_eq!(ask(&b, &http, &t, "x509-svid").await, 202);
    assert_eq!(ask(&b, &http, &helper, "x509-svid").await, 202);
    assert_eq!(ask(&b, &http, &stranger, "x509-svid").await, 202);
    let own = open_task(&b, &http, &second).await;
    assert_eq!(ask(&b, &http, &own, "x509-svid").await, 201);
}

/// A broker that steps up on a new delegation target (every scope) and on
/// a new network (`network_line`: every scope, or a `step_up_scopes` line).
async fn stepping_up_on_both(network_line: &str) -> TestBroker {
    TestBroker::start_with(Setup {
        extra_config: format!(
            "[validation]\nwarm_up_observations = 3\n\n\
            [[detectors]]\nname = \"new-delegate\"\nsignal = \"new_delegation_target\"\nseverity = \"high\"\naction = \"step_up\"\n\n\
            [[detectors]]\nname = \"new-network\"\nsignal = \"new_source_network\"\nseverity = \"medium\"\naction = \"step_up\"\n{network_line}"
        ),
        ..Setup::permissive()
    })
    .await
}

/// An orchestrator `name` that may delegate to `<name>-helper` and
/// `<name>-stranger` (all of `platform`), its task from the default
/// client, and one credential in it: the three agents, the client, the
/// task.
async fn orchestrator_of_two(
    b: &TestBroker,
    name: &str,
) -> (TestAgent, TestAgent, TestAgent, reqwest::Client, String) {
    let (orch, first, second) = (
        TestAgent::new(name, "ES256"),
        TestAgent::new(&format!("{name}-helper"), "ES256"),
        TestAgent::new(&format!("{name}-stranger"), "ES256"),
    );
    let mut spec = orch.spec("platform");
    spec["delegation"] = json!({ "max_depth": 1, "targets": [first.id, second.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    b.register(&first, "platform").await;
    b.register(&second, "platform").await;
    let http = reqwest::Client::new();
    let t = open_task(b, &http, &orch).await;
    assert_eq!(ask(b, &http, &t, "x509-svid").await, 201);
    (orch, first, second, http, t)
}

/// An orchestrator stepped up twice: every scope (a new delegation target),
/// then sensitive scopes only (a new network). The broker, a client, the
/// orchestrator's task and its two incidents (the every-scope one first).
async fn stepped_up_twice() -> (TestBroker, TestAgent, reqwest::Client, String, [String; 2]) {
    let b = stepping_up_on_both("step_up_scopes = \"sensitive\"\n").await;
    let (orch, first, second, http, t) = orchestrator_of_two(&b, "strict").await;
    delegate(&b, &t, &first).await;
    delegate(&b, &t, &first).await;
    // Every scope stepped up.
    delegate(&b, &t, &second).await;
    assert_eq!(ask(&b, &http, &t, "x509-svid").await, 202);
    // Then a step-up of sensitive scopes only, from a new network.
    open_task(&b, &client_from("127.1.0.21"), &orch).await;
    let list = incidents(&b, &orch).await;
    assert_eq!(
        detectors_of(&list),
        ["new-delegate", "new-network"],
        "{list:?}"
    );
    let id = |d: &str| {
        list.iter().find(|i| i["detector"] == d).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let ids = [id("new-delegate"), id("new-network")];
    (b, orch, http, t, ids)
}

/// Two step-ups on one agent: the stricter holds. An incident that steps up
/// only sensitive scopes, opened while one that steps up every scope is
/// open, does not loosen it; once that one is resolved, the other holds.
#[tokio::test]
async fn a_weaker_step_up_does_not_loosen_a_stricter_one() {
    let (b, orch, http, t, [all, _]) = stepped_up_twice().await;
    assert_eq!(
        ask(&b, &http, &t, "x509-svid").await,
        202,
        "the stricter step-up still holds"
    );
    resolve(&b, &all).await;
    assert_eq!(ask(&b, &http, &t, "x509-svid").await, 201);
    let agent = b.admin_get(&format!("/v1/agents/{}", orch.id)).await;
    assert_eq!(agent["step_up"]["scopes"], "sensitive", "{agent}");
}

/// Both incidents resolved at the same moment: neither hands the step-up to
/// the other as it is resolved, and the agent is not left stepped up under
/// an incident nobody can resolve again.
#[tokio::test]
async fn two_incidents_resolved_at_once_lift_the_step_up() {
    let (b, orch, http, t, [all, sensitive]) = stepped_up_twice().await;
    tokio::join!(resolve(&b, &all), resolve(&b, &sensitive));
    let agent = b.admin_get(&format!("/v1/agents/{}", orch.id)).await;
    assert!(agent["step_up"].is_null(), "{agent}");
    assert_eq!(ask(&b, &http, &t, "x509-svid").await, 201);
}

/// Whatever two changes made at once left on the agent (here: its step-up
/// wiped, as two incidents opening together could), the next incident
/// opened or resolved puts back the step-up its open incidents hold.
#[tokio::test]
async fn a_lost_step_up_is_put_back_from_the_open_incidents() {
    let (b, orch, http, t, [all, sensitive]) = stepped_up_twice().await;
    b.store_exec("UPDATE agents SET step_up = NULL WHERE id = ?", &[&orch.id])
        .await
        .unwrap();
    resolve(&b, &sensitive).await;
    let agent = b.admin_get(&format!("/v1/agents/{}", orch.id)).await;
    assert_eq!(agent["step_up"]["incident"], all.as_str(), "{agent}");
    assert_eq!(ask(&b, &http, &t, "x509-svid").await, 202);
}

/// A suspension is not a resolution: a stepped-up agent suspended and
/// resumed is still stepped up until its incident is resolved, and the
/// approval it waited on ended with its task (a late decision is 409, a
/// redeem 401), so the resume revives nothing.
#[tokio::test]
async fn a_suspension_and_resume_neither_lift_a_step_up_nor_revive_its_approval() {
    let b = stepping_up("new-network", "new_source_network", 2).await;
    let agent = TestAgent::new("stepped-suspended", "ES256");
    b.register(&agent, "platform").await;
    let Waiting {
        home,
        away_task: t2,
        incident,
        approval,
        ..
    } = waiting_from_a_new_network(&b, &agent, "127.1.0.11").await;

    // SecOps suspends it while looking; an approver decides too late.
    b.post(
        &format!("/v1/agents/{}/suspend", agent.id),
        Some(&b.ops.secops),
        &json!({ "reason": "looking into the new network" }),
    )
    .await
    .expect(200);
    let late = approve(&b, &approval).await;
    assert_eq!(late.status, 409, "{}", late.text);

    // Resumed: the old task and its approval stay ended.
    b.admin_post(
        &format!("/v1/agents/{}/resume", agent.id),
        &json!({ "reason": "the agent's owner vouches" }),
    )
    .await
    .expect(200);
    let redeem = redeem(&b, &approval, &t2).await;
    assert_eq!(redeem.status, 401, "{}", redeem.text);
    // Still stepped up: a new task's request, from home, waits for a human.
    let shown = b
        .get(&format!("/v1/agents/{}", agent.id), Some(&b.ops.admin))
        .await
        .expect(200);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["step_up"]["incident"], incident.as_str(), "{shown}");
    let t3 = open_task(&b, &home, &agent).await;
    assert_eq!(ask(&b, &home, &t3, "x509-svid").await, 202);
    // Resolving the incident lifts it.
    resolve(&b, &incident).await;
    assert_eq!(ask(&b, &home, &t3, "x509-svid").await, 201);
}

/// The kill switch by team, pulled while an agent of the team is stepped up
/// with a request waiting for a human: the request's task is ended (a late
/// decision is refused, the old token cannot redeem), and the step-up is
/// not lifted by it: the agent's next task still waits for a human until
/// the incident is resolved. The other team's agent is untouched.
#[tokio::test]
async fn a_kill_switch_by_team_neither_lifts_a_step_up_nor_leaves_its_approval_live() {
    let b = stepping_up("new-network", "new_source_network", 2).await;
    let agent = TestAgent::new("stepped-killed", "ES256");
    b.register(&agent, "platform").await;
    let bystander = TestAgent::new("other-team", "ES256");
    b.register(&bystander, "finance").await;
    let Waiting {
        home,
        home_task: t,
        away_task: t2,
        incident,
        approval,
    } = waiting_from_a_new_network(&b, &agent, "127.1.0.12").await;
    let other = open_task(&b, &home, &bystander).await;

    let rv = b
        .post(
            "/v1/revocations",
            Some(&b.ops.secops),
            &json!({ "team": "platform", "reason": "the new network", "wait": 30 }),
        )
        .await
        .expect(200);
    assert_eq!(rv["pending"].as_u64(), Some(0), "{rv}");
    let late = approve(&b, &approval).await;
    assert_eq!(late.status, 409, "{}", late.text);
    let redeem = redeem(&b, &approval, &t2).await;
    assert_eq!(redeem.status, 401, "{}", redeem.text);
    assert_eq!(ask(&b, &home, &t, "x509-svid").await, 401);
    // The other team's task goes on.
    assert_eq!(ask(&b, &home, &other, "x509-svid").await, 201);

    // The agent was not suspended: a new task opens, from home, and its
    // request still waits for a human until the incident is resolved.
    let t3 = open_task(&b, &home, &agent).await;
    assert_eq!(ask(&b, &home, &t3, "x509-svid").await, 202);
    resolve(&b, &incident).await;
    assert_eq!(ask(&b, &home, &t3, "x509-svid").await, 201);
}

/// An agent stepped up, with a request waiting for a human.
struct Waiting {
    home: reqwest::Client,
    /// Its task from its usual network, learned during the warm-up.
    home_task: String,
    /// Its task from the new network, whose request waits.
    away_task: String,
    incident: String,
    approval: String,
}

/// `agent` works from home through the warm-up, then opens a task from
/// `ip`, a network it was never seen on: stepped up, and that task's
/// request waits for a human.
async fn waiting_from_a_new_network(b: &TestBroker, agent: &TestAgent, ip: &str) -> Waiting {
    let home = reqwest::Client::new();
    let home_task = open_task(b, &home, agent).await;
    assert_eq!(ask(b, &home, &home_task, "x509-svid").await, 201);
    assert_eq!(ask(b, &home, &home_task, "x509-svid").await, 201);
    let away_task = open_task(b, &client_from(ip), agent).await;
    let list = incidents(b, agent).await;
    assert_eq!(detectors_of(&list), ["new-network"], "{list:?}");
    let pending = b
        .post(
            "/v1/credentials",
            Some(&away_task),
            &json!({ "scope": "x509-svid", "ttl": 300, "justification": "rotating" }),
        )
        .await
        .expect(202);
    Waiting {
        home,
        home_task,
        away_task,
        incident: list[0]["id"].as_str().unwrap().to_owned(),
        approval: pending["approval_id"].as_str().unwrap().to_owned(),
    }
}

/// An approver approves `approval`.
async fn approve(b: &TestBroker, approval: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{approval}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": "approve", "reason": "looks fine" }),
    )
    .await
}

/// `token`'s session redeems `approval`.
async fn redeem(b: &TestBroker, approval: &str, token: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{approval}/redeem"),
        Some(token),
        &json!({}),
    )
    .await
}

/// SecOps resolves `incident`, lifting its step-up.
async fn resolve(b: &TestBroker, incident: &str) {
    b.post(
        &format!("/v1/incidents/{incident}/resolve"),
        Some(&b.ops.secops),
        &json!({ "reason": "a new office" }),
    )
    .await
    .expect(200);
}

/// An approval asked before an incident stepped the agent up was decided
/// without knowing of it: redeemed after, it is refused (ask again), and
/// the new approval names the incident.
#[tokio::test]
async fn an_approval_from_before_a_step_up_is_asked_again() {
    let b = stepping_up("new-network", "new_source_network", 3).await;
    let agent = TestAgent::new("before-incident", "ES256");
    b.register(&agent, "platform").await;
    let http = reqwest::Client::new();
    let t = open_task(&b, &http, &agent).await;
    for _ in 0..2 {
        assert_eq!(ask(&b, &http, &t, "x509-svid").await, 201);
    }
    let body = json!({ "scope": "payments-ca", "ttl": 300, "justification": "invoice run" });
    let asked = b.post("/v1/credentials", Some(&t), &body).await.expect(202);
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": "approve", "reason": "routine" }),
    )
    .await
    .expect(200);
    // The agent shows up on a network it was never seen on: stepped up.
    open_task(&b, &client_from("127.1.0.33"), &agent).await;
    let list = incidents(&b, &agent).await;
    assert_eq!(detectors_of(&list), ["new-network"], "{list:?}");
    let incident = list[0]["id"].as_str().unwrap();
    let r = redeem(&b, &id, &t).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(
        r.text.contains(incident) && r.text.contains("ask again"),
        "{}",
        r.text
    );
    assert!(b.leases(&format!("agent={}", agent.id)).await.len() == 2);
    let again = b.post("/v1/credentials", Some(&t), &body).await.expect(202);
    assert_ne!(again["approval_id"], id.as_str());
    let approval = b
        .get(
            &format!("/v1/approvals/{}", again["approval_id"].as_str().unwrap()),
            Some(&b.ops.approver),
        )
        .await
        .expect(200);
    assert_eq!(approval["request"]["step_up"], incident, "{approval}");
}

/// A sub-agent's own step-up does not hide a later one on its
/// orchestrator: an approval asked through a delegated task while the
/// sub-agent is stepped up names that incident; approved, and then the
/// orchestrator is stepped up by another, its redeem is refused (its
/// approvers were not told of the second), and asked again it names both.
#[tokio::test]
async fn a_sub_agents_own_step_up_does_not_hide_a_later_one_on_its_orchestrator() {
    let b = stepping_up_on_both("").await;
    let (orch, helper, stranger, _, t) = orchestrator_of_two(&b, "chain").await;
    let sub = delegate(&b, &t, &helper).await;
    delegate(&b, &t, &helper).await;
    // The helper, on a network it was never seen on: stepped up.
    let own = waiting_from_a_new_network(&b, &helper, "127.1.0.41").await;
    let body = json!({ "scope": "x509-svid", "ttl": 300, "justification": "batch" });
    let asked = b
        .post("/v1/credentials", Some(&sub), &body)
        .await
        .expect(202);
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    approve(&b, &id).await.expect(200);
    // Then the orchestrator delegates where it never did: stepped up too.
    delegate(&b, &t, &stranger).await;
    let list = incidents(&b, &orch).await;
    assert_eq!(detectors_of(&list), ["new-delegate"], "{list:?}");
    let later = list[0]["id"].as_str().unwrap();
    let r = redeem(&b, &id, &sub).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.text.contains(later), "{}", r.text);
    let again = b
        .post("/v1/credentials", Some(&sub), &body)
        .await
        .expect(202);
    let approval = b
        .get(
            &format!("/v1/approvals/{}", again["approval_id"].as_str().unwrap()),
            Some(&b.ops.approver),
        )
        .await
        .expect(200);
    assert_eq!(
        approval["request"]["step_ups"],
        json!([own.incident, later]),
        "{approval}"
    );
    assert_eq!(approval["request"]["step_up"], own.incident.as_str());
}
