//! Every way `/oauth/token` must refuse, each with its RFC 6749 error code,
//! and each refusal audited as an `auth.token` failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{JWT_BEARER, Resp, TestAgent, TestBroker, unix_now};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Asserts the refusal and that it was audited as the latest `auth.token`
/// failure, naming the claimed client.
/// The audited reason is the answer's, or its start when the log cut a
/// long one (`…[N bytes, sha256 …]`).
fn same_reason(audited: &Value, want: &str) -> bool {
    let audited = audited.as_str().unwrap_or_default();
    match audited.split_once("…[") {
        Some((start, _)) => start.len() >= 40 && want.starts_with(start),
        None => audited == want,
    }
}

/// Failure events seen so far, per broker (tests run in parallel).
static SEEN: std::sync::Mutex<std::collections::BTreeMap<std::net::SocketAddr, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

async fn refused(
    b: &TestBroker,
    resp: Resp,
    status: u16,
    error: &str,
    client: Option<&str>,
    case: &str,
) {
    assert_eq!(resp.status.as_u16(), status, "{case}: {}", resp.text);
    let body = resp.json();
    assert_eq!(body["error"], error, "{case}: {body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{case}"
    );
    assert!(body.get("access_token").is_none(), "{case}");
    // The refusal is audited with its own reason: as a new event, or — a
    // repeat of a kind already audited for this client and source in the
    // interval — counted into that kind's burst (`auth.token_failures`
    // when the interval ends), never by reading an earlier case's event.
    let want = format!("{error}: {}", body["error_description"].as_str().unwrap());
    let failures: Vec<Value> = b
        .audit("action=auth.token")
        .await
        .into_iter()
        .filter(|e| e["outcome"] == "failure")
        .collect();
    let before = {
        let mut seen = SEEN.lock().unwrap();
        let n = seen.entry(b.addr).or_default();
        std::mem::replace(n, failures.len())
    };
    let event = if failures.len() == before + 1 {
        failures.last().unwrap()
    } else {
        assert_eq!(failures.len(), before, "{case}: {failures:?}");
        failures
            .iter()
            .find(|e| same_reason(&e["reason"], &want) && e["agent"].as_str() == client)
            .unwrap_or_else(|| panic!("{case}: no event, and no earlier one of its kind `{want}`"))
    };
    assert!(
        same_reason(&event["reason"], &want),
        "{case}: {event} is not `{want}`"
    );
    assert_eq!(event["agent"].as_str(), client, "{case}: {event}");
    match client {
        Some(c) => assert_eq!(event["actor"], format!("unauthenticated:{c}"), "{case}"),
        None => assert_eq!(event["actor"], "unauthenticated", "{case}"),
    }
}

fn with(agent: &TestAgent, f: impl FnOnce(&mut Value)) -> Value {
    let mut claims = agent.claims();
    f(&mut claims);
    claims
}

fn unsigned(claims: &Value) -> String {
    let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = B64.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{body}.")
}

