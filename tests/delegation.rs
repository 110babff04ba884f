//! Delegation through the real server (RFC 8693 token exchange): a sub-agent
//! authenticates as itself and receives a narrower child task; limits on
//! targets and depth hold; ending the parent ends the child. Introspection
//! (RFC 7662) and token revocation (RFC 7009) see it all at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Resp, Setup, TestAgent, TestBroker, eventually};
use serde_json::{Value, json};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

/// An orchestrator, two sub-agents and an outsider, in team `research`
/// (the shipped policies favour no such team); `narrow` may not hold JWT-SVIDs.
pub(crate) struct Cast {
    pub orch: TestAgent,
    pub sub: TestAgent,
    narrow: TestAgent,
    deep: TestAgent,
    outsider: TestAgent,
}

async fn start() -> (TestBroker, Cast) {
    start_with("").await
}

pub(crate) async fn start_with(extra_config: &str) -> (TestBroker, Cast) {
    let cast = Cast {
        orch: TestAgent::new("orch", "ES256"),
        sub: TestAgent::new("sub", "EdDSA"),
        narrow: TestAgent::new("narrow", "ES256"),
        deep: TestAgent::new("deep", "ES256"),
        outsider: TestAgent::new("outsider", "ES256"),
    };
    let forbid = format!(
        r#"@id("narrow-no-jwt")
forbid (principal == Keygate::Agent::"{}", action, resource == Keygate::Scope::"jwt-svid");"#,
        cast.narrow.id
    );
    let b = TestBroker::start_with(Setup {
        policies: vec![
            (
                "permit.cedar".into(),
                common::Setup::permissive().policies[0].1.clone(),
            ),
            ("narrow.cedar".into(), forbid),
        ],
        extra_config: extra_config.into(),
        ..Setup::default()
    })
    .await;
    let register = |a: &TestAgent, delegation: Value| {
        let mut spec = a.spec("research");
        spec["delegation"] = delegation;
        let b = &b;
        async move { b.admin_post("/v1/agents", &spec).await }
    };
    register(
        &cast.orch,
        json!({ "max_depth": 2, "targets": [cast.sub.id, cast.narrow.id] }),
    )
    .await
    .expect(201);
    register(
        &cast.sub,
        json!({ "max_depth": 1, "targets": [cast.deep.id] }),
    )
    .await
    .expect(201);
    register(
        &cast.narrow,
        json!({ "max_depth": 0, "targets": [cast.deep.id] }),
    )
    .await
    .expect(201);
    register(&cast.deep, json!({})).await.expect(201);
    register(&cast.outsider, json!({})).await.expect(201);
    (b, cast)
}

