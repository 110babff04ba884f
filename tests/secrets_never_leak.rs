//! No secret byte reaches the log, the audit trail or the database: issue and
//! revoke every kind of credential, then search all three for each secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use common::at_rest::contains;

use common::{TestAgent, TestBroker};
use serde_json::json;

/// The base64 lines of a PEM body: each one alone identifies the key.
fn pem_body_lines(pem: &str) -> Vec<String> {
    let lines: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect();
    assert!(!lines.is_empty(), "not a PEM: {pem}");
    lines
}

/// A JWT and its signature segment (which no other value can contain).
fn jwt_parts(token: &str) -> Vec<String> {
    let sig = token.rsplit('.').next().unwrap();
    assert!(sig.len() >= 40, "a signed JWT");
    vec![token.to_owned(), sig.to_owned()]
}

#[tokio::test]
async fn secrets_stay_out_of_logs_audit_and_database() {
    let b = TestBroker::start().await;
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut add = |what: &str, values: Vec<String>| {
        for v in values {
            secrets.push((what.to_owned(), v));
        }
    };
    add(
        "operator token",
        vec![
            b.ops.admin.clone(),
            b.ops.secops.clone(),
            b.ops.auditor.clone(),
            b.ops.approver.clone(),
        ],
    );

    let agents = [
        TestAgent::new("secret-es", "ES256"),
        TestAgent::new("secret-ed", "EdDSA"),
    ];
    let mut public = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        add("agent private key", pem_body_lines(&agent.pem));
        b.register(agent, "platform").await;
        let s = b.token(agent).await;
        add("session token", jwt_parts(&s.token));
        let x509 = b.x509(&s.token, Some(300)).await;
        add(
            "x509-svid private key",
            pem_body_lines(x509["credential"]["private_key"].as_str().unwrap()),
        );
        let jwt = b.jwt_svid(&s.token, Some(300)).await;
        add(
            "jwt-svid",
            jwt_parts(jwt["credential"]["token"].as_str().unwrap()),
        );
        public.push(x509["lease_id"].as_str().unwrap().to_owned());
        public.push(x509["credential"]["serial"].as_str().unwrap().to_owned());
        // Release one, then end the task one way or the other.
        let id = x509["lease_id"].as_str().unwrap();
        b.call(
            reqwest::Method::DELETE,
            &format!("/v1/credentials/{id}"),
            Some(&s.token),
            None,
        )
        .await
        .expect(200);
        if i == 0 {
            b.complete(&s.token).await.expect(200);
        } else {
            let body = json!({ "agent": agent.id, "reason": "leak test" });
            b.post("/v1/revocations", Some(&b.ops.secops), &body)
                .await
                .expect(200);
        }
        // A refused token request carrying a real signature, and a call with a
        // dead session token, both get logged and audited.
        let mut claims = agent.claims();
        claims["aud"] = "https://wrong.test".into();
        let bad = agent.sign(&claims);
        add("refused assertion", jwt_parts(&bad));
        assert_eq!(b.token_with_assertion(&agent.id, &bad).await.status, 401);
        assert_eq!(b.get("/v1/session", Some(&s.token)).await.status, 401);
    }
    // A wrong operator token is audited as a failure; a right one is used.
    let wrong = format!("kgop-wrong-{}", uuid::Uuid::new_v4().simple());
    add("wrong operator token", vec![wrong.clone()]);
    assert_eq!(b.get("/v1/leases", Some(&wrong)).await.status, 401);

    let audit = b.audit("").await;
    let audit_text = audit
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let mut places: Vec<(&str, Vec<u8>)> = vec![("audit api", audit_text.into_bytes())];
    // Read the database while the server runs (the WAL holds recent pages),
    // then again after a crash, with whatever is left in the WAL.
    let mut b = b;
    for when in ["running", "after kill -9"] {
        if when != "running" {
            b.kill().await;
        }
        for p in b.store_at_rest().await {
            places.push((p.name, p.bytes));
        }
    }
    places.push(("server log", b.log().into_bytes()));

    // The places are the right ones: each kind holds the public facts.
    for fact in &public {
        for kind in ["audit", "store", "server log"] {
            let found = places
                .iter()
                .filter(|(p, _)| p.starts_with(kind))
                .any(|(_, bytes)| contains(bytes, fact.as_bytes()));
            assert!(found, "{fact} is recorded in the {kind}");
        }
    }
    assert!(b.log().contains("revoked"), "the log has the revocations");
    assert!(audit.iter().any(|e| e["action"] == "lease.revoked"));
    assert!(audit.iter().any(|e| e["action"] == "operator.auth"));

    for (what, secret) in &secrets {
        for (place, bytes) in &places {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "{what} leaked into the {place}: {secret}"
            );
        }
    }
}
