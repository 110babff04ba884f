//! Every door has a limit, through the real server: per source address on
//! the token, introspection and revocation endpoints and the Slack hook, per
//! claimed `client_id`, per agent on credential operations, and caps on the
//! approvals one task or agent keeps waiting. A flood of failed logins with
//! huge client ids costs a bounded number of small audit rows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::console::ConsoleClient;
use common::{JWT_BEARER, Resp, Setup, TestAgent, TestBroker, eventually};
use serde_json::json;

async fn start(limits: &str) -> TestBroker {
    TestBroker::start_with(Setup {
        extra_config: format!("[limits]\n{limits}\n"),
        ..Setup::default()
    })
    .await
}

async fn post_form(b: &TestBroker, path: &str, form: &[(&str, &str)]) -> (Resp, Option<String>) {
    let r = b.http.post(b.url(path)).form(form).send().await.unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let status = r.status();
    (
        Resp {
            status,
            text: r.text().await.unwrap(),
        },
        retry,
    )
}

fn bad_login(client_id: &str) -> Vec<(&str, &str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", "not.a.jwt"),
    ]
}

#[tokio::test]
async fn the_unauthenticated_doors_are_limited_per_source_address() {
    // 60 a minute: a burst of 6, then 429.
    let b = start("per_address_per_minute = 60\nper_client_per_minute = 0").await;
    for i in 0..6 {
        let (r, _) = post_form(&b, "/oauth/token", &bad_login(&format!("c{i}"))).await;
        assert_eq!(r.status, 401, "{}", r.text);
    }
    let (r, retry) = post_form(&b, "/oauth/token", &bad_login("c7")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json()["error"], "rate_limited");
    assert!(r.json()["error_description"].is_string(), "{}", r.text);
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    // A refused request is not an audit row.
    assert_eq!(b.audit("action=auth.token").await.len(), 6);

    // Each door has its own budget; the Slack hook is a door too.
    for _ in 0..6 {
        let r = b
            .post("/v1/hooks/slack/interactions", None, &json!({}))
            .await;
        assert_ne!(r.status, 429, "{}", r.text);
    }
    let r = b
        .post("/v1/hooks/slack/interactions", None, &json!({}))
        .await;
    assert_eq!(r.status, 429, "{}", r.text);
    let (r, _) = post_form(&b, "/oauth/introspect", &[("token", "x")]).await;
    assert_eq!(
        r.status, 401,
        "introspection has its own budget: {}",
        r.text
    );

    let metrics = b.get("/metrics", None).await.text;
    assert!(
        metrics.contains("keygate_rate_limited_total{limit=\"address\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn token_requests_are_limited_per_claimed_client() {
    let b = start("per_address_per_minute = 0\nper_client_per_minute = 30").await;
    let agent = TestAgent::new("limited", "ES256");
    b.register(&agent, "platform").await;
    for _ in 0..3 {
        b.token(&agent).await;
    }
    let r = b.token_with_assertion(&agent.id, &agent.assertion()).await;
    assert_eq!(r.status, 429, "{}", r.text);
    // Another client is not held back by this one.
    let other = TestAgent::new("other", "ES256");
    b.register(&other, "platform").await;
    b.token(&other).await;
}

#[tokio::test]
async fn credential_operations_are_limited_per_agent_and_approvals_capped() {
    let b = start(
        "per_address_per_minute = 0\nper_agent_per_minute = 60\nmax_pending_approvals_per_task = 2",
    )
    .await;
    let agent = TestAgent::new("busy", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    // Sensitive asks: the same ask twice is one approval; a third distinct
    // one in the task is over the cap.
    let ask = |ttl: u64| json!({ "scope": "payments-ca", "ttl": ttl, "justification": "invoice" });
    let first = b
        .post("/v1/credentials", Some(&s.token), &ask(300))
        .await
        .expect(202);
    let again = b
        .post("/v1/credentials", Some(&s.token), &ask(300))
        .await
        .expect(202);
    assert_eq!(first["approval_id"], again["approval_id"]);
    b.post("/v1/credentials", Some(&s.token), &ask(200))
        .await
        .expect(202);
    let r = b.post("/v1/credentials", Some(&s.token), &ask(100)).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(
        r.text.contains("max_pending_approvals_per_task"),
        "{}",
        r.text
    );
    let pending = b
        .admin_get(&format!("/v1/approvals?state=pending&agent={}", agent.id))
        .await;
    assert_eq!(pending.as_array().unwrap().len(), 2, "{pending}");

    // Four asks so far: two more fit the burst of 6, then 429 — give or
    // take the one a second the limit refills while a slow machine works.
    let started = std::time::Instant::now();
    let mut allowed = 0;
    let r = loop {
        let r = b
            .http
            .post(b.url("/v1/credentials"))
            .bearer_auth(&s.token)
            .json(&json!({ "scope": "x509-svid", "ttl": 60 }))
            .send()
            .await
            .unwrap();
        if r.status() != 201 {
            break r;
        }
        allowed += 1;
        assert!(allowed <= 30, "no limit after 30 asks");
    };
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        (2..=2 + refilled).contains(&allowed),
        "{allowed} asks allowed past the first four ({refilled} s of refill)"
    );
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
}

#[tokio::test]
async fn a_flood_of_failed_logins_costs_a_bounded_audit_log() {
    let b = start(
        "per_address_per_minute = 0\nper_client_per_minute = 0\nauth_failure_interval_secs = 1",
    )
    .await;
    let huge = "x".repeat(60_000);
    let began = std::time::Instant::now();
    for _ in 0..200 {
        let (r, _) = post_form(&b, "/oauth/token", &bad_login(&huge)).await;
        assert_eq!(r.status, 401);
    }
    let bursts = 1 + began.elapsed().as_secs() as usize;
    // The first failure of each burst at once, with the claimed id cut short.
    let first = b.audit("action=auth.token").await;
    assert!(
        (1..=bursts).contains(&first.len()),
        "{} events",
        first.len()
    );
    let actor = first[0]["actor"].as_str().unwrap();
    assert!(actor.len() < 300, "{actor}");
    assert_eq!(first[0]["details"]["source"], "127.0.0.1");
    // The rest as counts when each interval ends: none is lost.
    eventually("every failure accounted for", || async {
        let singles = b.audit("action=auth.token").await.len() as u64;
        let counted: u64 = b
            .audit("action=auth.token_failures")
            .await
            .iter()
            .map(|e| e["details"]["count"].as_u64().unwrap())
            .sum();
        (singles + counted == 200).then_some(())
    })
    .await;
    let all = b.get("/v1/audit", Some(&b.ops.auditor)).await.text;
    assert!(all.len() < 20_000, "{} bytes of audit log", all.len());
    let kept: usize = b
        .store_at_rest()
        .await
        .iter()
        .filter(|p| p.name != "store files")
        .map(|p| p.bytes.len())
        .sum();
    assert!(kept < 4_000_000, "the store grew to {kept} bytes");
}

/// Bad operator tokens, at the API and at the console's sign-in, are limited
/// per address and audited in bursts: the first of a kind at once, the
/// repeats counted, so a flood neither guesses on unchecked nor fills the
/// audit log.
#[tokio::test]
async fn failed_operator_tokens_are_limited_and_audited_in_bursts() {
    // 60 a minute: a burst of 6, then 429.
    let b = start("per_address_per_minute = 60").await;
    for _ in 0..6 {
        let r = b.get("/v1/agents", Some("not-an-operator-token")).await;
        assert_eq!(r.status, 401, "{}", r.text);
    }
    let r = b.get("/v1/agents", Some("not-an-operator-token")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    let fails = b.audit("action=operator.auth").await;
    assert_eq!(fails.len(), 1, "one event for the burst: {fails:?}");
    assert!(
        !serde_json::to_string(&fails)
            .unwrap()
            .contains("not-an-operator-token")
    );
    // A good token from the same address still works: only failures count.
    b.get("/v1/agents", Some(&b.ops.admin)).await.expect(200);

    // A bad token at the console's sign-in is audited from its address
    // (a burst of its own: another kind of failure).
    let (status, _) = ConsoleClient::try_sign_in(&b, "not-a-console-token").await;
    assert_eq!(status, 401);
    let fails = b.audit("action=operator.auth").await;
    let console = fails
        .iter()
        .find(|e| e.to_string().contains("console sign-in"))
        .unwrap_or_else(|| panic!("{fails:?}"));
    assert_eq!(console["details"]["source"], "127.0.0.1", "{console}");

    // The console's sign-in page and form share a limit per address.
    let mut limited = false;
    for _ in 0..10 {
        let r = b.http.get(b.url("/ui/login")).send().await.unwrap();
        if r.status() == 429 {
            limited = true;
            break;
        }
        assert_eq!(r.status(), 200);
    }
    assert!(limited, "the sign-in was never limited");
    // The OIDC sign-in and its callback (which call the issuer) share it.
    for path in ["/ui/login/oidc", "/ui/login/oidc/callback?state=s&code=c"] {
        let r = b.http.get(b.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 429, "{path}");
    }
}
