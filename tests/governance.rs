//! Governance through the real server: lifecycle policies find dormant,
//! unreviewed and over-privileged agents and act on time without an
//! operator; the maturity score places agents built for each level. A
//! quarter passes in seconds by moving the agents' dates back in the store
//! (never a sleep), then asking for a sweep (`POST /v1/governance/sweep`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::governance::{compliance, sweep};
use common::{Setup, TestAgent, TestBroker};
use serde_json::{Value, json};

const PROVISIONING: &str = "[provisioning]\nrequire_approval = true\napprovals = 1\n";
const DAY: i64 = 86_400;

/// Moves an agent's registration and last authentication back in time.
async fn age(b: &TestBroker, agent: &str, created_days_ago: i64, used_days_ago: Option<i64>) {
    let now = common::unix_now();
    let created = (now - created_days_ago * DAY).to_string();
    let done = match used_days_ago {
        Some(d) => {
            let used = (now - d * DAY).to_string();
            b.store_exec(
                "UPDATE agents SET created_at = ?, last_used_at = ? WHERE id = ?",
                &[&created, &used, agent],
            )
            .await
        }
        None => {
            b.store_exec(
                "UPDATE agents SET created_at = ?, last_used_at = NULL WHERE id = ?",
                &[&created, agent],
            )
            .await
        }
    };
    done.unwrap();
}

