//! Tasks acting on behalf of a user: the user comes from a verified ID token
//! (a real OIDC issuer, `oauth2-mock-server`) or is asserted by an agent an
//! admin allowed to; a credential needs both the agent and the user to be
//! permitted (effective = agent ∩ user), and every audit event of the task
//! names the user.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::oidc::OidcIssuer;
use common::{Resp, Setup, TestAgent, TestBroker};
use serde_json::{Value, json};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

const USER_POLICIES: &str = r#"
@id("engineers-get-x509")
permit (
  principal in Keygate::Group::"corp-sso/engineering",
  action == Keygate::Action::"request_credential_for_user",
  resource == Keygate::Scope::"x509-svid"
);

@id("carol-gets-x509")
permit (
  principal == Keygate::User::"asserted/carol@example.com",
  action == Keygate::Action::"request_credential_for_user",
  resource == Keygate::Scope::"x509-svid"
);
"#;

async fn start() -> (TestBroker, OidcIssuer) {
    let (b, sso, _) = start_with(false).await;
    (b, sso)
}

/// With `second`, a second users' issuer `other-sso` is trusted too.
async fn start_with(second: bool) -> (TestBroker, OidcIssuer, Option<OidcIssuer>) {
    let sso = OidcIssuer::start().await;
    let other = if second {
        Some(OidcIssuer::start().await)
    } else {
        None
    };
    let users = |name: &str, issuer: &str| {
        format!(
            "[[federation.issuers]]\nname = \"{name}\"\nissuer = \"{issuer}\"\naudience = \"keygate\"\nusers = true\n"
        )
    };
    let mut extra = users("corp-sso", &sso.issuer);
    if let Some(o) = &other {
        extra.push_str(&users("other-sso", &o.issuer));
    }
    let b = TestBroker::start_with(Setup {
        policies: vec![("users.cedar".into(), USER_POLICIES.into())],
        extra_config: extra,
        ..Setup::default()
    })
    .await;
    (b, sso, other)
}

async fn user_token(sso: &OidcIssuer, sub: &str, groups: Value) -> String {
    sso.mint(&json!({ "sub": sub, "aud": "keygate", "groups": groups }))
        .await
}

/// Opens a task for `agent` with extra form fields.
async fn open(b: &TestBroker, agent: &TestAgent, extra: &[(&str, &str)]) -> Resp {
    let assertion = agent.assertion();
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", agent.id.as_str()),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion.as_str()),
        ("task", "on behalf of a user"),
    ];
    form.extend_from_slice(extra);
    b.token_form(&form).await
}

