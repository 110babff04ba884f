//! A policy set held for provisioning approval stays held across a restart
//! of the broker: a start does not make the files on disk active when they
//! differ from the set active in the store, it reloads them as a reload
//! would (held if they widen, applied if they only narrow). Nor is it lost
//! or stretched by agents changing while it waits: granting the agent it
//! hangs on keeps it, and an agent that would gain what the approvers were
//! not shown has it asked again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker};
use serde_json::json;

use super::policy_reload::{RESEARCH_JWT, approve, hash, policy_dir};

async fn jwt_svid(b: &TestBroker, agent: &TestAgent) -> common::Resp {
    let s = b.token(agent).await;
    b.credential(
        &s.token,
        "jwt-svid",
        Some(60),
        Some(json!({ "audience": common::JWT_AUDIENCE })),
    )
    .await
}

async fn held_policy_approvals(b: &TestBroker) -> Vec<String> {
    b.admin_get("/v1/approvals?state=pending&kind=provisioning")
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["request"]["change"] == "policy")
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_held_widening_stays_held_across_a_restart_and_a_narrowing_applies() {
    let mut b = TestBroker::start_with(Setup {
        extra_config: "[provisioning]\nrequire_approval = true\napprovals = 1\n".into(),
        ..Setup::default()
    })
    .await;
    let agent = TestAgent::new("researcher", "ES256");
    let held = b
        .admin_post("/v1/agents", &agent.spec("research"))
        .await
        .expect(202);
    approve(&b, held["approval"]["id"].as_str().unwrap())
        .await
        .expect(200);
    let before = hash(&b).await;
    std::fs::write(policy_dir(&b).join("research.cedar"), RESEARCH_JWT).unwrap();
    let r = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let approval = r.json()["held"]["id"].as_str().unwrap().to_owned();

    // A crash and a start with the widened files still on disk: the broker
    // runs on the set that was active, and the same approval waits.
    b.restart().await;
    assert_eq!(hash(&b).await, before);
    let r = jwt_svid(&b, &agent).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(held_policy_approvals(&b).await, vec![approval.clone()]);

    // Granted: that set becomes active, and stays so across a restart.
    approve(&b, &approval).await.expect(200);
    let widened = hash(&b).await;
    assert_ne!(widened, before);
    jwt_svid(&b, &agent).await.expect(201);
    b.restart().await;
    assert_eq!(hash(&b).await, widened);
    jwt_svid(&b, &agent).await.expect(201);

    // A narrowing on disk needs nobody's approval: a start applies it.
    std::fs::remove_file(policy_dir(&b).join("research.cedar")).unwrap();
    b.restart().await;
    assert_ne!(hash(&b).await, widened);
    let r = jwt_svid(&b, &agent).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(held_policy_approvals(&b).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_held_set_survives_its_agents_grant_and_is_asked_again_when_it_would_widen_more() {
    let b = TestBroker::start_with(Setup {
        extra_config: "[provisioning]\nrequire_approval = true\napprovals = 1\n".into(),
        ..Setup::default()
    })
    .await;
    let register = |agent: &TestAgent| {
        let spec = agent.spec("research");
        let b = &b;
        async move {
            b.admin_post("/v1/agents", &spec).await.expect(202)["approval"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    // The set is held while the only agent it widens is still pending.
    let first = TestAgent::new("rx-first", "ES256");
    let registration = register(&first).await;
    std::fs::write(policy_dir(&b).join("research.cedar"), RESEARCH_JWT).unwrap();
    let r = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let set = r.json()["held"]["id"].as_str().unwrap().to_owned();
    // Granting the agent's registration leaves the set's approval waiting.
    approve(&b, &registration).await.expect(200);
    assert_eq!(held_policy_approvals(&b).await, vec![set.clone()]);

    // Another agent joins meanwhile: the set would widen it too.
    let late = TestAgent::new("rx-late", "ES256");
    let registration = register(&late).await;
    approve(&b, &registration).await.expect(200);
    let before = hash(&b).await;
    let r = approve(&b, &set).await;
    assert_eq!(r.status, 409, "{}", r.text);
    let unseen = format!("{} gains jwt-svid", late.id);
    assert!(r.text.contains(&unseen), "{}", r.text);
    assert_eq!(hash(&b).await, before);
    // Never recorded as approved: the set that could not apply is cancelled.
    let refused = b.admin_get(&format!("/v1/approvals/{set}")).await;
    assert_eq!(refused["state"], "cancelled", "{refused}");
    assert!(
        refused["end_reason"].as_str().unwrap().contains(&unseen),
        "{refused}"
    );
    assert_eq!(jwt_svid(&b, &late).await.status, 403);
    // Reloaded again: a new approval that shows both.
    let r = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let again = r.json()["held"].clone();
    let why = again["justification"].as_str().unwrap();
    for agent in [&first, &late] {
        assert!(why.contains(&format!("{} gains", agent.id)), "{why}");
    }
    let again = again["id"].as_str().unwrap().to_owned();
    assert_ne!(again, set);
    assert_eq!(held_policy_approvals(&b).await, vec![again.clone()]);
    approve(&b, &again).await.expect(200);
    jwt_svid(&b, &first).await.expect(201);
    jwt_svid(&b, &late).await.expect(201);
}
