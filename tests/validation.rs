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
pub(crate) fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(ip.parse().unwrap()))
        .build()
        .unwrap()
}

/// A task open as `id` with `assertion`, from `http`'s address.
async fn login(
    b: &TestBroker,
    http: &reqwest::Client,
    id: &str,
    assertion: &str,
) -> reqwest::Response {
    http.post(b.url("/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("task", "validation test"),
        ])
        .send()
        .await
        .unwrap()
}

pub(crate) async fn open_task(b: &TestBroker, http: &reqwest::Client, agent: &TestAgent) -> String {
    let r = login(b, http, &agent.id, &agent.assertion()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

pub(crate) async fn ask(b: &TestBroker, http: &reqwest::Client, token: &str, scope: &str) -> u16 {
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

pub(crate) async fn incidents(b: &TestBroker, agent: &TestAgent) -> Vec<Value> {
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

pub(crate) fn detectors_of(list: &[Value]) -> Vec<String> {
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
    // A scope excluded from it, then given back: learned too.
    let (given_back, t) = warm(TestAgent::new("given-back", "ES256")).await;
    let path = format!("/v1/agents/{}/exclusions", given_back.id);
    b.admin_post(&path, &json!({ "scope": "jwt-svid", "reason": "unused" }))
        .await
        .expect(200);
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 403);
    b.call(
        reqwest::Method::DELETE,
        &format!("{path}/jwt-svid"),
        Some(&b.ops.admin),
        Some(&json!({ "reason": "needed after all" })),
    )
    .await
    .expect(200);
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 201);
    assert!(incidents(&b, &given_back).await.is_empty());
}

#[tokio::test]
async fn usage_limits_refuse_with_429_count_concurrent_requests_and_are_audited() {
    let b = TestBroker::start_with(Setup {
        extra_config: r#"
[[lifecycle]]
name = "capped"
max_live_leases = 3
max_credentials_per_minute = 6
"#
        .into(),
        scopes: Some(common::DEFAULT_SCOPES.replace(
            "params = { kind = \"x509_svid\" }\n\n[[scopes]]\nname = \"jwt-svid\"",
            "params = { kind = \"x509_svid\" }\nmax_live_leases_per_agent = 1\n\n[[scopes]]\nname = \"jwt-svid\"",
        )),
        ..Setup::permissive()
    })
    .await;
    let http = reqwest::Client::new();
    let agent = TestAgent::new("capped", "ES256");
    b.register(&agent, "platform").await;
    let t = open_task(&b, &http, &agent).await;
    let get = |scope: &'static str| {
        let (b, http, t) = (&b, http.clone(), t.clone());
        async move {
            let mut body = json!({ "scope": scope, "ttl": 300 });
            if scope == "jwt-svid" {
                body["params"] = json!({ "audience": "https://api.keygate.test" });
            }
            let r = http
                .post(b.url("/v1/credentials"))
                .bearer_auth(&t)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, retry, r.json::<Value>().await.unwrap())
        }
    };
    let (s, _, first) = get("x509-svid").await;
    assert_eq!(s, 201);
    // One x509-svid at a time (the scope's limit).
    let (s, retry, body) = get("x509-svid").await;
    assert_eq!(
        (s, body["error"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    assert!(retry.is_some(), "no Retry-After");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_live_leases_per_agent")
    );
    assert_eq!(get("jwt-svid").await.0, 201);
    assert_eq!(get("jwt-svid").await.0, 201);
    // Three live in all (the lifecycle's limit).
    let (s, _, body) = get("jwt-svid").await;
    assert_eq!(s, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_live_leases = 3"),
        "{body}"
    );
    // Releasing one makes room.
    let lease = first["lease_id"].as_str().unwrap();
    let r = http
        .delete(b.url(&format!("/v1/credentials/{lease}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get("jwt-svid").await.0, 201);
    // Six granted-or-limited asks so far this minute: the seventh is over
    // the rate, whatever is live.
    let (s, retry, body) = get("x509-svid").await;
    assert_eq!(s, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_credentials_per_minute"),
        "{body}"
    );
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    let limited = b
        .audit(&format!("action=credential.limited&agent={}", agent.id))
        .await;
    let limits: Vec<&str> = limited
        .iter()
        .map(|e| e["details"]["limit"].as_str().unwrap())
        .collect();
    assert_eq!(
        limits,
        [
            "max_live_leases_per_agent",
            "max_live_leases",
            "max_credentials_per_minute"
        ]
    );

    // Concurrent asks cannot pass the live limit together.
    let racer = TestAgent::new("racer", "ES256");
    b.register(&racer, "platform").await;
    let t = open_task(&b, &http, &racer).await;
    let url = b.url("/v1/credentials");
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (http, t, url) = (http.clone(), t.clone(), url.clone());
        asks.spawn(async move {
            let body = json!({
                "scope": "jwt-svid", "ttl": 300,
                "params": { "audience": "https://api.keygate.test" },
            });
            http.post(url)
                .bearer_auth(&t)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    let statuses: Vec<u16> = asks.join_all().await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        3,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 429),
        "{statuses:?}"
    );
}

/// Anyone who knows an agent's id can fail a login as it, from anywhere:
/// those failures are no network or address of the agent's, so a novelty
/// or a count of addresses acting on them (here: suspend) would hand the
/// agent's off switch to whoever guesses its id.
#[tokio::test]
async fn failed_logins_from_a_new_network_are_not_the_agents_network() {
    let b = TestBroker::start_with(Setup {
        extra_config: r#"
[validation]
warm_up_observations = 3

[[detectors]]
name = "new-network"
signal = "new_source_network"
severity = "high"
action = "suspend"

[[detectors]]
name = "many-addresses"
signal = "source_addresses"
threshold = 2
window_secs = 60
severity = "high"
action = "suspend"
"#
        .into(),
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("guessable", "ES256");
    b.register(&agent, "platform").await;
    let home = reqwest::Client::new();
    let t = open_task(&b, &home, &agent).await;
    for _ in 0..3 {
        assert_eq!(ask(&b, &home, &t, "x509-svid").await, 201);
    }
    let impostor = TestAgent::new("impostor", "ES256");
    for ip in ["127.1.0.9", "127.2.0.9", "127.3.0.9"] {
        let forged = impostor.sign(&agent.claims());
        let r = login(&b, &client_from(ip), &agent.id, &forged).await;
        assert_eq!(r.status(), 401);
    }
    let a = b
        .get(&format!("/v1/agents/{}", agent.id), Some(&b.ops.admin))
        .await
        .expect(200);
    assert_eq!(a["status"], "active", "{a}");
    assert!(incidents(&b, &agent).await.is_empty());
    assert_eq!(ask(&b, &home, &t, "x509-svid").await, 201);
    // The agent itself on a network it was never seen on still fires.
    login(&b, &client_from("127.1.0.9"), &agent.id, &agent.assertion()).await;
    let list = incidents(&b, &agent).await;
    assert_eq!(detectors_of(&list), ["new-network"], "{list:?}");
}
