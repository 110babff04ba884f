//! mTLS and Keygate's own revocations: an X.509-SVID the local CA revoked
//! (released, its task ended) no longer logs in, and a session it opened
//! stops working with it; that holds across a rotation of the CA; and a
//! revocation list that cannot be read refuses retryably.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use crate::mtls::{World, start_trusting, svid_client, token};

use common::{TRUST_DOMAIN, TestAgent};
use serde_json::json;

/// An agent bound to its SPIFFE ID (it keeps its key too, to open the task
/// its X.509-SVIDs are issued in), and that task.
async fn svid_agent(w: &World, prefix: &str) -> (TestAgent, common::Session) {
    let agent = TestAgent::new(prefix, "ES256");
    let mut spec = agent.spec("platform");
    spec["federated"] = json!({
        "issuer": "spiffe",
        "subject": format!("spiffe://{TRUST_DOMAIN}/agent/{}", agent.id),
    });
    w.b.admin_post("/v1/agents", &spec).await.expect(201);
    let s = w.b.token(&agent).await;
    (agent, s)
}

/// `token`'s session releases `lease`.
async fn release(w: &World, lease: &str, token: &str) -> common::Resp {
    w.b.call(
        reqwest::Method::DELETE,
        &format!("/v1/credentials/{lease}"),
        Some(token),
        None,
    )
    .await
}