async fn status(b: &TestBroker, agent: &str) -> String {
    b.admin_get(&format!("/v1/agents/{agent}")).await["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn kinds(c: &Value) -> Vec<String> {
    c["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_dormant_agent_is_flagged_then_suspended_and_a_resume_is_respected() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let agent = TestAgent::new("dormant", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;

    // 61 days without authentication: flagged, not yet acted on.
    age(&b, &agent.id, 70, Some(61)).await;
    let r = sweep(&b).await;
    let opened: Vec<&str> = r["opened"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["agent_id"] == agent.id.as_str())
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert!(opened.contains(&"dormant"), "{r}");
    let c = compliance(&b, &agent.id).await;
    let dormant = c["issues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "dormant")
        .unwrap()
        .clone();
    assert_eq!(dormant["action"], "suspend", "{c}");
    assert_eq!(c["status"], "active");
    assert_eq!(c["lifecycle"]["name"], "default");
    // A second sweep opens nothing new: one finding per issue.
    let again = sweep(&b).await;
    assert!(
        !again["opened"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["agent_id"] == agent.id.as_str()),
        "{again}"
    );

    // Past the 14-day grace: suspended by the sweep, its session refused.
    age(&b, &agent.id, 90, Some(76)).await;
    let r = sweep(&b).await;
    assert!(
        r["acted"]
            .as_array()
            .unwrap()
            .contains(&json!([agent.id, "suspend"])),
        "{r}"
    );
    assert_eq!(status(&b, &agent.id).await, "suspended");
    let refused = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
    let ev = b.audit("action=governance.action").await;
    let ev = ev.iter().find(|e| e["agent"] == agent.id.as_str()).unwrap();
    assert_eq!(ev["actor"], "system", "{ev}");
    assert!(ev["reason"].as_str().unwrap().contains("dormant"), "{ev}");

    // An admin's resume stands: the acted-on finding does not suspend again.
    b.admin_post(
        &format!("/v1/agents/{}/resume", agent.id),
        &json!({ "reason": "still needed; owner confirmed" }),
    )
    .await
    .expect(200);
    sweep(&b).await;
    assert_eq!(status(&b, &agent.id).await, "active");
    // Once it authenticates, the finding closes as resolved.
    b.token(&agent).await;
    let r = sweep(&b).await;
    let findings = b
        .get(
            &format!("/v1/findings?agent={}", agent.id),
            Some(&b.ops.auditor),
        )
        .await
        .expect(200);
    let dormant = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "dormant")
        .unwrap();
    assert!(dormant["acted_at"].is_string(), "{dormant}");
    assert_eq!(dormant["close_reason"], "resolved", "{dormant} {r}");
}

/// A dormant agent suspended by someone else before its deadline: the
/// sweep has carried nothing out, so nothing is recorded as done; resumed
/// while still dormant, the next sweep suspends it then.
#[tokio::test]
async fn a_lifecycle_action_someone_else_took_first_is_not_recorded_as_done() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let agent = TestAgent::new("dormant-too", "ES256");
    b.register(&agent, "platform").await;
    age(&b, &agent.id, 70, Some(61)).await;
    sweep(&b).await;
    b.admin_post(
        &format!("/v1/agents/{}/suspend", agent.id),
        &json!({ "reason": "incident" }),
    )
    .await
    .expect(200);
    age(&b, &agent.id, 90, Some(76)).await;
    let r = sweep(&b).await;
    assert!(
        !r["acted"].to_string().contains(&agent.id),
        "nothing was carried out: {r}"
    );
    let acted = |evs: Vec<Value>| evs.iter().any(|e| e["agent"] == agent.id.as_str());
    assert!(!acted(b.audit("action=governance.action").await));

    b.admin_post(
        &format!("/v1/agents/{}/resume", agent.id),
        &json!({ "reason": "incident closed" }),
    )
    .await
    .expect(200);
    let r = sweep(&b).await;
    assert!(
        r["acted"]
            .as_array()
            .unwrap()
            .contains(&json!([agent.id, "suspend"])),
        "{r}"
    );
    assert_eq!(status(&b, &agent.id).await, "suspended");
    assert!(acted(b.audit("action=governance.action").await));
}

#[tokio::test]
async fn lifecycle_policies_match_by_tier_and_decommission_when_configured() {
    let mut setup = Setup::permissive();
    setup.extra_config = r#"
[[lifecycle]]
name = "tier-2-strict"
match = { risk_tier = 2 }
dormant_after_days = 10
dormant_grace_days = 0
dormant_action = "decommission"

[[lifecycle]]
name = "dev-labelled"
match = { label = "suite=other" }
"#
    .into();
    let b = TestBroker::start_with(setup).await;
    let agent = TestAgent::new("strict", "ES256");
    b.register(&agent, "platform").await;
    let c = compliance(&b, &agent.id).await;
    assert_eq!(c["lifecycle"]["name"], "tier-2-strict", "{c}");
    assert_eq!(
        c["lifecycle"]["review_every_days"], 90,
        "defaults fill the rest"
    );
    age(&b, &agent.id, 20, Some(11)).await;
    sweep(&b).await;
    assert_eq!(status(&b, &agent.id).await, "decommissioned");
    let c = compliance(&b, &agent.id).await;
    assert!(
        kinds(&c).is_empty(),
        "a decommissioned agent has no issues: {c}"
    );
    // Its findings close on the next sweep: nothing is left to fix.
    sweep(&b).await;
    let open = b
        .get(
            &format!("/v1/findings?agent={}&open=true", agent.id),
            Some(&b.ops.auditor),
        )
        .await
        .expect(200);
    assert_eq!(open, json!([]), "{open}");

    // A bad policy is refused at start with a message that names it.
    let mut bad = Setup::permissive();
    bad.extra_config = "[[lifecycle]]\nname = \"x\"\nreview_every_days = 0\n".into();
    let err = common::start_refused(bad).await;
    assert!(
        err.contains("`[[lifecycle]]` `x`: `review_every_days`"),
        "{err}"
    );
}

#[tokio::test]
async fn maturity_places_agents_built_for_each_level() {
    let mut setup = Setup::permissive();
    setup.extra_config = PROVISIONING.into();
    let b = TestBroker::start_with(setup).await;
    let approve = |id: String| {
        let b = &b;
        async move {
            b.post(
                &format!("/v1/approvals/{id}/decision"),
                Some(&b.ops.approver),
                &json!({ "decision": "approve", "reason": "checked" }),
            )
            .await
            .expect(200);
        }
    };
    let register = |agent: &TestAgent, spec: Value| {
        let b = &b;
        let id = agent.id.clone();
        async move {
            let held = b.admin_post("/v1/agents", &spec).await.expect(202);
            assert_eq!(held["agent"]["id"], id.as_str());
            held["approval"]["id"].as_str().unwrap().to_owned()
        }
    };

    // Optimizing: approved, fresh, short-lived scopes only (x509 ≤ 3600 s).
    let opt = TestAgent::new("optimizing", "ES256");
    approve(register(&opt, opt.spec("platform")).await).await;
    // Managed: a reachable scope unused for 40 days.
    let managed = TestAgent::new("managed", "ES256");
    approve(register(&managed, managed.spec("platform")).await).await;
    age(&b, &managed.id, 40, Some(1)).await;
    // Defined: its quarterly review is overdue.
    let defined = TestAgent::new("defined", "ES256");
    approve(register(&defined, defined.spec("platform")).await).await;
    age(&b, &defined.id, 100, Some(1)).await;
    // Developing: active without a granted provisioning approval (as an
    // agent registered before the two-person rule was turned on).
    let developing = TestAgent::new("developing", "ES256");
    let id = register(&developing, developing.spec("platform")).await;
    approve(id.clone()).await;
    b.store_exec(
        "UPDATE approvals SET state = 'expired' WHERE id = ?",
        &[&id],
    )
    .await
    .unwrap();
    // Initial: two agents registered with one key — neither is a distinct
    // identity.
    let initial = TestAgent::new("initial", "ES256");
    approve(register(&initial, initial.spec("platform")).await).await;
    let twin = TestAgent::new("twin", "ES256");
    let mut spec = twin.spec("platform");
    spec["jwks"] = json!({ "keys": [initial.jwk] });
    approve(register(&twin, spec).await).await;

    let m = b
        .get("/v1/maturity", Some(&b.ops.auditor))
        .await
        .expect(200);
    let level = |id: &str| {
        m["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {m}"))
            .clone()
    };
    for (agent, want, failing) in [
        (&opt, "optimizing", None),
        (&managed, "managed", Some("least_privilege")),
        (&defined, "defined", Some("reviewed_on_time")),
        (&developing, "developing", Some("approved_provisioning")),
        (&initial, "initial", Some("own_identity")),
        (&twin, "initial", Some("own_identity")),
    ] {
        let got = level(&agent.id);
        assert_eq!(got["level"], want, "{}: {got}", agent.id);
        if let Some(f) = failing {
            assert!(
                got["failing"].as_array().unwrap().contains(&json!(f)),
                "{}: {got}",
                agent.id
            );
        }
    }
    assert_eq!(
        m["level"], "initial",
        "the estate is its weakest agent: {m}"
    );
    assert_eq!(m["counts"]["optimizing"], 1, "{m}");

    // The same in the CLI and in /metrics (gauges set by the last sweep).
    let out = b.cli(&["maturity"], Some(&b.ops.auditor)).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("overall: initial"));
    let out = b
        .cli(&["agents", "compliance", &initial.id], Some(&b.ops.auditor))
        .await;
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(kinds(&c).contains(&"shared_identity".to_owned()), "{c}");
    // Seed 000's registry table, as CSV and JSON.
    let out = b
        .cli(
            &["agents", "export", "--format", "csv"],
            Some(&b.ops.auditor),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8_lossy(&out.stdout).into_owned();
    let header = csv.lines().next().unwrap();
    for column in [
        "agent",
        "team",
        "sponsor",
        "permitted_scopes",
        "credential_types",
        "max_ttl_secs",
        "last_review_at",
    ] {
        assert!(header.split(',').any(|c| c == column), "{header}");
    }
    assert_eq!(csv.lines().count(), 1 + 6, "{csv}");
    let out = b
        .cli(
            &["agents", "export", "--format", "json"],
            Some(&b.ops.auditor),
        )
        .await;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows.iter().find(|r| r["agent"] == opt.id.as_str()).unwrap();
    assert_eq!(row["maturity"], "optimizing", "{row}");
    assert_eq!(row["credential_types"], "ca", "{row}");
    sweep(&b).await;
    let metrics = b
        .http
        .get(b.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("keygate_agents_by_maturity{level=\"optimizing\"} 1"),
        "{metrics}"
    );
}
