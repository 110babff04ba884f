//! Policy changes through the real server: a candidate set is previewed
//! (who gains and loses what, which live leases it would end), reloaded
//! without a restart (an invalid set is refused and changes nothing), and a
//! reload revokes exactly the live leases the new set no longer permits —
//! or, in `report` mode, only lists them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeMap;

use common::{Setup, TestAgent, TestBroker, eventually};
use serde_json::{Value, json};

/// The shipped `agents.cedar` with the platform team narrowed to JWT-SVIDs.
pub(crate) fn narrowed() -> String {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies/agents.cedar"),
    )
    .unwrap();
    let from = "  resource.provider == \"ca\" &&\n  !resource.sensitive &&";
    assert!(shipped.contains(from), "the shipped policy changed");
    shipped.replacen(
        from,
        "  resource == Keygate::Scope::\"jwt-svid\" &&\n  !resource.sensitive &&",
        1,
    )
}

pub(crate) fn policy_dir(b: &TestBroker) -> std::path::PathBuf {
    b.dir.join("policies")
}

pub(crate) async fn hash(b: &TestBroker) -> String {
    b.get("/v1/policy", Some(&b.ops.auditor)).await.expect(200)["hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A platform agent with a live X.509-SVID and a live JWT-SVID; the
/// certificate, and the two lease ids.
async fn platform_with_leases(
    b: &TestBroker,
) -> (TestAgent, common::Session, String, String, String) {
    let agent = TestAgent::new("reload", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let x509 = b.x509(&s.token, Some(600)).await;
    let jwt = b.jwt_svid(&s.token, Some(600)).await;
    let id = |v: &Value| v["lease_id"].as_str().unwrap().to_owned();
    let cert = x509["credential"]["certificate"]
        .as_str()
        .unwrap()
        .to_owned();
    (agent, s, cert, id(&x509), id(&jwt))
}

#[tokio::test]
async fn a_reload_revokes_what_the_new_set_no_longer_permits_and_nothing_else() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, s, cert, x509, jwt) = platform_with_leases(&b).await;
    let before = hash(&b).await;

    // Preview: the platform agent loses x509-svid; its X.509 lease would end.
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(policy_dir(&b)).unwrap() {
        let p = entry.unwrap().path();
        files.insert(
            p.file_name().unwrap().to_string_lossy().into_owned(),
            std::fs::read_to_string(&p).unwrap(),
        );
    }
    files.insert("agents.cedar".into(), narrowed());
    let diff = b
        .post(
            "/v1/policy/diff",
            Some(&b.ops.admin),
            &json!({ "files": files }),
        )
        .await
        .expect(200);
    let mine = diff["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent.id.as_str())
        .unwrap_or_else(|| panic!("{diff}"));
    assert_eq!(mine["lost"], json!(["x509-svid"]), "{diff}");
    let ending: Vec<&str> = diff["leases_not_permitted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lease"].as_str().unwrap())
        .collect();
    assert_eq!(ending, [x509.as_str()], "{diff}");
    assert_eq!(hash(&b).await, before, "a diff changes nothing");
    assert_eq!(b.lease_state(&x509).await, "active");

    // A set with a syntax error is refused; nothing changes.
    std::fs::write(policy_dir(&b).join("broken.cedar"), "permit (principal,").unwrap();
    let r = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("nothing changed"), "{}", r.text);
    assert_eq!(hash(&b).await, before);
    std::fs::remove_file(policy_dir(&b).join("broken.cedar")).unwrap();

    // The reload: the X.509 lease is revoked (its serial on the CRL), the
    // JWT-SVID lease lives on, new X.509 requests are denied.
    std::fs::write(policy_dir(&b).join("agents.cedar"), narrowed()).unwrap();
    let out = b.cli(&["policy", "reload"], Some(&b.ops.admin)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["revoked"], json!([x509]), "{done}");
    assert_ne!(hash(&b).await, before);
    eventually("the x509 lease revoked", || async {
        (b.lease_state(&x509).await == "revoked").then_some(())
    })
    .await;
    assert_eq!(b.lease_state(&jwt).await, "active");
    let presented = b.verify(&json!({ "x509_svid": cert })).await;
    assert_eq!(
        presented["valid"], false,
        "the serial is on the CRL: {presented}"
    );
    let denied = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(denied.status, 403, "{}", denied.text);
    b.jwt_svid(&s.token, Some(60)).await;

    let ev = b.audit("action=policy.reloaded").await;
    let ev = ev.last().unwrap();
    assert_eq!(ev["actor"], "operator:test-admin", "{ev}");
    assert_eq!(ev["details"]["from_hash"], before.as_str());
    let ev = b.audit("action=lease.policy_revoked").await;
    assert!(ev.iter().any(|e| e["lease"] == x509.as_str()), "{ev:?}");
}

