//! Agents as code through the real server and CLI: `keygate plan` and
//! `keygate apply` over a folder of agent files (TOML and YAML, seed 001's
//! `agent_policy` block as written), compiled to Cedar.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};

use common::{Setup, TestAgent, TestBroker};
use serde_json::{Value, json};

const MAPPING: &str = r#"
[actions]
web_search = ["jwt-svid"]
document_retrieval = ["x509-svid"]
text_generation = []
payment_processing = ["payments-ca"]
user_data_modification = []
credential_management = []

[tools]
search-api = ["jwt-svid"]
database-write = []

[data.knowledge-base]
read = ["x509-svid"]

[data.customer-data]
read = ["payments-ca"]
"#;

/// Seed 001's example as shipped, with `agent`'s id and public key.
fn seed_001(agent: &TestAgent) -> String {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agents/research-agent-prod-01.yaml"),
    )
    .unwrap();
    let start = shipped.find("jwks:").unwrap();
    let end = shipped.find("agent_policy:").unwrap();
    let jwk = serde_json::to_string(&json!({ "keys": [agent.jwk] })).unwrap();
    format!("{}jwks: {jwk}\n\n{}", &shipped[..start], &shipped[end..])
        .replace("research-agent-prod-01", &agent.id)
}

fn plain(agent: &TestAgent, purpose: &str) -> String {
    format!(
        "id = \"{}\"\nteam = \"platform\"\nsponsor = \"owner@keygate.test\"\nrisk_tier = 2\nenvironment = \"dev\"\npurpose = \"{purpose}\"\njwks = {}\n",
        agent.id,
        common::config::toml_inline(&json!({ "keys": [agent.jwk] }))
    )
}

struct Folder(PathBuf);

impl Folder {
    fn new(b: &TestBroker) -> Self {
        let d = b.dir.join("agents-src");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("mapping.toml"), MAPPING).unwrap();
        Self(d)
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }
    fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).unwrap();
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

async fn run(b: &TestBroker, args: &[&str]) -> (i32, Value, String) {
    let out = b.cli(args, Some(&b.ops.admin)).await;
    let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn action_of<'a>(plan: &'a Value, agent: &str) -> &'a Value {
    &plan["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent)
        .unwrap_or_else(|| panic!("{agent} not in plan: {plan}"))["action"]
}

