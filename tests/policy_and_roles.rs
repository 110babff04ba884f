//! Cedar decisions as the agent and the auditor see them, and the operator
//! role checks on every admin endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker};
use reqwest::Method;
use serde_json::{Value, json};

const SENSITIVE_PERMIT: &str = r#"
@id("payments-for-platform")
permit (
  principal in Keygate::Team::"platform",
  action == Keygate::Action::"request_credential",
  resource == Keygate::Scope::"payments-ca"
);
"#;

/// The newest `credential.requested` event of `agent`.
async fn last_decision(b: &TestBroker, agent: &str) -> Value {
    let evs = b
        .audit(&format!("action=credential.requested&agent={agent}"))
        .await;
    evs.last().cloned().expect("a credential.requested event")
}

#[tokio::test]
async fn denials_name_their_policies_and_are_audited() {
    let b = TestBroker::start_with(Setup {
        policies: vec![("sensitive.cedar".into(), SENSITIVE_PERMIT.into())],
        ..Setup::default()
    })
    .await;
    let policy_hash = keygate::policy::PolicyEngine::load(&b.dir.join("policies"))
        .unwrap()
        .hash()
        .to_owned();
    assert!(
        b.log().contains(&policy_hash),
        "the server logs the same policy hash"
    );

    // A tier-3 platform agent: permitted, but the guardrail forbids long TTLs.
    let tier3 = TestAgent::new("tier3", "ES256");
    let mut spec = tier3.spec("platform");
    spec["risk_tier"] = 3.into();
    b.admin_post("/v1/agents", &spec).await.expect(201);
    // A task long enough that 1800 s is what would be granted.
    let s = b.token_ttl(&tier3, Some(3600)).await;

    let denied = b.credential(&s.token, "x509-svid", Some(1800), None).await;
    let body = denied.expect(403);
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(body["policies"], json!(["tier3-short-ttl"]));
    assert!(body["message"].as_str().unwrap().contains("x509-svid"));
    let ev = last_decision(&b, &tier3.id).await;
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["outcome"], "failure");
    assert_eq!(ev["policy_ids"], json!(["tier3-short-ttl"]));
    assert_eq!(ev["policy_hash"], policy_hash.as_str());
    assert_eq!(ev["scope"], "x509-svid");
    assert_eq!(ev["task"], s.task_id.as_str());
    assert!(ev["lease"].is_null(), "no lease for a denial");
    assert!(b.leases(&format!("agent={}", tier3.id)).await.is_empty());

    // Within the guardrail the permit decides, and says which one.
    let ok = b.x509(&s.token, Some(600)).await;
    let ev = last_decision(&b, &tier3.id).await;
    assert_eq!(ev["decision"], "allow", "{ev}");
    assert_eq!(ev["outcome"], "success");
    assert_eq!(ev["policy_ids"], json!(["platform-svids"]));
    assert_eq!(ev["policy_hash"], policy_hash.as_str());
    assert_eq!(ev["lease"], ok["lease_id"]);

    // Nothing permits another team: denied by default, no policy to name.
    let outsider = TestAgent::new("outsider", "ES256");
    b.register(&outsider, "marketing").await;
    let os = b.token(&outsider).await;
    let body = b
        .credential(&os.token, "x509-svid", None, None)
        .await
        .expect(403);
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(body["policies"], json!([]));
    let ev = last_decision(&b, &outsider.id).await;
    assert_eq!(ev["decision"], "deny");
    assert_eq!(ev["policy_ids"], json!([]));
    assert_eq!(ev["policy_hash"], policy_hash.as_str());

    // A sensitive scope that a policy permits still needs a human.
    let platform = TestAgent::new("platform", "EdDSA");
    b.register(&platform, "platform").await;
    let ps = b.token(&platform).await;
    let body = b
        .post(
            "/v1/credentials",
            Some(&ps.token),
            &json!({ "scope": "payments-ca", "justification": "settle batch 7" }),
        )
        .await
        .expect(202);
    assert_eq!(body["status"], "pending", "{body}");
    let ev = last_decision(&b, &platform.id).await;
    assert_eq!(ev["decision"], "allow");
    let ids = ev["policy_ids"].as_array().unwrap();
    assert!(ids.contains(&json!("payments-for-platform")), "{ev}");
    assert_eq!(ev["details"]["outcome"], "approval_required");
    assert!(b.leases(&format!("agent={}", platform.id)).await.is_empty());
}

