//! The kill switch for STS sessions: an emergency revocation writes deny
//! policies on the affected roles, reports them, and an operator lifts them.
//!
//! moto stores and returns inline role policies faithfully (GetRolePolicy
//! returns the document URL-encoded), which is what is checked here. It does
//! not evaluate `aws:SourceIdentity` or `aws:TokenIssueTime` conditions for
//! STS sessions, so these tests check the policies Keygate writes, never that
//! AWS would deny a call with them.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::aws::{Moto, role_arn};
use common::{TestAgent, TestBroker};
use reqwest::Method;
use serde_json::{Value, json};

pub(super) fn scopes() -> String {
    let scope = |name: &str| {
        format!(
            "[[scopes]]\nname = \"{name}\"\nprovider = \"aws\"\nmax_ttl_secs = 3600\nparams = {{ kind = \"assume_role\", role_arn = \"{}\" }}\n",
            role_arn(name)
        )
    };
    format!("{}\n{}", scope("reports"), scope("billing"))
}

/// Registers a platform agent, opens a long task and takes a credential
/// per scope.
pub(super) async fn with_sessions(
    b: &TestBroker,
    prefix: &str,
    scopes: &[&str],
) -> (TestAgent, String, Vec<String>) {
    with_sessions_in(b, "platform", prefix, scopes).await
}

pub(super) async fn with_sessions_in(
    b: &TestBroker,
    team: &str,
    prefix: &str,
    scopes: &[&str],
) -> (TestAgent, String, Vec<String>) {
    let agent = TestAgent::new(prefix, "ES256");
    b.register(&agent, team).await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let mut leases = Vec::new();
    for scope in scopes {
        let cred = b
            .credential(&s.token, scope, Some(900), None)
            .await
            .expect(201);
        leases.push(cred["lease_id"].as_str().unwrap().to_owned());
    }
    (agent, s.token, leases)
}

fn fence<'a>(report: &'a Value, role: &str, name: &str) -> &'a Value {
    report["fences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["target"] == role_arn(role) && f["name"] == name)
        .unwrap_or_else(|| panic!("no fence `{name}` on `{role}` in {report}"))
}

pub(super) fn deny_condition(doc: &Value) -> &Value {
    let st = &doc["Statement"][0];
    assert_eq!(
        (
            st["Effect"].as_str(),
            st["Action"].as_str(),
            st["Resource"].as_str()
        ),
        (Some("Deny"), Some("*"), Some("*")),
        "{doc}"
    );
    &st["Condition"]
}

#[tokio::test]
async fn kill_switch_fences_the_roles_and_lifting_takes_the_policies_down() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    moto.create_role("billing").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let (red, red_token, red_leases) = with_sessions(&b, "red", &["reports", "billing"]).await;
    let (blue, _blue_token, _) = with_sessions(&b, "blue", &["reports"]).await;
    // A released session still lives, so it is fenced too.
    let path = format!("/v1/credentials/{}", red_leases[1]);
    let released = b
        .call(Method::DELETE, &path, Some(&red_token), None)
        .await
        .expect(200);
    assert_eq!(released["state"], "expiring");

    let body =
        json!({ "agent": red.id, "reason": "prompt injection", "revoke_older_sessions": true });
    let rv = b
        .post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    assert_eq!(rv["fences"].as_array().unwrap().len(), 4, "{rv}");
    assert!(rv.get("fence_failures").is_none(), "{rv}");
    assert_eq!(
        (rv["found"].as_u64(), rv["expiring"].as_u64()),
        (Some(1), Some(1)),
        "{rv}"
    );
    let agent_fence = format!("keygate-fence-{}", red.id);
    for role in ["reports", "billing"] {
        let f = fence(&rv, role, &agent_fence);
        assert_eq!(
            (f["provider"].as_str(), f["agent"].as_str()),
            (Some("aws"), Some(red.id.as_str()))
        );
        assert!(
            f["description"]
                .as_str()
                .unwrap()
                .contains("aws:SourceIdentity"),
            "{f}"
        );
        assert!(f.get("handle").is_none(), "handles stay inside the broker");
        let doc = moto.role_policy(role, &agent_fence).await.unwrap();
        assert_eq!(
            deny_condition(&doc),
            &json!({ "StringEquals": { "aws:SourceIdentity": red.id } })
        );
        let older = fence(&rv, role, "keygate-revoke-older-sessions");
        assert!(older["agent"].is_null(), "{older}");
        assert!(
            older["description"]
                .as_str()
                .unwrap()
                .contains("aws:TokenIssueTime")
        );
        let doc = moto
            .role_policy(role, "keygate-revoke-older-sessions")
            .await
            .unwrap();
        let cut_off = common::rfc3339(&deny_condition(&doc)["DateLessThan"]["aws:TokenIssueTime"]);
        let created = common::rfc3339(&older["created_at"]);
        assert!(
            (cut_off - created).whole_seconds().abs() <= 2,
            "{cut_off} vs {created}"
        );
    }
    // The other agent was not fenced by name.
    let blue_fence = format!("keygate-fence-{}", blue.id);
    assert!(moto.role_policy("reports", &blue_fence).await.is_none());

    // The fences are on record: in the revocation, the fence list and the audit.
    let id = rv["revocation_id"].as_str().unwrap();
    let status = b.admin_get(&format!("/v1/revocations/{id}")).await;
    assert_eq!(status["fences"], rv["fences"]);
    let standing = b.admin_get("/v1/fences?active=true").await;
    assert_eq!(standing.as_array().unwrap().len(), 4);
    let applied = b.audit("action=fence.applied").await;
    assert_eq!(applied.len(), 4);
    assert!(
        applied
            .iter()
            .all(|e| e["actor"] == "operator:test-secops" && e["details"]["revocation_id"] == id)
    );

    // Lifting: secops or admin only, with a reason, once.
    let reports = fence(&rv, "reports", &agent_fence)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lift = format!("/v1/fences/{reports}/lift");
    let r = b
        .post(&lift, Some(&b.ops.auditor), &json!({ "reason": "x" }))
        .await;
    assert_eq!(r.status.as_u16(), 403);
    let r = b.post(&lift, Some(&b.ops.secops), &json!({})).await;
    assert_eq!(r.status.as_u16(), 400);
    assert!(moto.role_policy("reports", &agent_fence).await.is_some());
    let lifted = b
        .post(
            &lift,
            Some(&b.ops.secops),
            &json!({ "reason": "agent re-keyed" }),
        )
        .await
        .expect(200);
    assert_eq!(
        (lifted["lifted_by"].as_str(), lifted["lift_reason"].as_str()),
        (Some("test-secops"), Some("agent re-keyed"))
    );
    assert!(moto.role_policy("reports", &agent_fence).await.is_none());
    assert!(
        moto.role_policy("billing", &agent_fence).await.is_some(),
        "other fences stand"
    );
    let again = b
        .post(&lift, Some(&b.ops.secops), &json!({ "reason": "again" }))
        .await;
    assert_eq!(again.status.as_u16(), 409);
    let ev = b.audit("action=fence.lifted").await;
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0]["actor"].as_str(), ev[0]["reason"].as_str()),
        (Some("operator:test-secops"), Some("agent re-keyed"))
    );
    // Lifting the agent's fence lets it work again, not the sessions the
    // kill switch ended: those were fenced one by one first, on each role
    // they are on, by fences that lift themselves once they expire.
    let sessions = format!("keygate-revoked-sessions-{}", red.id);
    let task = b.leases(&format!("agent={}", red.id)).await[0]["task_id"].clone();
    for role in ["reports", "billing"] {
        let doc = moto.role_policy(role, &sessions).await.unwrap();
        assert!(doc.to_string().contains(task.as_str().unwrap()), "{doc}");
    }
    let standing = b.admin_get("/v1/fences?active=true").await;
    let by_session: Vec<&Value> = standing
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["name"] == sessions.as_str())
        .collect();
    assert_eq!(by_session.len(), 2, "{standing}");
    assert!(
        by_session
            .iter()
            .all(|f| f["revocation_id"] == id && f["expires_at"].is_string()),
        "{standing}"
    );
    assert_eq!(standing.as_array().unwrap().len(), 5, "{standing}");
}