#[tokio::test]
async fn plan_apply_edit_and_prune_a_folder_of_agents() {
    let b = TestBroker::start_with(Setup::default()).await;
    let f = Folder::new(&b);
    let research = TestAgent::new("research", "EdDSA");
    let builder = TestAgent::new("builder", "ES256");
    let gone = TestAgent::new("leaving", "ES256");
    f.write("research.yaml", &seed_001(&research));
    f.write("builder.toml", &plain(&builder, "builds things"));
    f.write("leaving.toml", &plain(&gone, "will be removed"));

    // Plan on an empty registry: every agent is created; exit code 2.
    let (code, plan, err) = run(&b, &["plan", "-f", f.path()]).await;
    assert_eq!(code, 2, "{err} {plan}");
    for a in [&research, &builder, &gone] {
        assert_eq!(action_of(&plan, &a.id), "create", "{plan}");
    }
    let r = plan["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == research.id.as_str())
        .unwrap();
    assert_eq!(r["gained"], json!(["jwt-svid", "x509-svid"]), "{r}");
    assert_eq!(
        plan["policies"],
        json!([{ "file": format!("ascode-{}.cedar", research.id), "action": "add" }])
    );
    assert!(
        b.get("/v1/agents?limit=100", Some(&b.ops.admin))
            .await
            .expect(200)
            .as_array()
            .unwrap()
            .is_empty(),
        "a plan changes nothing"
    );

    // Apply creates them; a second plan has nothing to do (exit 0).
    let (code, applied, err) = run(&b, &["apply", "-f", f.path()]).await;
    assert_eq!(code, 0, "{err} {applied}");
    let (code, plan, err) = run(&b, &["plan", "-f", f.path()]).await;
    assert_eq!(
        (code, plan["changes"].as_u64()),
        (0, Some(0)),
        "{err} {plan}"
    );
    let ev = b.audit("action=ascode.applied").await;
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert_eq!(ev[0]["details"]["sha256"].as_str().unwrap().len(), 64);

    // Seed 001's denied action is refused by the generated forbid.
    let s = b.token(&research).await;
    b.jwt_svid(&s.token, Some(60)).await;
    let denied = b.credential(&s.token, "payments-ca", Some(60), None).await;
    assert_eq!(denied.status, 403, "{}", denied.text);
    assert!(
        denied.json()["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("ascode:research.yaml:")
                && p.as_str().unwrap().ends_with(":deny")),
        "{}",
        denied.text
    );
    let a = b.admin_get(&format!("/v1/agents/{}", research.id)).await;
    assert_eq!(a["delegation"]["max_depth"], 2, "{a}");
    assert_eq!(a["labels"]["credential_rotation_days"], "30", "{a}");
    // Seed 001's `credential.expires` (2026-08-11) has passed: an issue.
    let c = b
        .get(
            &format!("/v1/agents/{}/compliance", research.id),
            Some(&b.ops.auditor),
        )
        .await
        .expect(200);
    assert!(
        c["issues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["kind"] == "credential_expired"),
        "{c}"
    );

    // Editing one file shows exactly that change.
    f.write("builder.toml", &plain(&builder, "builds more things"));
    let (code, plan, _) = run(&b, &["plan", "-f", f.path()]).await;
    assert_eq!(code, 2);
    assert_eq!(plan["changes"], 1, "{plan}");
    let changes = &plan["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == builder.id.as_str())
        .unwrap()["changes"];
    assert_eq!(
        changes,
        &json!([{ "field": "purpose", "from": "builds things", "to": "builds more things" }])
    );
    run(&b, &["apply", "-f", f.path()]).await;
    let a = b.admin_get(&format!("/v1/agents/{}", builder.id)).await;
    assert_eq!(a["purpose"], "builds more things");

    // A removed file: kept without --prune, decommissioned with it (its
    // credentials revoked).
    let ls = b.token(&gone).await;
    let lease = b.x509(&ls.token, Some(600)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    f.remove("leaving.toml");
    let (_, plan, _) = run(&b, &["plan", "-f", f.path()]).await;
    assert_eq!(action_of(&plan, &gone.id), "absent", "{plan}");
    run(&b, &["apply", "-f", f.path()]).await;
    let a = b.admin_get(&format!("/v1/agents/{}", gone.id)).await;
    assert_eq!(a["status"], "active", "no --prune: kept");
    let (_, plan, _) = run(&b, &["plan", "-f", f.path(), "--prune"]).await;
    assert_eq!(action_of(&plan, &gone.id), "decommission", "{plan}");
    run(&b, &["apply", "-f", f.path(), "--prune"]).await;
    let a = b.admin_get(&format!("/v1/agents/{}", gone.id)).await;
    assert_eq!(a["status"], "decommissioned");
    common::eventually("the pruned agent's lease revoked", || async {
        (b.lease_state(&lease).await == "revoked").then_some(())
    })
    .await;
    // An agent registered through the API is never pruned.
    let other = TestAgent::new("by-hand", "ES256");
    b.register(&other, "platform").await;
    let (_, plan, _) = run(&b, &["plan", "-f", f.path(), "--prune"]).await;
    assert!(
        !plan["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["agent"] == other.id.as_str()),
        "{plan}"
    );
}

#[tokio::test]
async fn invalid_files_are_refused_naming_file_and_line_and_change_nothing() {
    let b = TestBroker::start_with(Setup::default()).await;
    let f = Folder::new(&b);
    let agent = TestAgent::new("strict", "ES256");
    let good = seed_001(&agent);

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown action",
            good.replace("- text_generation", "- teleportation"),
            "action `teleportation` is not in the mapping table",
        ),
        (
            "bad tier",
            good.replace("risk_tier: 2", "risk_tier: 7"),
            "`risk_tier` must be 1, 2 or 3",
        ),
        (
            "private key material",
            good.replace("\"kty\":", "\"d\":\"c2VjcmV0LWtleS1tYXRlcmlhbA\",\"kty\":"),
            "private",
        ),
        (
            "not YAML",
            format!("{good}\n  - : [unclosed\n"),
            "research.yaml",
        ),
    ];
    for (what, text, expect) in cases {
        f.write("research.yaml", &text);
        let (code, _, err) = run(&b, &["plan", "-f", f.path()]).await;
        assert_ne!(code, 0, "{what}");
        assert!(err.contains(expect), "{what}: {err}");
        assert!(
            err.contains("research.yaml"),
            "{what} names the file: {err}"
        );
        assert!(err.contains("nothing changed"), "{what}: {err}");
        assert!(
            !err.contains("c2VjcmV0LWtleS1tYXRlcmlhbA"),
            "{what} echoes no key: {err}"
        );
        let (code, _, err) = run(&b, &["apply", "-f", f.path()]).await;
        assert_ne!(code, 0, "{what}: {err}");
    }
    let line = {
        f.write(
            "research.yaml",
            &good.replace("- text_generation", "- teleportation"),
        );
        run(&b, &["plan", "-f", f.path()]).await.2
    };
    let expected = good
        .lines()
        .position(|l| l.contains("- text_generation"))
        .unwrap()
        + 1;
    assert!(line.contains(&format!("line {expected}")), "{line}");
    assert!(
        b.get("/v1/agents?limit=100", Some(&b.ops.admin))
            .await
            .expect(200)
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was registered"
    );
    assert!(
        !b.dir
            .join("policies")
            .join(format!("ascode-{}.cedar", agent.id))
            .exists(),
        "no policy was written"
    );
}

/// What registering or changing an agent would refuse is refused when the
/// folder is planned, by file and line: an apply never registers one file's
/// agent and then stops at the next (a sponsor not in the people
/// directory), leaving the rest and the generated policies unwritten.
#[tokio::test]
async fn an_apply_refused_by_a_later_file_changes_nothing() {
    let (b, _people) = common::governance::start("").await;
    let f = Folder::new(&b);
    let first = TestAgent::new("ac-first", "ES256");
    let second = TestAgent::new("ac-second", "ES256");
    f.write("a.toml", &plain(&first, "fine"));
    f.write(
        "b.toml",
        &plain(&second, "orphan").replace("owner@keygate.test", "nobody@keygate.test"),
    );
    for cmd in ["plan", "apply"] {
        let (code, _, err) = run(&b, &[cmd, "-f", f.path()]).await;
        assert_ne!(code, 0, "{cmd}: {err}");
        assert!(
            err.contains("b.toml") && err.contains("line 1") && err.contains("nobody@keygate.test"),
            "{cmd}: {err}"
        );
        assert!(err.contains("nothing changed"), "{cmd}: {err}");
    }
    let r = b
        .get(&format!("/v1/agents/{}", first.id), Some(&b.ops.admin))
        .await;
    assert_eq!(
        r.status, 404,
        "the first file's agent was registered: {}",
        r.text
    );
}