#[tokio::test]
async fn bad_assertions_are_invalid_client() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("oauth", "ES256");
    b.register(&agent, "platform").await;
    let id = agent.id.as_str();
    let now = unix_now();

    let mut cases: Vec<(&str, String)> = vec![("alg none", unsigned(&agent.claims()))];
    // Algorithm confusion: HS256 keyed with the agent's public key.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(agent.kid.clone());
    let public = serde_json::to_vec(&agent.jwk).unwrap();
    let confused =
        jsonwebtoken::encode(&hs, &agent.claims(), &EncodingKey::from_secret(&public)).unwrap();
    cases.push(("hs256 with the public key", confused));
    let x = B64.decode(agent.jwk["x"].as_str().unwrap()).unwrap();
    let confused_raw =
        jsonwebtoken::encode(&hs, &agent.claims(), &EncodingKey::from_secret(&x)).unwrap();
    cases.push(("hs256 with the raw public x", confused_raw));
    let mut unknown_kid = agent.header();
    unknown_kid.kid = Some("not-a-registered-kid".into());
    cases.push((
        "unknown kid",
        agent.sign_with(&unknown_kid, &agent.claims()),
    ));
    cases.push((
        "wrong aud",
        agent.sign(&with(&agent, |c| c["aud"] = "https://evil.test".into())),
    ));
    cases.push((
        "expired",
        agent.sign(&with(&agent, |c| {
            c["iat"] = (now - 600).into();
            c["exp"] = (now - 120).into();
        })),
    ));
    cases.push((
        "exp too far ahead",
        agent.sign(&with(&agent, |c| c["exp"] = (now + 3600).into())),
    ));
    cases.push((
        "exp just past the 5 min cap",
        agent.sign(&with(&agent, |c| c["exp"] = (now + 400).into())),
    ));
    cases.push((
        "nbf in the future",
        agent.sign(&with(&agent, |c| c["nbf"] = (now + 120).into())),
    ));
    cases.push((
        "iat in the future",
        agent.sign(&with(&agent, |c| c["iat"] = (now + 120).into())),
    ));
    cases.push((
        "missing jti",
        agent.sign(&with(&agent, |c| {
            _ = c.as_object_mut().unwrap().remove("jti")
        })),
    ));
    cases.push((
        "empty jti",
        agent.sign(&with(&agent, |c| c["jti"] = "".into())),
    ));
    cases.push((
        "missing exp",
        agent.sign(&with(&agent, |c| {
            _ = c.as_object_mut().unwrap().remove("exp")
        })),
    ));
    cases.push((
        "wrong iss",
        agent.sign(&with(&agent, |c| c["iss"] = "someone-else".into())),
    ));
    cases.push((
        "wrong sub",
        agent.sign(&with(&agent, |c| c["sub"] = "someone-else".into())),
    ));
    let intruder = TestAgent::new("intruder", "ES256");
    let mut stolen_kid = intruder.header();
    stolen_kid.kid = Some(agent.kid.clone());
    cases.push((
        "signed by another key",
        intruder.sign_with(&stolen_kid, &agent.claims()),
    ));
    let mut no_kid = intruder.header();
    no_kid.kid = None;
    cases.push((
        "another key, no kid",
        intruder.sign_with(&no_kid, &agent.claims()),
    ));
    let ed = TestAgent::new("intruder-ed", "EdDSA");
    let mut ed_header = ed.header();
    ed_header.kid = Some(agent.kid.clone());
    cases.push((
        "alg does not match the key",
        ed.sign_with(&ed_header, &agent.claims()),
    ));
    cases.push(("garbage", "not.a.jwt".into()));

    for (case, assertion) in &cases {
        let resp = b.token_with_assertion(id, assertion).await;
        refused(&b, resp, 401, "invalid_client", Some(id), case).await;
    }
    // Each distinct refusal is audited at once; one repeated with the same
    // reason is counted, and its count audited when the interval ends.
    let failures = b.audit("action=auth.token").await;
    let mut reasons: Vec<&str> = failures
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    let distinct = reasons.len();
    reasons.dedup();
    assert_eq!(reasons.len(), distinct, "a reason audited twice at once");
    common::eventually("every refusal accounted for", || async {
        let counted: usize = b
            .audit("action=auth.token_failures")
            .await
            .iter()
            .map(|e| e["details"]["count"].as_u64().unwrap() as usize)
            .sum();
        (distinct + counted == cases.len()).then_some(())
    })
    .await;

    // A valid assertion still works, once.
    let good = agent.assertion();
    let first = b.token_with_assertion(id, &good).await;
    first.expect(200);
    let replay = b.token_with_assertion(id, &good).await;
    refused(&b, replay, 401, "invalid_client", Some(id), "replayed jti").await;
    // The token endpoint itself may be the audience too.
    let issuer_aud = agent.sign(&with(&agent, |c| c["aud"] = common::ISSUER.into()));
    b.token_with_assertion(id, &issuer_aud).await.expect(200);
}