fn token(v: &Value) -> String {
    v["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_credential_needs_both_the_agent_and_the_user() {
    let (b, sso) = start().await;
    let agent = TestAgent::new("assistant", "ES256");
    b.register(&agent, "platform").await;

    // Alice (engineering) through her ID token: x509 yes, jwt-svid no — the
    // agent alone could have both.
    let alice = user_token(&sso, "alice@example.com", json!(["engineering"])).await;
    let v = open(&b, &agent, &[("user_token", &alice)])
        .await
        .expect(200);
    let s = token(&v);
    let task = v["task_id"].as_str().unwrap().to_owned();
    b.x509(&s, Some(300)).await;
    let r = b.credential(&s, "jwt-svid", None, None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.json()["error"], "policy_denied");
    assert!(
        r.text.contains("acts for user `alice@example.com`"),
        "{}",
        r.text
    );

    let events = b.audit(&format!("task={task}")).await;
    assert!(events.len() >= 4, "{events:?}");
    for e in &events {
        assert_eq!(e["on_behalf_of"], "alice@example.com", "{e}");
    }
    let granted = events
        .iter()
        .find(|e| e["action"] == "credential.requested" && e["outcome"] == "success")
        .unwrap();
    assert!(
        granted["policy_ids"]
            .as_array()
            .unwrap()
            .contains(&json!("engineers-get-x509"))
    );

    let i = b
        .http
        .post(b.url("/oauth/introspect"))
        .bearer_auth(&b.ops.admin)
        .form(&[("token", s.as_str())])
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(i["on_behalf_of"]["sub"], "alice@example.com");

    // Bob is in no permitted group: nothing, though the agent may.
    let bob = user_token(&sso, "bob@example.com", json!([])).await;
    let s = token(&open(&b, &agent, &[("user_token", &bob)]).await.expect(200));
    let r = b.credential(&s, "x509-svid", None, None).await;
    assert_eq!(r.status, 403, "{}", r.text);

    // Without a user, the agent's own policy decides.
    let s = b.token(&agent).await;
    b.jwt_svid(&s.token, None).await;

    // The audit chain, with the new field, still verifies.
    let out = b.cli(&["audit", "verify"], Some(&b.ops.auditor)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn asserted_users_need_the_agent_to_be_allowed_and_bad_user_tokens_fail() {
    let (b, sso) = start().await;
    let plain = TestAgent::new("plain", "ES256");
    b.register(&plain, "platform").await;
    let r = open(&b, &plain, &[("on_behalf_of", "carol@example.com")]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("may not assert"), "{}", r.text);

    let trusted = TestAgent::new("frontdoor", "ES256");
    let mut spec = trusted.spec("platform");
    spec["may_assert_users"] = json!(true);
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let s = token(
        &open(&b, &trusted, &[("on_behalf_of", "carol@example.com")])
            .await
            .expect(200),
    );
    b.x509(&s, Some(300)).await;
    let s = token(
        &open(&b, &trusted, &[("on_behalf_of", "mallory@example.com")])
            .await
            .expect(200),
    );
    assert_eq!(b.credential(&s, "x509-svid", None, None).await.status, 403);

    // Both forms at once, a wrong audience, and a user token used as a
    // workload identity are refused.
    let alice = user_token(&sso, "alice@example.com", json!(["engineering"])).await;
    let r = open(
        &b,
        &trusted,
        &[("user_token", &alice), ("on_behalf_of", "x")],
    )
    .await;
    assert_eq!(r.json()["error"], "invalid_request", "{}", r.text);
    let wrong_aud = sso
        .mint(&json!({ "sub": "alice@example.com", "aud": "someone-else" }))
        .await;
    let r = open(&b, &trusted, &[("user_token", &wrong_aud)]).await;
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    let r = b
        .token_form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", &alice),
        ])
        .await;
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    assert!(r.text.contains("vouches for users"), "{}", r.text);
}

#[tokio::test]
async fn user_tokens_are_namespaced_single_use_addressed_and_bound_in_time() {
    let (b, sso, other) = start_with(true).await;
    let other = other.unwrap();
    let agent = TestAgent::new("assistant", "ES256");
    b.register(&agent, "platform").await;

    // Another issuer's "engineering" is not corp-sso's.
    let impostor = user_token(&other, "alice@example.com", json!(["engineering"])).await;
    let s = token(
        &open(&b, &agent, &[("user_token", &impostor)])
            .await
            .expect(200),
    );
    let r = b.credential(&s, "x509-svid", None, None).await;
    assert_eq!(r.status, 403, "{}", r.text);

    // A user token opens one task; the same token again is a replay.
    let alice = user_token(&sso, "alice@example.com", json!(["engineering"])).await;
    let s = token(
        &open(&b, &agent, &[("user_token", &alice)])
            .await
            .expect(200),
    );
    b.x509(&s, Some(60)).await;
    let r = open(&b, &agent, &[("user_token", &alice)]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant");
    assert!(r.text.contains("already used"), "{}", r.text);
    let thief = TestAgent::new("thief", "ES256");
    b.register(&thief, "platform").await;
    let r = open(&b, &thief, &[("user_token", &alice)]).await;
    assert_eq!(r.status, 400, "another agent cannot replay it: {}", r.text);

    // Issued to another client (`azp`): refused; to this broker or to the
    // presenting agent: accepted.
    let mint = |azp: &str| {
        let claims = json!({
            "sub": "alice@example.com", "aud": "keygate", "azp": azp, "groups": ["engineering"],
        });
        let sso = &sso;
        async move { sso.mint(&claims).await }
    };
    let elsewhere = mint("some-other-app").await;
    let r = open(&b, &agent, &[("user_token", &elsewhere)]).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("azp"), "{}", r.text);
    open(&b, &agent, &[("user_token", &mint("keygate").await)])
        .await
        .expect(200);
    open(&b, &agent, &[("user_token", &mint(&agent.id).await)])
        .await
        .expect(200);

    // The task ends when the user token does.
    let soon = sso
        .mint(&json!({
            "sub": "alice@example.com", "aud": "keygate", "groups": ["engineering"],
            "exp": common::unix_now() + 120,
        }))
        .await;
    let v = open(&b, &agent, &[("user_token", &soon), ("ttl", "3600")])
        .await
        .expect(200);
    let expires_in = v["expires_in"].as_i64().unwrap();
    assert!(expires_in <= 120, "{v}");
}

/// A sub-agent's delegated task acts for the same user as its parent: its
/// credentials need the user to be permitted too, its audit events and its
/// introspection name the user, and it cannot shed the user by delegating.
#[tokio::test]
async fn sub_agents_of_a_task_act_for_the_same_user() {
    const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
    let (b, sso) = start().await;
    let orch = TestAgent::new("assistant", "ES256");
    let sub = TestAgent::new("helper", "EdDSA");
    let mut spec = orch.spec("platform");
    spec["delegation"] = json!({ "max_depth": 1, "targets": [sub.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    b.register(&sub, "platform").await;
    let delegate = |parent: String| {
        let (b, sub) = (&b, &sub);
        async move {
            let assertion = sub.assertion();
            b.token_form(&[
                ("grant_type", EXCHANGE),
                ("subject_token", parent.as_str()),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                ),
                ("actor_token", assertion.as_str()),
                ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ])
            .await
        }
    };
    // The sub-agent alone may hold both scopes (the shipped policies).
    let own = b.token(&sub).await;
    b.jwt_svid(&own.token, None).await;

    // Alice's task, delegated: x509 (Alice may), not jwt-svid (she may not).
    let alice = user_token(&sso, "alice@example.com", json!(["engineering"])).await;
    let parent = token(&open(&b, &orch, &[("user_token", &alice)]).await.expect(200));
    let v = delegate(parent).await.expect(200);
    let child = token(&v);
    let child_task = v["task_id"].as_str().unwrap().to_owned();
    b.x509(&child, Some(60)).await;
    let r = b.credential(&child, "jwt-svid", None, None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.text.contains("acts for user `alice@example.com`"),
        "{}",
        r.text
    );
    let i = b
        .http
        .post(b.url("/oauth/introspect"))
        .bearer_auth(&b.ops.admin)
        .form(&[("token", child.as_str())])
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["on_behalf_of"]["sub"], "alice@example.com", "{i}");
    let events = b.audit(&format!("task={child_task}")).await;
    assert!(events.len() >= 2, "{events:?}");
    for e in &events {
        assert_eq!(e["on_behalf_of"], "alice@example.com", "{e}");
    }

    // Bob may hold nothing; neither may a sub-agent acting for him.
    let bob = user_token(&sso, "bob@example.com", json!([])).await;
    let parent = token(&open(&b, &orch, &[("user_token", &bob)]).await.expect(200));
    let child = token(&delegate(parent).await.expect(200));
    let r = b.credential(&child, "x509-svid", None, None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.text.contains("acts for user `bob@example.com`"),
        "{}",
        r.text
    );
}