#[tokio::test]
async fn overlapping_fences_stand_until_the_last_is_lifted_and_the_cli_says_what_it_fenced() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    moto.create_role("billing").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let (first, _, _) = with_sessions(&b, "first", &["reports"]).await;
    let (second, _, _) = with_sessions(&b, "second", &["reports"]).await;

    let body = json!({ "agent": first.id, "reason": "one", "revoke_older_sessions": true });
    let one = b
        .post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    let out = b
        .cli(
            &[
                "revoke",
                "--agent",
                &second.id,
                "--reason",
                "two",
                "--revoke-older-sessions",
            ],
            Some(&b.ops.secops),
        )
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let reports = role_arn("reports");
    assert!(
        stderr.contains(&format!(
            "fenced {reports} (aws `keygate-fence-{}`",
            second.id
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "fenced {reports} (aws `keygate-revoke-older-sessions`"
        )),
        "{stderr}"
    );
    let two: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(two["fences"].as_array().unwrap().len(), 2, "{two}");

    // Both revocations fenced older sessions of `reports`: one policy, two
    // fences. Lifting the first keeps the policy for the second.
    let older = |r: &Value| {
        fence(r, "reports", "keygate-revoke-older-sessions")["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let reason = json!({ "reason": "incident closed" });
    b.post(
        &format!("/v1/fences/{}/lift", older(&one)),
        Some(&b.ops.admin),
        &reason,
    )
    .await
    .expect(200);
    assert!(
        moto.role_policy("reports", "keygate-revoke-older-sessions")
            .await
            .is_some()
    );
    let out = b
        .cli(
            &[
                "fences",
                "lift",
                &older(&two),
                "--reason",
                "incident closed",
            ],
            Some(&b.ops.secops),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        moto.role_policy("reports", "keygate-revoke-older-sessions")
            .await
            .is_none()
    );
    let out = b
        .cli(&["fences", "list", "--active"], Some(&b.ops.auditor))
        .await;
    let standing: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = standing
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            format!("keygate-fence-{}", first.id),
            format!("keygate-fence-{}", second.id)
        ]
    );

    // Fences page like every list: one a page says more follow, `--all`
    // walks every page, oldest first, each fence once.
    let every = b.get("/v1/fences", Some(&b.ops.auditor)).await.expect(200);
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&every).len(), 4, "{every}");
    let out = b
        .cli(&["fences", "list", "--limit", "1"], Some(&b.ops.auditor))
        .await;
    let one_page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&one_page), ids(&every)[..1]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("more rows follow"));
    let out = b
        .cli(
            &["fences", "list", "--limit", "1", "--all"],
            Some(&b.ops.auditor),
        )
        .await;
    let walked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&walked), ids(&every));
}