#[tokio::test]
async fn report_mode_lists_and_changes_nothing_and_sighup_reloads() {
    let mut b = TestBroker::prepare(Setup::default());
    let config = b.dir.join("keygate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[policy]\n", "[policy]\non_change = \"report\"\n", 1);
    std::fs::write(&config, text).unwrap();
    b.start_again().await;
    let (_, _, _, x509, _) = platform_with_leases(&b).await;
    let before = hash(&b).await;
    std::fs::write(policy_dir(&b).join("agents.cedar"), narrowed()).unwrap();
    let pid = b.pid();
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually("SIGHUP reloaded the set", || async {
        (hash(&b).await != before).then_some(())
    })
    .await;
    let ev = eventually("the reload audited", || async {
        b.audit("action=policy.reloaded").await.pop()
    })
    .await;
    assert_eq!(ev["actor"], "operator:sighup", "{ev}");
    assert_eq!(ev["details"]["on_change"], "report");
    assert_eq!(ev["details"]["leases_not_permitted"], 1, "{ev}");
    assert_eq!(
        b.lease_state(&x509).await,
        "active",
        "report mode revokes nothing"
    );
}

#[tokio::test]
async fn an_agent_moved_to_a_team_without_access_loses_what_it_holds() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, s, _, x509, jwt) = platform_with_leases(&b).await;
    let r = b
        .call(
            reqwest::Method::PATCH,
            &format!("/v1/agents/{}", agent.id),
            Some(&b.ops.admin),
            Some(&json!({ "team": "research" })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for lease in [&x509, &jwt] {
        eventually("the lease revoked", || async {
            (b.lease_state(lease).await == "revoked").then_some(())
        })
        .await;
    }
    let ev = b.audit("action=lease.policy_revoked").await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(
        ev[0]["reason"].as_str().unwrap().contains("changed"),
        "{ev:?}"
    );
    // It may reach nothing now: its task ended and its token is refused.
    let refused = b.credential(&s.token, "jwt-svid", Some(60), None).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
    let ev = b.audit("action=agent.tasks_ended_by_policy").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["details"]["tasks"], json!([s.task_id]), "{ev:?}");
}

/// A lease is judged on the ttl policy decided when it was issued, not on
/// its recorded expiry, which a backend's clock (up to 5 s) or a renewal may
/// have moved: a reload that changes nothing revokes nothing.
#[tokio::test]
async fn a_reload_judges_the_decided_ttl_not_the_moved_expiry() {
    let b = TestBroker::start_with(Setup::default()).await;
    let agent = TestAgent::new("tier3", "ES256");
    let mut spec = agent.spec("platform");
    spec["risk_tier"] = json!(3);
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let s = b.token_ttl(&agent, Some(3600)).await;
    // Tier 3: at most 900 s (guardrail `tier3-short-ttl`).
    let lease = b.jwt_svid(&s.token, Some(900)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.store_exec(
        "UPDATE leases SET expires_at = expires_at + 5 WHERE id = ?",
        &[&lease],
    )
    .await
    .unwrap();
    let done = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(200);
    assert_eq!(done["leases_not_permitted"], json!([]), "{done}");
    assert_eq!(b.lease_state(&lease).await, "active");
}

/// Lets the research team obtain JWT-SVIDs.
pub(crate) const RESEARCH_JWT: &str = r#"
@id("research-jwt")
permit (
  principal,
  action == Keygate::Action::"request_credential",
  resource == Keygate::Scope::"jwt-svid"
)
when { principal.team == "research" };
"#;

pub(crate) async fn approve(b: &TestBroker, id: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": "approve", "reason": "reviewed the diff" }),
    )
    .await
}

