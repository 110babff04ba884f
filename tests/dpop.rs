//! DPoP (RFC 9449) through the real server: a token bound to the agent's key
//! is useless without a fresh proof by that key for the exact method and URL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{ISSUER, JWT_BEARER, Resp, TestAgent, TestBroker, unix_now};
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Value, json};

/// A DPoP proof by `key`'s key for `method` `path`, over `token` if given.
fn proof(key: &TestAgent, method: &str, path: &str, token: Option<&str>) -> String {
    proof_with(
        key,
        json!({ "htm": method, "htu": format!("{ISSUER}{path}") }),
        token,
    )
}

fn proof_with(key: &TestAgent, claims: Value, token: Option<&str>) -> String {
    use base64::Engine;
    use sha2::Digest;
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("dpop+jwt".into());
    let mut jwk = key.jwk.clone();
    jwk.as_object_mut().unwrap().remove("kid");
    header.jwk = Some(serde_json::from_value(jwk).unwrap());
    let mut c = json!({ "jti": uuid::Uuid::new_v4().to_string(), "iat": unix_now() });
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    if let Some(t) = token {
        c["ath"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(t.as_bytes()))
            .into();
    }
    key.sign_with(&header, &c)
}

async fn bound_token(b: &TestBroker, agent: &TestAgent, dpop_key: &TestAgent) -> Value {
    let assertion = agent.assertion();
    let resp = b
        .http
        .post(b.url("/oauth/token"))
        .header("dpop", proof(dpop_key, "POST", "/oauth/token", None))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", agent.id.as_str()),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status();
    Resp {
        status,
        text: resp.text().await.unwrap(),
    }
    .expect(200)
}

async fn call(b: &TestBroker, scheme: &str, token: &str, dpop: Option<String>) -> Resp {
    let mut rb = b
        .http
        .get(b.url("/v1/session"))
        .header("authorization", format!("{scheme} {token}"));
    if let Some(p) = dpop {
        rb = rb.header("dpop", p);
    }
    let resp = rb.send().await.unwrap();
    Resp {
        status: resp.status(),
        text: resp.text().await.unwrap(),
    }
}

#[tokio::test]
async fn a_dpop_bound_token_needs_a_fresh_proof_by_its_key() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("dpop", "ES256");
    b.register(&agent, "platform").await;
    let v = bound_token(&b, &agent, &agent).await;
    assert_eq!(v["token_type"], "DPoP");
    let token = v["access_token"].as_str().unwrap().to_owned();

    // With a fresh proof: accepted.
    let p = proof(&agent, "GET", "/v1/session", Some(&token));
    call(&b, "DPoP", &token, Some(p.clone())).await.expect(200);
    // The same proof again: replay.
    let r = call(&b, "DPoP", &token, Some(p)).await;
    assert_eq!(r.status, 401);
    assert!(r.text.contains("replayed"), "{}", r.text);
    // The token alone, as DPoP or as Bearer: useless.
    let r = call(&b, "DPoP", &token, None).await;
    assert_eq!(r.status, 401);
    assert!(r.text.contains("proof header is required"), "{}", r.text);
    let r = call(&b, "Bearer", &token, None).await;
    assert_eq!(r.status, 401);
    assert!(r.text.contains("bound to a DPoP key"), "{}", r.text);
    // Wrong method, wrong URL, no `ath`, stale, another key.
    let cases = [
        (proof(&agent, "POST", "/v1/session", Some(&token)), "`htm`"),
        (proof(&agent, "GET", "/v1/leases", Some(&token)), "`htu`"),
        (proof(&agent, "GET", "/v1/session", None), "`ath`"),
        (
            proof_with(
                &agent,
                json!({ "htm": "GET", "htu": format!("{ISSUER}/v1/session"), "iat": unix_now() - 600 }),
                Some(&token),
            ),
            "`iat`",
        ),
        (
            proof(
                &TestAgent::new("thief", "ES256"),
                "GET",
                "/v1/session",
                Some(&token),
            ),
            "another key",
        ),
    ];
    for (p, why) in cases {
        let r = call(&b, "DPoP", &token, Some(p)).await;
        assert_eq!(r.status, 401, "{why}: {}", r.text);
        assert!(r.text.contains(why), "want {why}: {}", r.text);
    }

    // An unbound token sent with the DPoP scheme is refused too.
    let plain = b.token(&agent).await;
    let r = call(&b, "DPoP", &plain.token, None).await;
    assert_eq!(r.status, 401);
    // A bad proof at the token endpoint is a clear OAuth error.
    let assertion = agent.assertion();
    let r = b
        .http
        .post(b.url("/oauth/token"))
        .header("dpop", proof(&agent, "POST", "/oauth/wrong", None))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", agent.id.as_str()),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_dpop_proof", "{body}");
}