#[tokio::test]
async fn a_certificate_keygate_revoked_no_longer_authenticates() {
    // The mTLS listener trusts the broker's own CA: its X.509-SVIDs log in.
    let w = start_trusting(Some("ca/ca-cert.pem")).await;
    let (agent, s) = svid_agent(&w, "revsvid").await;
    let cred = w.b.x509(&s.token, Some(600)).await;
    let c = svid_client(&w, &cred);
    let (status, v) = token(&c, &w, &agent.id).await.unwrap();
    assert_eq!(status, 200, "a live SVID logs in: {v}");

    // Released: on the CA's revocation list, and refused at the door.
    let lease = cred["lease_id"].as_str().unwrap();
    let r = release(&w, lease, &s.token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(w.b.lease_state(lease).await, "revoked");
    let (status, v) = token(&svid_client(&w, &cred), &w, &agent.id).await.unwrap();
    assert_eq!(status, 401, "a revoked SVID must not open a task: {v}");
    assert!(
        v["error_description"].as_str().unwrap().contains("revoked"),
        "{v}"
    );

    // Task end revokes too: the certificate opens nothing more, and the
    // session it opened while live stops working with it.
    let cred = w.b.x509(&s.token, Some(600)).await;
    let c = svid_client(&w, &cred);
    let (status, v) = token(&c, &w, &agent.id).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let bound = v["access_token"].as_str().unwrap().to_owned();
    let ask = || {
        c.post(format!("{}/v1/credentials", w.mtls))
            .bearer_auth(&bound)
            .json(&json!({ "scope": "x509-svid", "ttl": 60 }))
            .send()
    };
    assert_eq!(ask().await.unwrap().status(), 201);
    w.b.complete(&s.token).await;
    let (status, _) = token(&svid_client(&w, &cred), &w, &agent.id).await.unwrap();
    assert_eq!(status, 401);
    let r = ask().await.unwrap();
    assert_eq!(r.status(), 401);
    let text = r.text().await.unwrap();
    assert!(text.contains("was revoked by provider"), "{text}");
    // It may still end itself (and so give back what it holds).
    let r = c
        .post(format!("{}/v1/tasks/complete", w.mtls))
        .bearer_auth(&bound)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// The documented CA rotation (old files moved away, a new CA made on
/// start) keeps the revocation list: with the old CA still trusted at the
/// door while its SVIDs run out, the revoked ones stay refused and only the
/// live ones log in.
#[tokio::test]
async fn a_certificate_revoked_before_the_ca_rotated_stays_refused() {
    let mut w = start_trusting(Some("ca/ca-cert.pem")).await;
    let (agent, s) = svid_agent(&w, "rotsvid").await;
    let revoked = w.b.x509(&s.token, Some(600)).await;
    let live = w.b.x509(&s.token, Some(600)).await;
    let lease = revoked["lease_id"].as_str().unwrap();
    let r = release(&w, lease, &s.token).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Rotate: the old key and certificate move away, the bundle keeps the
    // old certificate, and the broker makes a new CA on start.
    w.b.stop_gracefully().await;
    let ca_dir = w.b.dir.join("ca");
    std::fs::rename(ca_dir.join("ca-key.pem"), ca_dir.join("old-ca-key.pem")).unwrap();
    std::fs::rename(ca_dir.join("ca-cert.pem"), ca_dir.join("old-ca-cert.pem")).unwrap();
    let config = w.b.dir.join("keygate.toml");
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(
        toml.contains(r#"client_ca_file = "ca/ca-cert.pem""#),
        "{toml}"
    );
    let toml = toml.replace(
        r#"client_ca_file = "ca/ca-cert.pem""#,
        r#"client_ca_file = "ca/old-ca-cert.pem""#,
    );
    std::fs::write(&config, toml).unwrap();
    w.b.start_again().await;
    w.mtls = format!(
        "https://{}",
        w.b.stdout_line("keygate mtls listening on ").await
    );
    let old = std::fs::read(ca_dir.join("old-ca-cert.pem")).unwrap();
    assert_ne!(
        std::fs::read(ca_dir.join("ca-cert.pem")).unwrap(),
        old,
        "the broker made a new CA"
    );

    let (status, v) = token(&svid_client(&w, &revoked), &w, &agent.id)
        .await
        .unwrap();
    assert_eq!(
        status, 401,
        "a revoked SVID of the old CA must not log in: {v}"
    );
    assert!(
        v["error_description"].as_str().unwrap().contains("revoked"),
        "{v}"
    );
    let (status, v) = token(&svid_client(&w, &live), &w, &agent.id).await.unwrap();
    assert_eq!(status, 200, "a live SVID of the old CA still logs in: {v}");
}

/// A revocation list that cannot be read refuses the certificate with a
/// retryable 503 that says so, not a 401 claiming it was revoked; once it
/// reads again the certificate logs in.
#[tokio::test]
async fn an_unreadable_revocation_list_refuses_certificates_with_a_retryable_error() {
    use common::store::{Engine, engine};
    if engine() != Engine::Postgres {
        // One process's list lives in memory (its file is read at start):
        // only the shared list in PostgreSQL is read per check.
        return;
    }
    let w = start_trusting(Some("ca/ca-cert.pem")).await;
    let (agent, s) = svid_agent(&w, "crlread").await;
    let cred = w.b.x509(&s.token, Some(600)).await;
    let c = svid_client(&w, &cred);
    let (status, v) = token(&c, &w, &agent.id).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let bound = v["access_token"].as_str().unwrap().to_owned();

    w.b.store_exec(
        "ALTER TABLE ca_revocations RENAME TO ca_revocations_away",
        &[],
    )
    .await
    .unwrap();
    let (status, v) = token(&svid_client(&w, &cred), &w, &agent.id).await.unwrap();
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"], "temporarily_unavailable", "{v}");
    let why = v["error_description"].as_str().unwrap();
    assert!(
        why.contains("cannot read its revocation list") && why.contains("retry"),
        "{v}"
    );
    let r = c
        .post(format!("{}/v1/credentials", w.mtls))
        .bearer_auth(&bound)
        .json(&json!({ "scope": "x509-svid", "ttl": 60 }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "the bound session is refused too, retryably"
    );
    let text = r.text().await.unwrap();
    assert!(text.contains("cannot read its revocation list"), "{text}");

    w.b.store_exec(
        "ALTER TABLE ca_revocations_away RENAME TO ca_revocations",
        &[],
    )
    .await
    .unwrap();
    let (status, v) = token(&svid_client(&w, &cred), &w, &agent.id).await.unwrap();
    assert_eq!(
        status, 200,
        "readable again, the live certificate logs in: {v}"
    );
}
