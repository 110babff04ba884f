//! Fences by session: STS sessions cannot be revoked one by one, so what a
//! policy change, an exclusion, a kill switch by another provider or the end
//! of a delegating task revokes is fenced session by session (by the task id as session name), not the
//! agent's every session; such fences lift themselves once those sessions
//! have expired. As in `aws_fences.rs`, the policies Keygate writes are
//! checked, never that AWS would deny a call with them.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::aws::{Moto, role_arn};
use common::{TestAgent, TestBroker};
use serde_json::{Value, json};

use super::aws_fences::{deny_condition, scopes, with_sessions, with_sessions_in};

/// The policy set `test-permit-aws.cedar` becomes on reload: `reports` is
/// no longer permitted to anyone.
const WITHOUT_REPORTS: &str = r#"
@id("test-permit-aws")
permit (
  principal,
  action == Keygate::Action::"request_credential",
  resource
)
when { resource.provider == "aws" && !resource.sensitive && resource != Keygate::Scope::"reports" };
"#;

/// A kill switch by one provider ends whole tasks, so it revokes their
/// leases of other providers too; an STS session among them, which AWS
/// cannot revoke, is fenced by session, as a policy change's is.
#[tokio::test]
async fn a_kill_switch_by_provider_fences_the_sts_sessions_of_the_tasks_it_ends() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    moto.create_role("billing").await;
    let x509 = "[[scopes]]\nname = \"x509-svid\"\nprovider = \"ca\"\nmax_ttl_secs = 3600\nparams = { kind = \"x509_svid\" }\n";
    let mut setup = moto.setup(&format!("{}\n{x509}", scopes()));
    setup.policies.push(common::config::permit_provider("ca"));
    let b = TestBroker::start_with(setup).await;
    let (agent, token, leases) = with_sessions(&b, "mixed", &["reports"]).await;
    b.x509(&token, Some(600)).await;
    let all = b.admin_get("/v1/leases").await;
    let task = all
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == leases[0].as_str())
        .unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rv = b
        .post(
            "/v1/revocations",
            Some(&b.ops.secops),
            &json!({ "provider": "ca", "reason": "ca rotation" }),
        )
        .await
        .expect(200);
    let name = format!("keygate-revoked-sessions-{}", agent.id);
    let fences = standing(&b, "reports", &name).await;
    assert_eq!(fences.len(), 1, "{fences:?} {rv}");
    assert_eq!(
        fences[0]["revocation_id"], rv["revocation_id"],
        "{fences:?}"
    );
    let doc = moto.role_policy("reports", &name).await.unwrap();
    let cond = deny_condition(&doc);
    assert_eq!(
        cond["StringEquals"]["aws:SourceIdentity"],
        agent.id.as_str()
    );
    assert_eq!(
        cond["StringLike"]["aws:userid"],
        json!([format!("*:{task}")])
    );
    // The role the task never used is left alone.
    assert!(moto.role_policy("billing", &name).await.is_none());

    // A delegated task below one the kill switch hits ends with it: its
    // STS session is fenced too, however the top ended (a kill switch by
    // provider, by its agent, its suspension).
    let (_, sub) = delegated_session(&b, "by-provider").await;
    b.post(
        "/v1/revocations",
        Some(&b.ops.secops),
        &json!({ "provider": "ca", "reason": "ca rotation again" }),
    )
    .await
    .expect(200);
    fenced_below(&b, &moto, &sub).await;
    let (orch, sub) = delegated_session(&b, "by-agent").await;
    b.post(
        "/v1/revocations",
        Some(&b.ops.secops),
        &json!({ "agent": orch.id, "reason": "orchestrator compromised" }),
    )
    .await
    .expect(200);
    fenced_below(&b, &moto, &sub).await;
    let (orch, sub) = delegated_session(&b, "suspended").await;
    b.admin_post(
        &format!("/v1/agents/{}/suspend", orch.id),
        &json!({ "reason": "orchestrator compromised" }),
    )
    .await
    .expect(200);
    fenced_below(&b, &moto, &sub).await;
}