#[tokio::test]
async fn a_widening_reload_waits_for_provisioning_approval_and_a_stale_one_is_refused() {
    let b = TestBroker::start_with(Setup {
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
    let s = b.token(&agent).await;
    let before = hash(&b).await;
    let denied = b
        .credential(
            &s.token,
            "jwt-svid",
            Some(60),
            Some(json!({ "audience": common::JWT_AUDIENCE })),
        )
        .await;
    assert_eq!(denied.status, 403, "{}", denied.text);

    // The widening set waits: 202, the active set unchanged, still denied.
    std::fs::write(policy_dir(&b).join("research.cedar"), RESEARCH_JWT).unwrap();
    let r = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = r.json();
    let approval = r["held"]["id"].as_str().unwrap().to_owned();
    let why = r["held"]["justification"].as_str().unwrap();
    assert!(
        why.contains(&format!("{} gains jwt-svid", agent.id)),
        "{why}"
    );
    assert_eq!(hash(&b).await, before);
    let still = b
        .credential(
            &s.token,
            "jwt-svid",
            Some(60),
            Some(json!({ "audience": common::JWT_AUDIENCE })),
        )
        .await;
    assert_eq!(still.status, 403, "{}", still.text);
    // Asking again (a second SIGHUP) is the same approval, not another.
    let again = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(202);
    assert_eq!(again["held"]["id"], approval.as_str());

    // Approved: exactly that set becomes active, audited with the approval.
    approve(&b, &approval).await.expect(200);
    assert_ne!(hash(&b).await, before);
    b.jwt_svid(&s.token, Some(60)).await;
    let ev = b.audit("action=policy.reloaded").await;
    assert_eq!(
        ev.last().unwrap()["details"]["approval"],
        approval.as_str(),
        "{ev:?}"
    );

    // A narrowing reload is not held.
    std::fs::remove_file(policy_dir(&b).join("research.cedar")).unwrap();
    let narrowed_hash = {
        let r = b
            .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
            .await
            .expect(200);
        r["to_hash"].as_str().unwrap().to_owned()
    };
    assert_eq!(hash(&b).await, narrowed_hash);

    // A held set whose base moved on is refused when approved, and the
    // active set stays.
    std::fs::write(policy_dir(&b).join("research.cedar"), RESEARCH_JWT).unwrap();
    let stale = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(202)["held"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(
        policy_dir(&b).join("other.cedar"),
        "@id(\"nothing\")\nforbid (principal in Keygate::Team::\"nobody\", action == Keygate::Action::\"request_credential\", resource);\n",
    )
    .unwrap();
    std::fs::remove_file(policy_dir(&b).join("research.cedar")).unwrap();
    let moved = b
        .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(200)["to_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = approve(&b, &stale).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.text.contains("changed since it was asked"), "{}", r.text);
    assert_eq!(hash(&b).await, moved);
    let refused = b.admin_get(&format!("/v1/approvals/{stale}")).await;
    assert_eq!(refused["state"], "cancelled", "{refused}");
    let approved = b.audit("action=approval.approved").await;
    assert!(
        approved
            .iter()
            .all(|e| e["details"]["approval"] != stale.as_str()),
        "a set that did not apply was recorded approved: {approved:?}"
    );
}

#[tokio::test]
async fn a_risk_tier_raised_to_3_revokes_the_leases_the_tier_guardrail_forbids() {
    // The shipped guardrail: a tier-3 agent never holds a credential for
    // more than 15 minutes.
    let b = TestBroker::start_with(Setup::default()).await;
    let agent = TestAgent::new("tiered", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let long = b.x509(&s.token, Some(1800)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let short = b.x509(&s.token, Some(600)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.call(
        reqwest::Method::PATCH,
        &format!("/v1/agents/{}", agent.id),
        Some(&b.ops.admin),
        Some(&json!({ "risk_tier": 3 })),
    )
    .await
    .expect(200);
    eventually("the 30-minute lease revoked", || async {
        (b.lease_state(&long).await == "revoked").then_some(())
    })
    .await;
    assert_eq!(
        b.lease_state(&short).await,
        "active",
        "10 minutes is allowed"
    );
    let ev = b.audit("action=lease.policy_revoked").await;
    let leases: Vec<&str> = ev.iter().map(|e| e["lease"].as_str().unwrap()).collect();
    assert_eq!(leases, [long.as_str()], "{ev:?}");
    // New asks follow the guardrail, and say the ttl was the problem.
    let denied = b.credential(&s.token, "x509-svid", Some(1800), None).await;
    assert_eq!(denied.status, 403, "{}", denied.text);
    assert!(
        denied.text.contains("900 s is permitted"),
        "{}",
        denied.text
    );
}

#[tokio::test]
async fn a_diff_reports_what_a_time_conditioned_policy_grants_at_another_hour() {
    let b = TestBroker::start_with(Setup::default()).await;
    let agent = TestAgent::new("nightly", "ES256");
    b.register(&agent, "research").await;
    // Permitted only at an hour that is not now.
    let hour = (time::OffsetDateTime::now_utc().hour() + 6) % 24;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(policy_dir(&b)).unwrap() {
        let p = entry.unwrap().path();
        files.insert(
            p.file_name().unwrap().to_string_lossy().into_owned(),
            std::fs::read_to_string(&p).unwrap(),
        );
    }
    files.insert(
        "nightly.cedar".into(),
        format!(
            "@id(\"nightly-jwt\")\npermit (principal, action == Keygate::Action::\"request_credential\", resource == Keygate::Scope::\"jwt-svid\")\nwhen {{ principal.team == \"research\" && context.hour_utc == {hour} }};\n"
        ),
    );
    let diff = b
        .post(
            "/v1/policy/diff",
            Some(&b.ops.admin),
            &json!({ "files": files }),
        )
        .await
        .expect(200);
    let mine = diff["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent.id.as_str())
        .unwrap_or_else(|| panic!("the gain at {hour}:00 is reported now: {diff}"));
    assert_eq!(mine["gained"], json!(["jwt-svid"]), "{diff}");
}

/// Two sets, swapped back and forth while 32 clients ask for credentials:
/// every request gets an answer, and every decision is the one the set it
/// names (its `policy_hash`) gives — never a mix.
#[tokio::test]
async fn a_reload_under_load_loses_no_request_and_never_mixes_two_sets() {
    let b = std::sync::Arc::new(TestBroker::start_with(Setup::default()).await);
    let mut sessions = Vec::new();
    for i in 0..4 {
        let agent = TestAgent::new(&format!("loaded{i}"), "ES256");
        b.register(&agent, "platform").await;
        for _ in 0..8 {
            sessions.push(b.token_ttl(&agent, Some(3600)).await.token);
        }
    }
    let wide = hash(&b).await;
    let shipped = std::fs::read_to_string(policy_dir(&b).join("agents.cedar")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for token in sessions {
        let (b, stop) = (b.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = b.credential(&token, "x509-svid", Some(60), None).await;
                answers.push(r.status.as_u16());
                let params = json!({ "audience": common::JWT_AUDIENCE });
                let r = b
                    .credential(&token, "jwt-svid", Some(60), Some(params))
                    .await;
                answers.push(r.status.as_u16());
            }
            answers
        }));
    }
    let mut narrow_hash = String::new();
    for round in 0..4 {
        let text = if round % 2 == 0 {
            narrowed()
        } else {
            shipped.clone()
        };
        std::fs::write(policy_dir(&b).join("agents.cedar"), text).unwrap();
        let r = b
            .post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
            .await
            .expect(200);
        if round % 2 == 0 {
            narrow_hash = r["to_hash"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // End on the narrowed set.
    std::fs::write(policy_dir(&b).join("agents.cedar"), narrowed()).unwrap();
    b.post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for c in clients {
        for status in c.await.unwrap() {
            assert!(
                status == 201 || status == 403,
                "every request answered by a decision, got {status}"
            );
            sent += 1;
        }
    }
    let decided = b.audit("action=credential.requested").await;
    assert_eq!(decided.len(), sent, "one audited decision per request");
    let (mut under_wide, mut under_narrow) = (0, 0);
    for e in &decided {
        let h = e["policy_hash"].as_str().unwrap();
        let allow = e["decision"] == "allow";
        match (e["scope"].as_str().unwrap(), h) {
            ("jwt-svid", _) => assert!(allow, "{e}"),
            ("x509-svid", h) if h == wide => {
                under_wide += 1;
                assert!(allow, "the wide set allows x509: {e}");
            }
            ("x509-svid", h) if h == narrow_hash => {
                under_narrow += 1;
                assert!(!allow, "the narrow set denies x509: {e}");
            }
            other => panic!("a decision under an unknown set: {other:?} {e}"),
        }
    }
    assert!(
        under_wide > 0 && under_narrow > 0,
        "{under_wide} {under_narrow}"
    );
    // Whatever the wide set issued is gone under the narrow one.
    eventually("no live x509 lease under the narrowed set", || async {
        let live = b.leases("state=active&limit=10000").await;
        (!live.iter().any(|l| l["scope"] == "x509-svid")).then_some(())
    })
    .await;
}
