//! Continuous validation through the real server: a compromised agent (a
//! burst of refused requests from a network it was never seen on) is
//! suspended at the request that crosses the threshold and its credentials
//! revoked; `dry_run` records and changes nothing; a legitimate change to an
//! agent or to policy is relearned, not flagged; incidents are listed and
//! resolved through the CLI.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common;
use common::{Setup, TestAgent, TestBroker, eventually};

const DETECTORS: &str = r#"
[validation]
warm_up_observations = 3

[[detectors]]
name = "new-network"
signal = "new_source_network"
severity = "medium"
action = "record"

[[detectors]]
name = "denial-burst"
signal = "denials"
threshold = 5
window_secs = 60
severity = "critical"
action = "suspend"

[[detectors]]
name = "login-failures"
signal = "failed_auth"
threshold = 2
window_secs = 60
severity = "high"
action = "alert"
"#;

async fn start(extra: &str) -> TestBroker {
    TestBroker::start_with(Setup {
        extra_config: format!("{DETECTORS}{extra}"),
        ..Setup::permissive()
    })
    .await
}

/// An HTTP client whose connections come from `ip` (any 127/8 address is
/// this host's), so the broker sees another network.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(ip.parse().unwrap()))
        .build()
        .unwrap()
}

async fn open_task(b: &TestBroker, http: &reqwest::Client, agent: &TestAgent) -> String {
    let r = http
        .post(b.url("/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", agent.id.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", agent.assertion().as_str()),
            ("task", "validation test"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

async fn ask(b: &TestBroker, http: &reqwest::Client, token: &str, scope: &str) -> u16 {
    let mut body = json!({ "scope": scope, "ttl": 300 });
    if scope == "jwt-svid" {
        body["params"] = json!({ "audience": "https://api.keygate.test" });
    }
    http.post(b.url("/v1/credentials"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn incidents(b: &TestBroker, agent: &TestAgent) -> Vec<Value> {
    b.get(
        &format!("/v1/incidents?agent={}", agent.id),
        Some(&b.ops.secops),
    )
    .await
    .expect(200)
    .as_array()
    .unwrap()
    .clone()
}

fn detectors_of(list: &[Value]) -> Vec<String> {
    let mut d: Vec<String> = list
        .iter()
        .map(|i| i["detector"].as_str().unwrap().to_owned())
        .collect();
    d.sort();
    d
}

/// Warms the agent up from 127.0.0.1, then moves to 127.1.0.7 and sends
/// six requests for a scope that does not exist. Returns the session of the
/// new network and when the sixth request was answered.
async fn compromise(b: &TestBroker, agent: &TestAgent) -> (String, Instant) {
    let home = reqwest::Client::new();
    let t = open_task(b, &home, agent).await;
    assert_eq!(ask(b, &home, &t, "x509-svid").await, 201);
    assert_eq!(ask(b, &home, &t, "x509-svid").await, 201);
    let away = client_from("127.1.0.7");
    let stolen = open_task(b, &away, agent).await;
    assert_eq!(ask(b, &away, &stolen, "x509-svid").await, 201);
    for _ in 0..5 {
        assert_eq!(ask(b, &away, &stolen, "no-such-scope").await, 404);
    }
    assert_eq!(ask(b, &away, &stolen, "no-such-scope").await, 404);
    (stolen, Instant::now())
}

#[tokio::test]
async fn a_burst_of_refusals_from_a_new_network_suspends_the_agent_and_revokes_its_credentials() {
    let b = start("").await;
    let agent = TestAgent::new("compromised", "ES256");
    b.register(&agent, "platform").await;
    let (stolen, crossed) = compromise(&b, &agent).await;
    // Suspended by the request that crossed the threshold: at once.
    let a = b
        .get(&format!("/v1/agents/{}", agent.id), Some(&b.ops.admin))
        .await
        .expect(200);
    assert!(crossed.elapsed() < Duration::from_secs(1));
    assert_eq!(a["status"], "suspended", "{a}");
    let r = b.get("/v1/session", Some(&stolen)).await;
    assert_eq!(r.status, 401, "the session outlived the suspension");
    eventually("every credential of the agent revoked", || async {
        let leases = b.leases(&format!("agent={}", agent.id)).await;
        (leases.len() == 3 && leases.iter().all(|l| l["state"] == "revoked")).then_some(())
    })
    .await;
    // Both detectors left an incident with their evidence.
    let list = incidents(&b, &agent).await;
    assert_eq!(
        detectors_of(&list),
        ["denial-burst", "new-network"],
        "{list:?}"
    );
    let burst = list
        .iter()
        .find(|i| i["detector"] == "denial-burst")
        .unwrap();
    assert_eq!(burst["action"], "suspend");
    assert_eq!(burst["observed"], 6);
    assert_eq!(burst["evidence"]["threshold"], 5);
    assert_eq!(burst["state"], "open");
    let net = list
        .iter()
        .find(|i| i["detector"] == "new-network")
        .unwrap();
    assert_eq!(net["evidence"]["network"], "127.1.0.0/24");
    // The kill switch names continuous validation and the incident.
    let revoked = b.audit("action=revocation.emergency").await;
    let ev = revoked.last().unwrap();
    assert_eq!(ev["actor"], "operator:continuous-validation");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains(burst["id"].as_str().unwrap()),
        "{ev}"
    );
    // Repeated failed logins claiming another agent raise an alert.
    let other = TestAgent::new("guessed", "ES256");
    b.register(&other, "platform").await;
    let impostor = TestAgent::new("impostor", "ES256");
    for _ in 0..3 {
        let r = b
            .token_form(&[
                ("grant_type", "client_credentials"),
                ("client_id", other.id.as_str()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", impostor.sign(&other.claims()).as_str()),
                ("task", "guessing"),
            ])
            .await;
        assert_eq!(r.status, 401);
    }
    let list = incidents(&b, &other).await;
    assert_eq!(detectors_of(&list), ["login-failures"], "{list:?}");
    assert_eq!(list[0]["action"], "alert");
}

#[tokio::test]
async fn dry_run_records_what_it_would_do_and_incidents_resolve_through_the_cli() {
    let b = TestBroker::start_with(Setup {
        extra_config: DETECTORS.replace(
            "warm_up_observations = 3",
            "warm_up_observations = 3\ndry_run = true",
        ),
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("dry", "ES256");
    b.register(&agent, "platform").await;
    let (stolen, _) = compromise(&b, &agent).await;
    let a = b
        .get(&format!("/v1/agents/{}", agent.id), Some(&b.ops.admin))
        .await
        .expect(200);
    assert_eq!(a["status"], "active", "a dry run suspended the agent");
    assert_eq!(b.get("/v1/session", Some(&stolen)).await.status, 200);
    let leases = b.leases(&format!("agent={}", agent.id)).await;
    assert!(leases.iter().all(|l| l["state"] == "active"), "{leases:?}");
    let list = incidents(&b, &agent).await;
    assert_eq!(detectors_of(&list), ["denial-burst", "new-network"]);
    assert!(list.iter().all(|i| i["dry_run"] == true), "{list:?}");

    // Resolved through the CLI, once.
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let out = b
        .cli(
            &["incidents", "resolve", &id, "--reason", "a drill"],
            Some(&b.ops.secops),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "resolved");
    assert_eq!(shown["resolved_by"], "operator:test-secops");
    let again = b
        .cli(
            &["incidents", "resolve", &id, "--reason", "twice"],
            Some(&b.ops.secops),
        )
        .await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already resolved"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let open = b
        .cli(
            &["incidents", "list", "--open", "--agent", &agent.id],
            Some(&b.ops.auditor),
        )
        .await;
    let open: Value = serde_json::from_slice(&open.stdout).unwrap();
    assert_eq!(open.as_array().unwrap().len(), 1);
    // An auditor reads incidents but does not resolve them.
    let r = b
        .post(
            &format!("/v1/incidents/{}/resolve", open[0]["id"].as_str().unwrap()),
            Some(&b.ops.auditor),
            &json!({ "reason": "not mine to close" }),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = b
        .post(
            "/v1/incidents/in_nope/resolve",
            Some(&b.ops.secops),
            &json!({ "reason": "x" }),
        )
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_legitimate_change_is_relearned_not_flagged() {
    let b = start(
        r#"
[[detectors]]
name = "new-scope"
signal = "new_scope"
severity = "low"
action = "record"
"#,
    )
    .await;
    let home = reqwest::Client::new();
    let warm = |agent: TestAgent| {
        let b = &b;
        let home = home.clone();
        async move {
            b.register(&agent, "platform").await;
            let t = open_task(b, &home, &agent).await;
            for _ in 0..2 {
                assert_eq!(ask(b, &home, &t, "x509-svid").await, 201);
            }
            (agent, t)
        }
    };
    // Unchanged: a scope it never used is flagged.
    let (plain, t) = warm(TestAgent::new("plain", "ES256")).await;
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 201);
    assert_eq!(detectors_of(&incidents(&b, &plain).await), ["new-scope"]);
    // Its registry entry changed: what it uses next is learned.
    let (changed, t) = warm(TestAgent::new("changed", "ES256")).await;
    b.call(
        reqwest::Method::PATCH,
        &format!("/v1/agents/{}", changed.id),
        Some(&b.ops.admin),
        Some(&json!({ "purpose": "now also signs JWTs" })),
    )
    .await
    .expect(200);
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 201);
    assert!(incidents(&b, &changed).await.is_empty());
    // The policy set changed: the same for every agent.
    let (reloaded, t) = warm(TestAgent::new("reloaded", "ES256")).await;
    b.admin_post("/v1/policy/reload", &json!({}))
        .await
        .expect(200);
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 201);
    assert!(incidents(&b, &reloaded).await.is_empty());
}