#[tokio::test]
async fn suspended_decommissioned_and_unknown_clients() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("oauth-status", "EdDSA");
    b.register(&agent, "platform").await;
    let id = agent.id.as_str();

    b.admin_post(
        &format!("/v1/agents/{id}/suspend"),
        &json!({ "reason": "test" }),
    )
    .await
    .expect(200);
    let resp = b.token_with_assertion(id, &agent.assertion()).await;
    refused(&b, resp, 401, "invalid_client", Some(id), "suspended").await;

    b.admin_post(&format!("/v1/agents/{id}/resume"), &json!({}))
        .await
        .expect(200);
    b.token_with_assertion(id, &agent.assertion())
        .await
        .expect(200);

    b.admin_post(&format!("/v1/agents/{id}/decommission"), &json!({}))
        .await
        .expect(200);
    let resp = b.token_with_assertion(id, &agent.assertion()).await;
    refused(&b, resp, 401, "invalid_client", Some(id), "decommissioned").await;
    let again = b
        .admin_post(&format!("/v1/agents/{id}/resume"), &json!({}))
        .await;
    assert_eq!(again.status, 409, "decommissioned is final: {}", again.text);

    let stranger = TestAgent::new("stranger", "ES256");
    let resp = b
        .token_with_assertion(&stranger.id, &stranger.assertion())
        .await;
    refused(
        &b,
        resp,
        401,
        "invalid_client",
        Some(&stranger.id),
        "unknown client",
    )
    .await;
}

#[tokio::test]
async fn malformed_requests() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("oauth-form", "ES256");
    b.register(&agent, "platform").await;
    let id = agent.id.as_str();
    let a = agent.assertion();

    let form = |grant: &'static str, kind: &'static str| {
        vec![
            ("grant_type", grant),
            ("client_id", id),
            ("client_assertion_type", kind),
            ("client_assertion", a.as_str()),
        ]
    };
    let resp = b.token_form(&form("password", JWT_BEARER)).await;
    refused(
        &b,
        resp,
        400,
        "unsupported_grant_type",
        Some(id),
        "wrong grant_type",
    )
    .await;
    let resp = b.token_form(&form("authorization_code", JWT_BEARER)).await;
    refused(
        &b,
        resp,
        400,
        "unsupported_grant_type",
        Some(id),
        "authorization_code",
    )
    .await;
    let resp = b
        .token_form(&form(
            "client_credentials",
            "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
        ))
        .await;
    refused(
        &b,
        resp,
        401,
        "invalid_client",
        Some(id),
        "wrong client_assertion_type",
    )
    .await;

    let resp = b
        .token_form(&[
            ("client_id", id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &a),
        ])
        .await;
    refused(&b, resp, 400, "invalid_request", Some(id), "no grant_type").await;
    let resp = b
        .token_form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &a),
        ])
        .await;
    refused(&b, resp, 400, "invalid_request", None, "no client_id").await;
    let resp = b
        .token_form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_assertion_type", JWT_BEARER),
        ])
        .await;
    refused(
        &b,
        resp,
        401,
        "invalid_client",
        Some(id),
        "no client_assertion",
    )
    .await;
    let mut bad_ttl = form("client_credentials", JWT_BEARER);
    bad_ttl.push(("ttl", "soon"));
    let resp = b.token_form(&bad_ttl).await;
    refused(
        &b,
        resp,
        400,
        "invalid_request",
        Some(id),
        "ttl not a number",
    )
    .await;

    // Not a form at all: refused before any client is named. The extractor
    // rejects these, so they are not audited; status and code are the contract.
    let json_body = b
        .http
        .post(b.url("/oauth/token"))
        .json(&json!({ "grant_type": "client_credentials", "client_id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(json_body.status(), 400);
    let v: Value = json_body.json().await.unwrap();
    assert_eq!(v["error"], "invalid_request");
    for (content_type, body) in [
        (
            "application/x-www-form-urlencoded",
            "grant_type=client_credentials&grant_type=password",
        ),
        ("text/plain", "grant_type=client_credentials"),
    ] {
        let resp = b
            .http
            .post(b.url("/oauth/token"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{content_type}: {body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "invalid_request", "{content_type}: {body}");
    }
    // The valid assertion was never consumed by the refusals above.
    b.token_with_assertion(id, &a).await.expect(200);
}
