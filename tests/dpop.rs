//! DPoP (RFC 9449) through the real server: a token bound to the agent's key
//! is useless without a fresh proof by that key for the exact method and URL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

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
    token_with_proof(b, agent, &proof(dpop_key, "POST", "/oauth/token", None))
        .await
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
        // From the future, past the clock skew allowed.
        (
            proof_with(
                &agent,
                json!({ "htm": "GET", "htu": format!("{ISSUER}/v1/session"), "iat": unix_now() + 600 }),
                Some(&token),
            ),
            "`iat`",
        ),
        // A JWT that is not a DPoP proof (`typ` is not `dpop+jwt`).
        (
            {
                let mut header = Header::new(Algorithm::ES256);
                header.typ = Some("JWT".into());
                let mut jwk = agent.jwk.clone();
                jwk.as_object_mut().unwrap().remove("kid");
                header.jwk = Some(serde_json::from_value(jwk).unwrap());
                agent.sign_with(
                    &header,
                    &json!({
                        "jti": uuid::Uuid::new_v4().to_string(), "iat": unix_now(),
                        "htm": "GET", "htu": format!("{ISSUER}/v1/session"),
                    }),
                )
            },
            "typ",
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

/// The token endpoint's answer to a DPoP proof, with a valid assertion.
async fn token_with_proof(b: &TestBroker, agent: &TestAgent, proof: &str) -> Resp {
    let assertion = agent.assertion();
    let r = b
        .http
        .post(b.url("/oauth/token"))
        .header("dpop", proof)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", agent.id.as_str()),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
        .unwrap();
    Resp {
        status: r.status(),
        text: r.text().await.unwrap(),
    }
}

#[tokio::test]
async fn introspection_challenges_and_proof_keys_follow_rfc_9449() {
    use base64::Engine;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let b = TestBroker::start().await;
    let agent = TestAgent::new("dpopi", "ES256");
    b.register(&agent, "platform").await;
    let v = bound_token(&b, &agent, &agent).await;
    let token = v["access_token"].as_str().unwrap().to_owned();

    // Introspection names the binding a resource server must check (§6.2).
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let i = b.introspect(&token).await;
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["token_type"], "DPoP", "{i}");
    assert_eq!(i["cnf"]["jkt"], claims["cnf"]["jkt"], "{i}");
    let plain = b.token(&agent).await;
    let i = b.introspect(&plain.token).await;
    assert_eq!(
        (i["token_type"].as_str(), i.get("cnf")),
        (Some("Bearer"), None),
        "{i}"
    );

    // A 401 for a DPoP-bound token challenges with the DPoP scheme (§7.1).
    let r = b
        .http
        .get(b.url("/v1/session"))
        .header("authorization", format!("DPoP {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("DPoP "), "{challenge}");
    assert!(challenge.contains("algs="), "{challenge}");
    let r = b
        .http
        .get(b.url("/v1/session"))
        .bearer_auth(&plain.token[..plain.token.len() - 2])
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );

    // A proof whose `jwk` carries the private key is refused (§4.3).
    let mut jwk = agent.jwk.clone();
    jwk.as_object_mut().unwrap().remove("kid");
    jwk["d"] = json!("c2VjcmV0LXByaXZhdGUta2V5LW1hdGVyaWFsLWhlcmUtMzI");
    let header = json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": jwk });
    let body = json!({
        "jti": uuid::Uuid::new_v4().to_string(), "iat": unix_now(),
        "htm": "POST", "htu": format!("{ISSUER}/oauth/token"),
    });
    let private = format!("{}.{}.AAAA", b64(&header), b64(&body));
    let r = token_with_proof(&b, &agent, &private).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("private key"), "{}", r.text);
    assert!(
        !r.text.contains("c2VjcmV0"),
        "the key is not echoed: {}",
        r.text
    );

    // An `iat` at the end of the range is refused, not an overflow.
    for iat in [i64::MIN, i64::MAX] {
        let p = proof_with(
            &agent,
            json!({ "htm": "POST", "htu": format!("{ISSUER}/oauth/token"), "iat": iat }),
            None,
        );
        let r = token_with_proof(&b, &agent, &p).await;
        assert_eq!(r.status, 400, "iat {iat}: {}", r.text);
        assert!(r.text.contains("`iat`"), "{}", r.text);
    }
}