/// Tokens by role name, plus the roles that must be refused.
fn roles(b: &TestBroker) -> Vec<(&'static str, String)> {
    vec![
        ("admin", b.ops.admin.clone()),
        ("secops", b.ops.secops.clone()),
        ("auditor", b.ops.auditor.clone()),
        ("approver", b.ops.approver.clone()),
    ]
}

/// No token and a bad token get 401; every role outside `allowed` gets 403.
async fn refused_to_others(
    b: &TestBroker,
    method: Method,
    path: &str,
    body: Option<&Value>,
    allowed: &[&str],
) {
    let r = b.call(method.clone(), path, None, body).await;
    assert_eq!(r.status, 401, "{method} {path} without a token: {}", r.text);
    assert_eq!(r.error(), "unauthorized");
    let r = b
        .call(method.clone(), path, Some("not-an-operator-token"), body)
        .await;
    assert_eq!(
        r.status, 401,
        "{method} {path} with a bad token: {}",
        r.text
    );
    assert_eq!(r.error(), "unauthorized");
    for (role, token) in roles(b) {
        if allowed.contains(&role) {
            continue;
        }
        let r = b.call(method.clone(), path, Some(&token), body).await;
        assert_eq!(r.status, 403, "{method} {path} as {role}: {}", r.text);
        assert_eq!(r.error(), "forbidden");
    }
}

fn token_of(b: &TestBroker, role: &str) -> String {
    roles(b).into_iter().find(|(r, _)| *r == role).unwrap().1
}

