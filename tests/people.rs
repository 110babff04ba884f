//! The people directory, registry exclusions and per-agent TTL caps
//! through the real server: a departed sponsor orphans an agent, an unused
//! scope is excluded until an admin lifts it, the cap bounds every
//! credential. Time passes by moving dates back in the store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::console::ConsoleClient;
use common::governance::{DAY, SPONSOR, compliance, exec, issue, start, sweep};
use common::{TestAgent, TestBroker};
use serde_json::json;

#[tokio::test]
async fn a_departed_sponsor_orphans_the_agent_after_five_business_days() {
    let (b, people) = start("").await;
    let agent = TestAgent::new("rv-orphan", "ES256");
    // A sponsor the directory does not know is refused at registration.
    let mut spec = agent.spec("platform");
    spec["sponsor"] = "stranger@keygate.test".into();
    let r = b.admin_post("/v1/agents", &spec).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.text
            .contains("not an active person in the people directory"),
        "{}",
        r.text
    );
    b.register(&agent, "platform").await;
    assert!(issue(&compliance(&b, &agent.id).await, "sponsor_departed").is_none());
    // Olga is signed in to the console when she leaves.
    let console = ConsoleClient::sign_in(&b, &people.olga).await;
    assert_eq!(console.get(&b, "/ui").await, (200, None));

    // Olga leaves: her agent needs a new sponsor, her token stops working.
    b.admin_post(
        &format!("/v1/people/{SPONSOR}/depart"),
        &json!({ "reason": "left the company" }),
    )
    .await
    .expect(200);
    let again = b
        .admin_post(&format!("/v1/people/{SPONSOR}/depart"), &json!({}))
        .await;
    assert_eq!(again.status, 409, "{}", again.text);
    let gone = b.get("/v1/reviews", Some(&people.olga)).await;
    assert_eq!(gone.status, 401, "{}", gone.text);
    assert!(gone.text.contains("departed"), "{}", gone.text);
    // Her console session ends with her, and she cannot sign in again.
    let (status, location) = console.get(&b, "/ui/reviews").await;
    assert_eq!(status, 303);
    assert_eq!(location.as_deref(), Some("/ui/login?next=%2Fui%2Freviews"));
    let (status, page) = ConsoleClient::try_sign_in(&b, &people.olga).await;
    assert_eq!(status, 401, "{page}");
    assert!(page.contains("departed on"), "{page}");
    // Audited as at the API: by name, from her address.
    let refused = b.audit("action=operator.auth").await;
    let at_console = refused
        .iter()
        .find(|e| e.to_string().contains("no longer signs in"))
        .unwrap_or_else(|| panic!("the console refusal was not audited: {refused:?}"));
    assert_eq!(at_console["details"]["source"], "127.0.0.1", "{at_console}");
    assert!(at_console.to_string().contains("olga"), "{at_console}");
    let c = compliance(&b, &agent.id).await;
    let i = issue(&c, "sponsor_departed").expect("sponsor_departed");
    assert_eq!(i["action"], "suspend", "{c}");
    // Not an active person: she cannot be named sponsor again.
    let other = TestAgent::new("rv-orphan-2", "ES256");
    let r = b.admin_post("/v1/agents", &other.spec("platform")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("left on"), "{}", r.text);

    // Eight calendar days later (at least five business days): suspended.
    exec(
        &b,
        "UPDATE departures SET departed_at = departed_at - ?",
        &[&(8 * DAY).to_string()],
    )
    .await;
    let r = sweep(&b).await;
    assert!(
        r["acted"]
            .as_array()
            .unwrap()
            .contains(&json!([agent.id, "suspend"])),
        "{r}"
    );

    // A new sponsor resolves it; resumed, the agent stays active.
    b.call(
        reqwest::Method::PATCH,
        &format!("/v1/agents/{}", agent.id),
        Some(&b.ops.admin),
        Some(&json!({ "sponsor": "next@keygate.test" })),
    )
    .await
    .expect(200);
    b.admin_post(&format!("/v1/agents/{}/resume", agent.id), &json!({}))
        .await
        .expect(200);
    sweep(&b).await;
    let c = compliance(&b, &agent.id).await;
    assert!(issue(&c, "sponsor_departed").is_none(), "{c}");
    assert_eq!(c["status"], "active");
    let list = b.get("/v1/people", Some(&b.ops.auditor)).await.expect(200);
    let olga = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["email"] == SPONSOR)
        .unwrap();
    assert_eq!(olga["status"], "departed", "{olga}");
    assert_eq!(olga["operator"], "olga");
}