/// An orchestrator holding an X.509-SVID whose sub-agent holds an STS
/// session of `reports` in a delegated task: (orchestrator, sub-agent).
async fn delegated_session(b: &TestBroker, prefix: &str) -> (TestAgent, TestAgent) {
    let orch = TestAgent::new(&format!("orch-{prefix}"), "ES256");
    let sub = TestAgent::new(&format!("sub-{prefix}"), "ES256");
    b.register(&sub, "platform").await;
    let mut spec = orch.spec("platform");
    spec["delegation"] = json!({ "max_depth": 1, "targets": [sub.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let parent = b.token_ttl(&orch, Some(3600)).await;
    b.x509(&parent.token, Some(600)).await;
    let child = b
        .exchange(&parent.token, &sub, Some("reports"), Some(1800))
        .await;
    assert_eq!(child.status, 200, "{}", child.text);
    let child_token = child.json()["access_token"].as_str().unwrap().to_owned();
    b.credential(&child_token, "reports", Some(900), None)
        .await
        .expect(201);
    (orch, sub)
}

/// `sub`'s sessions of `reports` are fenced, in Keygate and on the role.
async fn fenced_below(b: &TestBroker, moto: &Moto, sub: &TestAgent) {
    let name = format!("keygate-revoked-sessions-{}", sub.id);
    assert_eq!(standing(b, "reports", &name).await.len(), 1, "{}", sub.id);
    assert!(moto.role_policy("reports", &name).await.is_some());
}

/// The fences standing on `role` named `name`.
async fn standing(b: &TestBroker, role: &str, name: &str) -> Vec<Value> {
    b.admin_get("/v1/fences?active=true")
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["target"] == role_arn(role) && f["name"] == name)
        .cloned()
        .collect()
}

/// STS sessions cannot be revoked one by one, so a reload that stops
/// permitting a scope fences exactly the revoked sessions (by session
/// name, which is the task id), per agent and role, leaves every other
/// session alone, and the fence lifts itself once those sessions expire.
/// An exclusion does the same.
#[tokio::test]
async fn a_policy_change_fences_exactly_the_sessions_it_revoked_until_they_expire() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    moto.create_role("billing").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    // Not the platform team, which the shipped `aws.cedar` lets reach
    // every AWS scope.
    let (red, red_token, red_leases) =
        with_sessions_in(&b, "research", "red", &["reports", "billing"]).await;
    let (blue, _, blue_leases) = with_sessions_in(&b, "research", "blue", &["reports"]).await;
    let leases = b.admin_get("/v1/leases").await;
    let lease = |id: &str| {
        leases
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == id)
            .unwrap()
            .clone()
    };
    let task_of = |id: &str| lease(id)["task_id"].as_str().unwrap().to_owned();
    let (red_task, blue_task) = (task_of(&red_leases[0]), task_of(&blue_leases[0]));

    std::fs::write(
        b.dir.join("policies/test-permit-aws.cedar"),
        WITHOUT_REPORTS,
    )
    .unwrap();
    let reload = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(200);
    assert_eq!(reload["revoked"].as_array().unwrap().len(), 2, "{reload}");
    let hash = reload["to_hash"].as_str().unwrap()[..12].to_owned();

    for (agent, task) in [(&red.id, &red_task), (&blue.id, &blue_task)] {
        let name = format!("keygate-revoked-sessions-{agent}");
        let fences = standing(&b, "reports", &name).await;
        assert_eq!(fences.len(), 1, "{fences:?}");
        assert_eq!(fences[0]["revocation_id"], format!("policy-{hash}"));
        assert_eq!(fences[0]["agent"], agent.as_str());
        assert!(fences[0]["expires_at"].is_string(), "{fences:?}");
        let doc = moto.role_policy("reports", &name).await.unwrap();
        let cond = deny_condition(&doc);
        assert_eq!(cond["StringEquals"]["aws:SourceIdentity"], agent.as_str());
        assert_eq!(
            cond["StringLike"]["aws:userid"],
            json!([format!("*:{task}")])
        );
    }
    // Nothing fenced where nothing was revoked; the kill switch's fence
    // name is not used.
    let red_billing = format!("keygate-revoked-sessions-{}", red.id);
    assert!(moto.role_policy("billing", &red_billing).await.is_none());
    assert!(
        moto.role_policy("reports", &format!("keygate-fence-{}", red.id))
            .await
            .is_none()
    );
    let leases = b.admin_get("/v1/leases").await;
    let state = |id: &str| {
        leases
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == id)
            .map(|l| l["state"].clone())
    };
    assert_eq!(state(&red_leases[1]), Some(json!("active")), "{leases}");
    assert_eq!(state(&red_leases[0]), Some(json!("expiring")), "{leases}");

    // An exclusion of `billing` fences red's billing session too.
    b.post(
        &format!("/v1/agents/{}/exclusions", red.id),
        Some(&b.ops.admin),
        &json!({ "scope": "billing", "reason": "unused" }),
    )
    .await
    .expect(200);
    let fences = standing(&b, "billing", &red_billing).await;
    assert_eq!(fences.len(), 1, "{fences:?}");
    assert_eq!(fences[0]["revocation_id"], "exclusion");
    // The exclusion holds for new requests too.
    b.credential(&red_token, "billing", Some(900), None)
        .await
        .expect(403);

    // Once red's reports session has expired the fence is moot: Keygate
    // lifts it (here, its expiry is moved back in the store) and audits
    // that; blue's stands.
    let red_reports = format!("keygate-revoked-sessions-{}", red.id);
    let id = standing(&b, "reports", &red_reports).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id: &'static str = Box::leak(id.into_boxed_str());
    common::governance::exec(&b, "UPDATE fences SET expires_at = 1 WHERE id = ?", &[id]).await;
    // The provider's policy goes first, then the record: wait for the record.
    let lifted = common::eventually("the moot fence is lifted", || async {
        b.admin_get("/v1/fences")
            .await
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id && f["lifted_at"].is_string())
            .cloned()
    })
    .await;
    assert!(moto.role_policy("reports", &red_reports).await.is_none());
    assert_eq!(lifted["lifted_by"], "keygate", "{lifted}");
    let blue_reports = format!("keygate-revoked-sessions-{}", blue.id);
    assert!(moto.role_policy("reports", &blue_reports).await.is_some());
    let audit = b.audit("action=fence.lifted").await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["actor"], "system", "{audit:?}");

    // Suspending blue fences its still-living session again: two fences,
    // one policy. The policy change's going moot keeps the suspension's.
    b.post(
        &format!("/v1/agents/{}/suspend", blue.id),
        Some(&b.ops.secops),
        &json!({ "reason": "incident" }),
    )
    .await
    .expect(200);
    let twins = standing(&b, "reports", &blue_reports).await;
    let causes: Vec<&str> = twins
        .iter()
        .map(|f| f["revocation_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        [format!("policy-{hash}").as_str(), "agent-suspended"]
    );
    let id: &'static str = Box::leak(twins[0]["id"].as_str().unwrap().to_owned().into_boxed_str());
    common::governance::exec(&b, "UPDATE fences SET expires_at = 1 WHERE id = ?", &[id]).await;
    common::eventually("the policy change's fence is lifted", || async {
        (standing(&b, "reports", &blue_reports).await.len() == 1).then_some(())
    })
    .await;
    let doc = moto.role_policy("reports", &blue_reports).await.unwrap();
    assert_eq!(
        deny_condition(&doc)["StringLike"]["aws:userid"],
        json!([format!("*:{blue_task}")])
    );
}