#[tokio::test]
async fn every_admin_endpoint_checks_roles() {
    let b = TestBroker::start().await;
    let target = TestAgent::new("target", "ES256");
    b.register(&target, "platform").await;
    let session = b.token(&target).await;
    const READERS: &[&str] = &["admin", "secops", "auditor"];

    // Registration: admin only.
    let newcomer = TestAgent::new("newcomer", "ES256");
    let spec = newcomer.spec("platform");
    refused_to_others(&b, Method::POST, "/v1/agents", Some(&spec), &["admin"]).await;
    b.post("/v1/agents", Some(&b.ops.admin), &spec)
        .await
        .expect(201);

    // Reads.
    let one = format!("/v1/agents/{}", target.id);
    for path in ["/v1/agents", one.as_str(), "/v1/leases"] {
        refused_to_others(&b, Method::GET, path, None, READERS).await;
        for role in READERS {
            b.get(path, Some(&token_of(&b, role))).await.expect(200);
        }
    }

    // Suspend (admin, secops), resume (admin), decommission (admin).
    let suspend = format!("/v1/agents/{}/suspend", target.id);
    let resume = format!("/v1/agents/{}/resume", target.id);
    refused_to_others(&b, Method::POST, &suspend, None, &["admin", "secops"]).await;
    refused_to_others(&b, Method::POST, &resume, None, &["admin"]).await;
    for role in ["admin", "secops"] {
        let v = b
            .post(
                &suspend,
                Some(&token_of(&b, role)),
                &json!({ "reason": "role test" }),
            )
            .await
            .expect(200);
        assert_eq!(v["status"], "suspended");
        let v = b
            .post(&resume, Some(&b.ops.admin), &json!({}))
            .await
            .expect(200);
        assert_eq!(v["status"], "active");
    }
    let decommission = format!("/v1/agents/{}/decommission", newcomer.id);
    refused_to_others(&b, Method::POST, &decommission, None, &["admin"]).await;
    let v = b
        .post(&decommission, Some(&b.ops.admin), &json!({}))
        .await
        .expect(200);
    assert_eq!(v["status"], "decommissioned");

    // Emergency revocation (secops, admin) and its status (readers).
    let rv = json!({ "agent": target.id, "reason": "role test" });
    refused_to_others(
        &b,
        Method::POST,
        "/v1/revocations",
        Some(&rv),
        &["secops", "admin"],
    )
    .await;
    let mut ids = Vec::new();
    for role in ["secops", "admin"] {
        let v = b
            .post("/v1/revocations", Some(&token_of(&b, role)), &rv)
            .await
            .expect(200);
        ids.push(v["revocation_id"].as_str().unwrap().to_owned());
    }
    let status = format!("/v1/revocations/{}", ids[0]);
    refused_to_others(&b, Method::GET, &status, None, READERS).await;
    for role in READERS {
        let v = b.get(&status, Some(&token_of(&b, role))).await.expect(200);
        assert_eq!(v["revocation_id"], ids[0].as_str());
    }

    // Changing an agent: admin only (and nothing changed for the others).
    let change = json!({ "purpose": "role test" });
    refused_to_others(&b, Method::PATCH, &one, Some(&change), &["admin"]).await;
    assert_ne!(b.admin_get(&one).await["purpose"], "role test");
    let r = b
        .call(Method::PATCH, &one, Some(&b.ops.admin), Some(&change))
        .await;
    assert_eq!(r.expect(200)["purpose"], "role test");

    // Fences: readers; approvals: readers and approvers.
    refused_to_others(&b, Method::GET, "/v1/fences", None, READERS).await;
    for role in READERS {
        b.get("/v1/fences", Some(&token_of(&b, role)))
            .await
            .expect(200);
    }
    let approval_readers = ["admin", "secops", "auditor", "approver"];
    refused_to_others(&b, Method::GET, "/v1/approvals", None, &approval_readers).await;
    for role in approval_readers {
        b.get("/v1/approvals", Some(&token_of(&b, role)))
            .await
            .expect(200);
    }

    // Audit: auditor and admin.
    refused_to_others(&b, Method::GET, "/v1/audit", None, &["auditor", "admin"]).await;
    for role in ["auditor", "admin"] {
        let r = b.get("/v1/audit", Some(&token_of(&b, role))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.text.lines().count() > 5);
    }

    // An agent's session token is not an operator token.
    let r = b.get("/v1/agents", Some(&session.token)).await;
    assert_eq!(r.status, 401);
    // Bad operator tokens are audited, without the token.
    let fails = b.audit("action=operator.auth").await;
    assert!(fails.len() >= 2, "{fails:?}");
    assert!(fails.iter().all(|e| e["outcome"] == "failure"));
    assert!(
        !serde_json::to_string(&fails)
            .unwrap()
            .contains("not-an-operator-token")
    );
}

#[tokio::test]
async fn policy_judges_the_ttl_that_would_be_granted_and_names_it_when_it_refuses() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("ttl", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    // jwt-svid's max_ttl is 900: asking 4000 s is asking 900 s, which the
    // platform permit (ttl <= 3600) allows.
    let audience = serde_json::json!({ "audience": common::JWT_AUDIENCE });
    let v = b
        .credential(&s.token, "jwt-svid", Some(4000), Some(audience))
        .await
        .expect(201);
    let granted = common::rfc3339(&v["expires_at"]) - time::OffsetDateTime::now_utc();
    assert!(granted.whole_seconds() <= 900, "{v}");

    // A tier-3 agent is held to 900 s by the guardrail: the error says the
    // ttl was refused, and what would pass.
    let t3 = TestAgent::new("ttl3", "ES256");
    let mut spec = t3.spec("platform");
    spec["risk_tier"] = serde_json::json!(3);
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let s = b.token_ttl(&t3, Some(3600)).await;
    let r = b.credential(&s.token, "x509-svid", Some(1800), None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("900 s is permitted"), "{message}");
    b.credential(&s.token, "x509-svid", Some(900), None)
        .await
        .expect(201);
}

