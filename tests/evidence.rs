//! The auditor's evidence pack through the real server and the CLI: the
//! period's five items, the manifest, and `evidence verify` tracing every
//! record to the audit log (and failing on a changed file, a forged record
//! or an altered audit row).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker};
use serde_json::{Value, json};

const PROVISIONING: &str = "[provisioning]\nrequire_approval = true\napprovals = 1\n";

/// Today's evidence pack, written by `keygate evidence` as the auditor into
/// the broker's dir: its folder.
async fn todays_pack(b: &TestBroker) -> std::path::PathBuf {
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let out = b.dir.join("pack");
    let run = b
        .cli(
            &[
                "evidence",
                "--from",
                &today,
                "--to",
                &today,
                "--out",
                out.to_str().unwrap(),
            ],
            Some(&b.ops.auditor),
        )
        .await;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

#[tokio::test]
async fn the_evidence_pack_holds_the_periods_records_and_verifies_against_the_audit_log() {
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
    let register = |agent: &TestAgent| {
        let b = &b;
        let spec = agent.spec("platform");
        async move {
            let held = b.admin_post("/v1/agents", &spec).await.expect(202);
            held["approval"]["id"].as_str().unwrap().to_owned()
        }
    };
    let worker = TestAgent::new("worker", "ES256");
    approve(register(&worker).await).await;
    let s = b.token(&worker).await;
    b.x509(&s.token, Some(300)).await;
    b.jwt_svid(&s.token, Some(300)).await;
    b.complete(&s.token).await.expect(200);
    let retired = TestAgent::new("retired", "ES256");
    approve(register(&retired).await).await;
    let rs = b.token(&retired).await;
    b.x509(&rs.token, Some(300)).await;
    b.admin_post(
        &format!("/v1/agents/{}/decommission", retired.id),
        &json!({ "reason": "project ended" }),
    )
    .await
    .expect(200);
    common::eventually("the retired agent's lease revoked", || async {
        let l = b.leases(&format!("agent={}", retired.id)).await;
        l.iter().all(|l| l["state"] == "revoked").then_some(())
    })
    .await;

    // The worker changes team (an identity change: approved first). Its
    // new owner must review it: an `ownership_changed` issue until an
    // admin records the review.
    let patch = |body: Value| {
        let b = &b;
        let path = format!("/v1/agents/{}", worker.id);
        async move {
            b.call(
                reqwest::Method::PATCH,
                &path,
                Some(&b.ops.admin),
                Some(&body),
            )
            .await
        }
    };
    let held = patch(json!({ "team": "research" })).await.expect(202);
    approve(held["approval"]["id"].as_str().unwrap().to_owned()).await;
    let compliance = b
        .admin_get(&format!("/v1/agents/{}/compliance", worker.id))
        .await;
    let issue = common::governance::issue(&compliance, "ownership_changed")
        .unwrap_or_else(|| panic!("{compliance}"));
    assert!(
        issue["detail"]
            .as_str()
            .unwrap()
            .contains("the new owner reviews it by"),
        "{issue}"
    );
    // Per-scope usage names where the credentials were asked from.
    let scopes = compliance["permitted_scopes"].as_array().unwrap();
    let used: Vec<&Value> = scopes.iter().filter(|s| s["credentials"] != 0).collect();
    assert!(!used.is_empty(), "{compliance}");
    for s in used {
        assert_eq!(s["sources"], json!(["127.0.0.1"]), "{compliance}");
    }
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    // A review does not come with the change it reviews (it would certify
    // itself), nor from the future.
    let r = patch(json!({ "sponsor": "someone@keygate.test", "last_review_at": now })).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("new owner's review"), "{}", r.text);
    let r = patch(json!({ "last_review_at": "2999-01-01T00:00:00Z" })).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("future"), "{}", r.text);
    // Nor the previous owner's review, dated before the move.
    let r = patch(json!({ "last_review_at": "2020-01-01T00:00:00Z" })).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text
            .contains("before the agent's team or sponsor changed"),
        "{}",
        r.text
    );
    // A review from the future is refused at registration too.
    let late = common::TestAgent::new("rv-from-the-future", "ES256");
    let mut spec = late.spec("platform");
    spec["last_review_at"] = json!("2999-01-01T00:00:00Z");
    let r = b.admin_post("/v1/agents", &spec).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("future"), "{}", r.text);
    patch(json!({ "last_review_at": now })).await.expect(200);
    let compliance = b
        .admin_get(&format!("/v1/agents/{}/compliance", worker.id))
        .await;
    assert!(
        common::governance::issue(&compliance, "ownership_changed").is_none(),
        "{compliance}"
    );

    let out = todays_pack(&b).await;
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out.join(name)).unwrap()).unwrap()
    };
    let registry = read("registry.json");
    let ids: Vec<&str> = registry
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["agent"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{registry}");
    let provisioning = read("provisioning.json");
    let approved: Vec<&Value> = provisioning
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] == "approved")
        .collect();
    // Two registrations and the worker's change of team.
    assert_eq!(approved.len(), 3, "{provisioning}");
    assert!(
        approved.iter().all(|p| p["approved_by"] != ""),
        "{provisioning}"
    );
    let credentials = read("credentials.json");
    let mine = credentials
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["agent"] == worker.id.as_str())
        .count();
    assert_eq!(mine, 2, "{credentials}");
    let deprovisioning = read("deprovisioning.json");
    assert_eq!(
        deprovisioning.as_array().unwrap().len(),
        2,
        "{deprovisioning}"
    );
    let retirement = &deprovisioning[0];
    assert_eq!(retirement["agent"], retired.id.as_str());
    assert_eq!(retirement["kind"], "retired");
    assert_eq!(retirement["fully_revoked"], true);
    assert_eq!(retirement["trigger"], "project ended");
    assert_eq!(
        (&retirement["credentials"], &retirement["credentials_ended"]),
        (&json!(1), &json!(1)),
        "{retirement}"
    );
    assert_eq!(retirement["within_deadline"], true, "{retirement}");
    assert!(retirement["done_at"].as_str().unwrap() <= retirement["deadline"].as_str().unwrap());
    let change = &deprovisioning[1];
    assert_eq!(
        (&change["agent"], &change["kind"], &change["trigger"]),
        (
            &json!(worker.id),
            &json!("ownership_change"),
            &json!("team platform -> research")
        ),
        "{change}"
    );
    assert_eq!(change["within_deadline"], true, "{change}");
    assert_eq!(change["fully_revoked"], Value::Null, "{change}");
    let csv = std::fs::read_to_string(out.join("credentials.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "a header and three rows: {csv}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg"), "a chart");
    for external in ["src=", "href=", "<link", "<script", "url("] {
        assert!(!html.contains(external), "self-contained, yet `{external}`");
    }

    // Verified: the files against the manifest, the head against the log.
    let verify = |args: Vec<String>| {
        let b = &b;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            b.cli(&args, None).await
        }
    };
    let pack = out.to_str().unwrap().to_owned();
    let mut with_db = vec!["evidence".into(), "verify".into(), pack.clone()];
    with_db.extend(b.store_args());
    let ok = verify(with_db.clone()).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let said = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(said.contains("is in it"), "{said}");
    assert!(
        said.contains("every record traced to the audit log"),
        "{said}"
    );

    // A record the log does not hold fails the trace, even with the
    // manifest rewritten to match: one lease's scope is forged.
    let forged_path = out.join("credentials.json");
    let original_json = std::fs::read(&forged_path).unwrap();
    let mut forged: Value = serde_json::from_slice(&original_json).unwrap();
    forged[0]["scope"] = json!("payments-ca");
    let forged_bytes = serde_json::to_vec_pretty(&forged).unwrap();
    std::fs::write(&forged_path, &forged_bytes).unwrap();
    let manifest_path = out.join("manifest.json");
    let original_manifest = std::fs::read(&manifest_path).unwrap();
    let mut manifest: Value = serde_json::from_slice(&original_manifest).unwrap();
    manifest["files"]["credentials.json"] = json!(common::config::sha256_hex(
        std::str::from_utf8(&forged_bytes).unwrap()
    ));
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let files_only = verify(vec!["evidence".into(), "verify".into(), pack.clone()]).await;
    assert!(
        files_only.status.success(),
        "the manifest alone cannot tell"
    );
    let traced = verify(with_db.clone()).await;
    assert!(!traced.status.success());
    let err = String::from_utf8_lossy(&traced.stderr);
    assert!(
        err.contains("credentials.json: lease")
            && err.contains("has no matching `lease.issued` event"),
        "{err}"
    );
    std::fs::write(&forged_path, original_json).unwrap();
    std::fs::write(&manifest_path, original_manifest).unwrap();

    // One altered file fails the check.
    let original = std::fs::read(out.join("registry.csv")).unwrap();
    std::fs::write(out.join("registry.csv"), b"agent\nsomeone-else\n").unwrap();
    let bad = verify(vec!["evidence".into(), "verify".into(), pack.clone()]).await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("`registry.csv` was changed"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    std::fs::write(out.join("registry.csv"), original).unwrap();

    // One altered audit row fails it too (someone with the file drops the
    // append-only trigger first).
    b.lift_audit_guards().await;
    b.store_exec(
        "UPDATE audit_events SET reason = 'rewritten' WHERE seq = 2",
        &[],
    )
    .await
    .unwrap();
    let bad = verify(with_db).await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("audit chain broken at event 2"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// An ownership change the new owner answers by retiring the agent is
/// handled in time, as one answered by a review is.
#[tokio::test]
async fn an_ownership_change_answered_by_retiring_the_agent_is_in_time() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let moved = TestAgent::new("moved-then-retired", "ES256");
    b.register(&moved, "platform").await;
    b.call(
        reqwest::Method::PATCH,
        &format!("/v1/agents/{}", moved.id),
        Some(&b.ops.admin),
        Some(&json!({ "team": "research" })),
    )
    .await
    .expect(200);
    b.admin_post(
        &format!("/v1/agents/{}/decommission", moved.id),
        &json!({ "reason": "the new team does not need it" }),
    )
    .await
    .expect(200);
    let out = todays_pack(&b).await;
    let records: Value =
        serde_json::from_slice(&std::fs::read(out.join("deprovisioning.json")).unwrap()).unwrap();
    let change = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "ownership_change")
        .unwrap_or_else(|| panic!("{records}"));
    assert_eq!(change["within_deadline"], true, "{change}");
    assert!(change["done_at"].is_string(), "{change}");
}