pub(crate) async fn exchange(
    b: &TestBroker,
    parent: &str,
    actor: &TestAgent,
    scope: Option<&str>,
) -> Resp {
    let assertion = actor.assertion();
    let mut form = vec![
        ("grant_type", EXCHANGE),
        ("subject_token", parent),
        ("subject_token_type", ACCESS),
        ("actor_token", assertion.as_str()),
        ("actor_token_type", JWT),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    b.token_form(&form).await
}

pub(crate) async fn introspect(b: &TestBroker, token: &str) -> Value {
    let resp = b
        .http
        .post(b.url("/oauth/introspect"))
        .bearer_auth(&b.ops.secops)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

pub(crate) async fn revoke(b: &TestBroker, bearer: &str, token: &str) -> u16 {
    b.http
        .post(b.url("/oauth/revoke"))
        .bearer_auth(bearer)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_sub_agent_gets_a_narrower_child_task_that_ends_with_its_parent() {
    let (b, c) = start().await;
    let parent = b.token(&c.orch).await;
    let v = exchange(&b, &parent.token, &c.sub, Some("x509-svid"))
        .await
        .expect(200);
    assert_eq!(v["issued_token_type"], ACCESS);
    let child = v["access_token"].as_str().unwrap().to_owned();
    let child_task = v["task_id"].as_str().unwrap().to_owned();

    // Introspection shows the chain and the narrowed scope.
    let i = introspect(&b, &child).await;
    assert_eq!(i["active"], true);
    assert_eq!(i["sub"], c.sub.id.as_str());
    assert_eq!(i["act"]["sub"], c.orch.id.as_str());
    assert_eq!(i["scope"], "x509-svid");

    // The child holds only what it was given.
    let lease = b.x509(&child, Some(300)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = b.credential(&child, "jwt-svid", None, None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("delegated with scopes"), "{}", r.text);
    let delegated = b.audit("action=task.delegated").await;
    assert_eq!(delegated.len(), 1);
    assert_eq!(delegated[0]["task"], child_task.as_str());
    assert_eq!(delegated[0]["details"]["chain"], json!([c.orch.id]));

    // Ending the parent ends the child and revokes its lease.
    b.complete(&parent.token).await.expect(200);
    assert_eq!(introspect(&b, &child).await, json!({ "active": false }));
    let r = b.credential(&child, "x509-svid", None, None).await;
    assert_eq!(r.status, 401, "{}", r.text);
    eventually("the child's lease revoked", || async {
        (b.lease_state(&lease).await == "revoked").then_some(())
    })
    .await;
}

#[tokio::test]
async fn delegation_only_narrows_and_respects_targets_and_depth() {
    let (b, c) = start().await;
    let parent = b.token(&c.orch).await;

    // Escalation: a scope the parent cannot hold (sensitive, not permitted).
    let r = exchange(&b, &parent.token, &c.sub, Some("x509-svid payments-ca")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_scope");
    assert!(r.text.contains("only narrows"), "{}", r.text);
    // A scope the sub-agent's own policy forbids.
    let r = exchange(&b, &parent.token, &c.narrow, Some("jwt-svid")).await;
    assert_eq!(r.json()["error"], "invalid_scope", "{}", r.text);
    // Without `scope`: the parent's ∩ the sub-agent's own.
    let v = exchange(&b, &parent.token, &c.narrow, None)
        .await
        .expect(200);
    let narrow_token = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(introspect(&b, &narrow_token).await["scope"], "x509-svid");

    // A target the orchestrator may not delegate to.
    let r = exchange(&b, &parent.token, &c.outsider, None).await;
    assert_eq!(r.json()["error"], "invalid_target", "{}", r.text);
    // The sub-agent's own assertion is required, and must be its own.
    let forged = c.outsider.assertion();
    let r = b
        .token_form(&[
            ("grant_type", EXCHANGE),
            ("subject_token", parent.token.as_str()),
            ("subject_token_type", ACCESS),
            ("actor_token", forged.as_str()),
            ("actor_token_type", JWT),
            ("client_id", c.sub.id.as_str()),
        ])
        .await;
    assert_eq!(r.json()["error"], "invalid_client", "{}", r.text);

    // Depth: orch (budget 2) → sub (budget min(1, 1)) → deep (budget 0) → no further.
    let v = exchange(&b, &parent.token, &c.sub, None).await.expect(200);
    let sub_token = v["access_token"].as_str().unwrap().to_owned();
    let v = exchange(&b, &sub_token, &c.deep, Some("x509-svid"))
        .await
        .expect(200);
    let deep_token = v["access_token"].as_str().unwrap().to_owned();
    let i = introspect(&b, &deep_token).await;
    assert_eq!(i["act"]["sub"], c.sub.id.as_str());
    assert_eq!(i["act"]["act"]["sub"], c.orch.id.as_str());
    // `narrow` has max_depth 0: it may not pass its task on even to a listed target.
    let r = exchange(&b, &narrow_token, &c.deep, None).await;
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    assert!(r.text.contains("depth limit"), "{}", r.text);

    // A dead parent token cannot delegate.
    b.complete(&parent.token).await.expect(200);
    let r = exchange(&b, &parent.token, &c.sub, None).await;
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    // The grandchild died with the root.
    assert_eq!(introspect(&b, &deep_token).await["active"], false);
}

/// A delegator's `max_depth` lowered while its task is open binds that task
/// and every task below it from then on, not only tasks opened later.
#[tokio::test]
async fn a_lowered_delegation_depth_binds_the_tasks_already_open() {
    let (b, c) = start().await;
    let parent = b.token(&c.orch).await;
    let v = exchange(&b, &parent.token, &c.sub, None).await.expect(200);
    let sub_token = v["access_token"].as_str().unwrap().to_owned();
    // The orchestrator may now delegate one level only: its sub-agent's
    // task, at that level already, may not pass it on.
    let r = b
        .patch_agent(
            &c.orch.id,
            &json!({ "delegation": { "max_depth": 1, "targets": [c.sub.id, c.narrow.id] } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = exchange(&b, &sub_token, &c.deep, Some("x509-svid")).await;
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    assert!(r.text.contains("depth limit"), "{}", r.text);
    // Lowered to 0: its own open task may not delegate at all.
    let r = b
        .patch_agent(
            &c.orch.id,
            &json!({ "delegation": { "max_depth": 0, "targets": [c.sub.id, c.narrow.id] } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = exchange(&b, &parent.token, &c.sub, None).await;
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
}

#[tokio::test]
async fn introspection_and_revocation_of_session_tokens() {
    let (b, c) = start().await;
    let s = b.token(&c.orch).await;
    let other = b.token(&c.outsider).await;

    // Introspection needs a resource-server credential.
    let r = b
        .http
        .post(b.url("/oauth/introspect"))
        .form(&[("token", s.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = b
        .http
        .post(b.url("/oauth/introspect"))
        .bearer_auth(&b.ops.auditor)
        .form(&[("token", s.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        introspect(&b, "not-a-token").await,
        json!({ "active": false })
    );
    assert_eq!(introspect(&b, &s.token).await["active"], true);

    // Another agent may not revoke it; its holder may; unknown tokens are fine.
    assert_eq!(revoke(&b, &other.token, &s.token).await, 403);
    assert_eq!(revoke(&b, &s.token, &s.token).await, 200);
    assert_eq!(introspect(&b, &s.token).await, json!({ "active": false }));
    assert_eq!(revoke(&b, &b.ops.secops, "garbage").await, 200);
    // SecOps may revoke anyone's.
    assert_eq!(revoke(&b, &b.ops.secops, &other.token).await, 200);
    assert_eq!(introspect(&b, &other.token).await["active"], false);
    let ev = b.audit("action=task.token_revoked").await;
    assert_eq!(ev.len(), 2);

    let meta = b
        .get("/.well-known/oauth-authorization-server", None)
        .await
        .expect(200);
    assert!(
        meta["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(EXCHANGE))
    );
    assert!(meta["introspection_endpoint"].is_string());
}

#[tokio::test]
async fn a_delegated_request_may_not_exceed_any_delegator() {
    // The shipped guardrail caps tier-3 agents at 900 s; a tier-1 child of a
    // tier-3 parent must not get more through delegation.
    let b = TestBroker::start_with(Setup::permissive()).await;
    let parent = TestAgent::new("tier3", "ES256");
    let child = TestAgent::new("tier1", "ES256");
    let mut spec = parent.spec("research");
    spec["risk_tier"] = json!(3);
    spec["delegation"] = json!({ "max_depth": 1, "targets": [child.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let mut spec = child.spec("research");
    spec["risk_tier"] = json!(1);
    b.admin_post("/v1/agents", &spec).await.expect(201);
    // Tasks long enough that 1800 s is what would be granted.
    let p = b.token_ttl(&parent, Some(3600)).await;
    let assertion = child.assertion();
    let v = b
        .token_form(&[
            ("grant_type", EXCHANGE),
            ("subject_token", p.token.as_str()),
            ("subject_token_type", ACCESS),
            ("actor_token", assertion.as_str()),
            ("actor_token_type", JWT),
            ("scope", "x509-svid"),
            ("ttl", "3600"),
        ])
        .await
        .expect(200);
    let delegated = v["access_token"].as_str().unwrap();

    let r = b.credential(delegated, "x509-svid", Some(1800), None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let body = r.json();
    assert_eq!(body["error"], "policy_denied");
    assert!(
        body["message"].as_str().unwrap().contains(&parent.id),
        "{body}"
    );
    assert_eq!(body["policies"], json!(["tier3-short-ttl"]), "{body}");
    let denied = b
        .audit(&format!("agent={}&action=credential.requested", child.id))
        .await;
    let last = denied.last().unwrap();
    assert_eq!(last["outcome"], "failure");
    assert_eq!(
        last["details"]["delegators"][0]["agent"],
        parent.id.as_str()
    );

    // Within the parent's terms: granted, and the decision names both.
    let ok = b
        .credential(delegated, "x509-svid", Some(600), None)
        .await
        .expect(201);
    assert!(ok["lease_id"].is_string());
}

/// A chain two deep (orchestrator → sub → deep) ends from its top however
/// the top ends: its TTL running out (the reaper), token revocation (RFC
/// 7009) or the kill switch on the orchestrator. Every task below is ended
/// and its credentials revoked.
#[tokio::test]
async fn however_a_parent_ends_every_task_below_it_ends() {
    let (b, c) = start().await;
    // One chain: the parent's token, the deepest token and its lease.
    let chain = || {
        let (b, c) = (&b, &c);
        async move {
            let parent = b.token_ttl(&c.orch, Some(3600)).await;
            let mid = exchange(b, &parent.token, &c.sub, Some("x509-svid"))
                .await
                .expect(200);
            let mid = mid["access_token"].as_str().unwrap().to_owned();
            let deep = exchange(b, &mid, &c.deep, Some("x509-svid"))
                .await
                .expect(200);
            let deep = deep["access_token"].as_str().unwrap().to_owned();
            let lease = b.x509(&deep, Some(300)).await["lease_id"]
                .as_str()
                .unwrap()
                .to_owned();
            (parent, mid, deep, lease)
        }
    };
    let ended = |mid: String, deep: String, lease: String, how: &'static str| {
        let b = &b;
        async move {
            eventually(how, || async {
                let gone = introspect(b, &mid).await == json!({ "active": false })
                    && introspect(b, &deep).await == json!({ "active": false })
                    && b.lease_state(&lease).await == "revoked";
                gone.then_some(())
            })
            .await;
        }
    };

    // 1. The parent's TTL runs out (moved back in the store; the reaper acts).
    let (parent, mid, deep, lease) = chain().await;
    let past = (common::unix_now() - 1).to_string();
    b.store_exec(
        "UPDATE tasks SET expires_at = ? WHERE id = ?",
        &[&past, &parent.task_id],
    )
    .await
    .unwrap();
    ended(mid, deep, lease, "the chain ends with its parent's TTL").await;

    // 2. The parent's token is revoked (RFC 7009, by the orchestrator).
    let (parent, mid, deep, lease) = chain().await;
    assert_eq!(revoke(&b, &parent.token, &parent.token).await, 200);
    ended(mid, deep, lease, "the chain ends with its revoked parent").await;

    // 3. The kill switch hits the orchestrator only (and suspends it): the
    // sub-agents' lease below counts in its progress, then and later.
    let (_parent, mid, deep, lease) = chain().await;
    let r = b
        .post(
            "/v1/revocations",
            Some(&b.ops.secops),
            &json!({ "agent": c.orch.id, "reason": "compromised orchestrator", "suspend": true }),
        )
        .await
        .expect(200);
    assert_eq!(
        (&r["found"], &r["agents_suspended"]),
        (&json!(1), &json!(1)),
        "{r}"
    );
    let id = r["revocation_id"].as_str().unwrap();
    let later = b
        .get(
            &format!("/v1/revocations/{id}?wait=5"),
            Some(&b.ops.auditor),
        )
        .await
        .expect(200);
    assert_eq!(
        (
            &later["found"],
            &later["revoked"],
            &later["agents_suspended"]
        ),
        (&json!(1), &json!(1), &json!(1)),
        "{later}"
    );
    ended(
        mid,
        deep,
        lease,
        "the chain ends with the kill switch on its top",
    )
    .await;
}

/// Exchanges in flight while the parent ends (its token revoked, or the
/// kill switch on its agent): each is answered, a child is either refused
/// (`invalid_grant`) or ended with its parent, never left open below an
/// ended task.
#[tokio::test]
async fn exchanges_racing_the_parents_end_leave_no_child_open() {
    use std::time::Duration;
    // As many exchanges as the race needs (the per-client limit's burst is 60).
    let (b, c) = start_with("[limits]\nper_client_per_minute = 0\n").await;
    let (mut children, mut refused) = (Vec::new(), 0);
    for round in 0..8u64 {
        let parent = b.token_ttl(&c.orch, Some(3600)).await;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (http, url) = (b.http.clone(), b.url("/oauth/token"));
            let form = [
                ("grant_type", EXCHANGE.to_owned()),
                ("subject_token", parent.token.clone()),
                ("subject_token_type", ACCESS.to_owned()),
                ("actor_token", c.sub.assertion()),
                ("actor_token_type", JWT.to_owned()),
                ("scope", "x509-svid".to_owned()),
            ];
            set.spawn(async move {
                let r = http.post(url).form(&form).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            });
        }
        tokio::time::sleep(Duration::from_millis(2 * round)).await;
        if round % 2 == 0 {
            assert_eq!(revoke(&b, &parent.token, &parent.token).await, 200);
        } else {
            let body = json!({ "agent": c.orch.id, "reason": "race" });
            b.post("/v1/revocations", Some(&b.ops.secops), &body)
                .await
                .expect(200);
        }
        for (status, v) in set.join_all().await {
            match status {
                200 => children.push(v["access_token"].as_str().unwrap().to_owned()),
                400 if v["error"] == "invalid_grant" => refused += 1,
                _ => panic!("round {round}: {status} {v}"),
            }
        }
        // The parent is gone for good; so is every child of it.
        assert_eq!(
            introspect(&b, &parent.token).await,
            json!({ "active": false })
        );
    }
    assert_eq!(children.len() + refused, 8 * 16, "every exchange answered");
    assert!(
        !children.is_empty() && refused > 0,
        "the parent's end never fell inside the race: {} children, {refused} refused",
        children.len()
    );
    for child in &children {
        eventually("every child ends with its parent", || async {
            (introspect(&b, child).await == json!({ "active": false })).then_some(())
        })
        .await;
        let r = b.credential(child, "x509-svid", Some(60), None).await;
        assert_eq!(r.status, 401, "a child of an ended task mints: {}", r.text);
    }
}

/// A scope excluded from an orchestrator is taken from its sub-agents too,
/// in the tasks it delegated: their live credentials of it are revoked, as
/// their next request for it is refused.
#[tokio::test]
async fn an_exclusion_of_the_orchestrator_revokes_what_its_sub_agents_hold_of_it() {
    let (b, c) = start().await;
    let parent = b.token_ttl(&c.orch, Some(3600)).await;
    let child = exchange(&b, &parent.token, &c.sub, Some("x509-svid"))
        .await
        .expect(200);
    let child = child["access_token"].as_str().unwrap().to_owned();
    let held = b.x509(&child, Some(300)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The sub-agent's own task, not delegated, keeps its credential.
    let own = b.token(&c.sub).await;
    let kept = b.x509(&own.token, Some(300)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.admin_post(
        &format!("/v1/agents/{}/exclusions", c.orch.id),
        &json!({ "scope": "x509-svid", "reason": "no more certificates" }),
    )
    .await
    .expect(200);
    eventually("the delegated certificate revoked", || async {
        (b.lease_state(&held).await == "revoked").then_some(())
    })
    .await;
    assert_eq!(b.lease_state(&kept).await, "active");
    let r = b.credential(&child, "x509-svid", Some(300), None).await;
    assert_eq!(r.status, 403, "{}", r.text);
}