/// Cedar's entities are kept per agent between decisions (`policy/
/// prepared.rs`): an agent changed through the API between two requests of
/// one task is judged on what it is now at the very next one, both ways.
#[tokio::test]
async fn an_agent_changed_between_two_requests_is_judged_as_it_is_now() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("changing", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let path = format!("/v1/agents/{}", agent.id);
    let set_tier = |tier: u8| {
        let (b, path) = (&b, &path);
        async move {
            let r = b
                .call(
                    Method::PATCH,
                    path,
                    Some(&b.ops.admin),
                    Some(&json!({ "risk_tier": tier })),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    };
    // Tier 2: 1800 s is permitted, and the agent's entities are now kept.
    b.credential(&s.token, "x509-svid", Some(1800), None)
        .await
        .expect(201);
    set_tier(3).await;
    let r = b.credential(&s.token, "x509-svid", Some(1800), None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(
        r.json()["policies"],
        json!(["tier3-short-ttl"]),
        "{}",
        r.text
    );
    let ev = last_decision(&b, &agent.id).await;
    assert_eq!(ev["decision"], "deny", "{ev}");
    // Back to tier 2: permitted again, in the same task.
    set_tier(2).await;
    b.credential(&s.token, "x509-svid", Some(1800), None)
        .await
        .expect(201);
    let ev = last_decision(&b, &agent.id).await;
    assert_eq!(ev["decision"], "allow", "{ev}");
}

/// What a call reads of its agent and task is never older than the last
/// change through the API, however recently the same agent was seen: its
/// key replaced right after a task open and a credential, the old key is
/// refused and the new one accepted at the next call; suspended, its open
/// session and its key are refused at once; resumed, its key opens a task
/// again. (The SQLite engine answers repeated session checks and task opens
/// from memory while nothing changed: this is the sequence that would
/// catch a change it missed.)
#[tokio::test]
async fn a_key_replaced_or_an_agent_suspended_is_seen_by_the_next_call() {
    let b = TestBroker::start().await;
    let old = TestAgent::new("rekeyed", "ES256");
    b.register(&old, "platform").await;
    // Seen twice: a task open and a credential in its task.
    b.token(&old).await;
    let s = b.token(&old).await;
    b.credential(&s.token, "x509-svid", Some(300), None)
        .await
        .expect(201);
    let mut new = TestAgent::new("rekeyed", "ES256");
    new.id = old.id.clone();
    let path = format!("/v1/agents/{}", old.id);
    let r = b
        .call(
            Method::PATCH,
            &path,
            Some(&b.ops.admin),
            Some(&json!({ "jwks": { "keys": [new.jwk] } })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = b.token_with_assertion(&old.id, &old.assertion()).await;
    assert_eq!(
        r.status, 401,
        "the replaced key still opens a task: {}",
        r.text
    );
    assert_eq!(r.json()["error"], "invalid_client", "{}", r.text);
    let s = b.token(&new).await;
    b.credential(&s.token, "x509-svid", Some(300), None)
        .await
        .expect(201);

    b.admin_post(&format!("{path}/suspend"), &json!({ "reason": "test" }))
        .await
        .expect(200);
    let r = b.credential(&s.token, "x509-svid", Some(300), None).await;
    assert_eq!(r.status, 401, "a suspended agent's session: {}", r.text);
    let r = b.token_with_assertion(&new.id, &new.assertion()).await;
    assert!(
        r.status.is_client_error(),
        "a suspended agent opened a task: {} {}",
        r.status,
        r.text
    );
    b.admin_post(&format!("{path}/resume"), &json!({}))
        .await
        .expect(200);
    let s = b.token(&new).await;
    b.credential(&s.token, "x509-svid", Some(300), None)
        .await
        .expect(201);
}