#[tokio::test]
async fn the_agents_ttl_cap_bounds_sessions_credentials_and_renewals() {
    let (b, _people) = start("").await;
    let agent = TestAgent::new("rv-capped", "ES256");
    let mut spec = agent.spec("platform");
    spec["max_ttl_secs"] = 120.into();
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let zero = {
        let other = TestAgent::new("rv-zero", "ES256");
        let mut s = other.spec("platform");
        s["max_ttl_secs"] = 0.into();
        b.admin_post("/v1/agents", &s).await
    };
    assert_eq!(zero.status, 400, "{}", zero.text);

    let s = b.token_ttl(&agent, Some(3600)).await;
    let now = common::unix_now();
    let opened = b
        .audit(&format!("action=task.opened&agent={}", agent.id))
        .await;
    let task_exp = opened[0]["details"]["expires_at"].as_i64().unwrap();
    assert!(task_exp <= now + 121, "session capped at 120 s: {opened:?}");
    let cred = b.x509(&s.token, Some(3600)).await;
    let exp = time::OffsetDateTime::parse(
        cred["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert!(exp <= now + 121, "credential capped at 120 s: {cred}");
    let c = compliance(&b, &agent.id).await;
    assert_eq!(c["max_ttl_secs"], 120);
    assert!(issue(&c, "long_ttl").is_none(), "{c}");
}

#[tokio::test]
async fn remove_unused_excludes_an_unused_scope_until_an_admin_lifts_it() {
    let (b, _people) = start(
        "[[lifecycle]]\nname = \"tidy\"\nremove_unused = true\nunused_scope_after_days = 30\n",
    )
    .await;
    let agent = TestAgent::new("rv-unused", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    b.x509(&s.token, Some(60)).await;
    // Registered 40 days ago; x509-svid used today, jwt-svid never.
    let now = common::unix_now();
    exec(
        &b,
        "UPDATE agents SET created_at = ? WHERE id = ?",
        &[&(now - 40 * DAY).to_string(), &agent.id],
    )
    .await;
    let r = sweep(&b).await;
    let excluded = r["excluded"].as_array().unwrap();
    assert!(excluded.contains(&json!([agent.id, "jwt-svid"])), "{r}");
    assert!(!excluded.contains(&json!([agent.id, "x509-svid"])), "{r}");
    let refused = b
        .credential(
            &s.token,
            "jwt-svid",
            Some(60),
            Some(json!({ "audience": common::JWT_AUDIENCE })),
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    // The next sweep closes the finding: the scope is no longer reachable.
    sweep(&b).await;
    let c = compliance(&b, &agent.id).await;
    assert!(
        !c["issues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["kind"] == "unused_scope" && i["subject"] == "jwt-svid"),
        "{c}"
    );
    b.call(
        reqwest::Method::DELETE,
        &format!("/v1/agents/{}/exclusions/jwt-svid", agent.id),
        Some(&b.ops.admin),
        None,
    )
    .await
    .expect(200);
    b.jwt_svid(&s.token, Some(60)).await;
    // Lifting twice: nothing to lift.
    let twice = b
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/agents/{}/exclusions/jwt-svid", agent.id),
            Some(&b.ops.admin),
            None,
        )
        .await;
    assert_eq!(twice.status, 404, "{}", twice.text);
}

/// The console reads an operator's roles from the config at each request:
/// restarted with an operator removed, her session is sent to sign in (and her
/// token no longer does); with a role taken away, its pages are refused.
#[tokio::test]
async fn a_console_session_follows_the_operators_config_across_a_restart() {
    let (mut b, people) = start("").await;
    let olga = ConsoleClient::sign_in(&b, &people.olga).await;
    let root2 = ConsoleClient::sign_in(&b, &people.root2).await;
    assert_eq!(olga.get(&b, "/ui/audit").await, (200, None));
    assert_eq!(root2.get(&b, "/ui/agents").await, (200, None));

    b.stop_gracefully().await;
    let path = b.dir.join("keygate.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let root2_block = config.find("[[operators]]\nname = \"root2\"").unwrap();
    let end = root2_block + config[root2_block..].find("\n\n").unwrap();
    let config = format!("{}{}", &config[..root2_block], &config[end + 2..]);
    let narrowed = "name = \"olga\"\nroles = [\"approver\"]";
    let config = config.replace("name = \"olga\"\nroles = [\"auditor\"]", narrowed);
    assert!(config.contains(narrowed) && !config.contains("\"root2\""));
    std::fs::write(&path, config).unwrap();
    b.start_again().await;

    let (status, location) = root2.get(&b, "/ui/agents").await;
    assert_eq!(status, 303);
    assert_eq!(location.as_deref(), Some("/ui/login?next=%2Fui%2Fagents"));
    let (status, page) = ConsoleClient::try_sign_in(&b, &people.root2).await;
    assert_eq!(status, 401, "{page}");
    assert!(page.contains("not an operator"), "{page}");
    assert_eq!(olga.get(&b, "/ui/audit").await.0, 403);
    assert_eq!(olga.get(&b, "/ui").await, (200, None));
}

/// Rotating an operator's token (a new `token_sha256` in config, then a
/// restart) ends the console sessions the old token opened: a leaked token
/// rotated away does not live on in a browser for the session's 8 hours.
#[tokio::test]
async fn a_rotated_operator_token_ends_the_console_sessions_it_opened() {
    let mut b = TestBroker::start().await;
    let console = ConsoleClient::sign_in(&b, &b.ops.admin).await;
    assert_eq!(console.get(&b, "/ui").await, (200, None));
    // A restart alone keeps it.
    b.restart().await;
    assert_eq!(console.get(&b, "/ui").await, (200, None));

    let path = b.dir.join("keygate.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let old = common::config::sha256_hex(&b.ops.admin);
    assert!(config.contains(&old), "the admin's token hash is in config");
    let rotated = config.replace(
        &old,
        &common::config::sha256_hex("kgop-rotated-admin-token"),
    );
    std::fs::write(&path, rotated).unwrap();
    b.restart().await;
    let (status, location) = console.get(&b, "/ui").await;
    assert_eq!(status, 303);
    assert!(
        location
            .as_deref()
            .unwrap_or_default()
            .starts_with("/ui/login"),
        "{location:?}"
    );
    // The new token signs in.
    let again = ConsoleClient::sign_in(&b, "kgop-rotated-admin-token").await;
    assert_eq!(again.get(&b, "/ui").await, (200, None));
}
