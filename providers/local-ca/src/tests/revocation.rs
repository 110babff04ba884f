use std::sync::Arc;

use keygate_provider_api::{Provider, RevokeOutcome};
use serde_json::json;

use super::x509::crl_serials;
use super::*;
use crate::x509::serial_for_lease;

#[tokio::test]
async fn orphaned_lease_is_revoked_by_lease_id() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    // The broker crashed after both issues but before recording a handle.
    let x = ca.issue(&x509_req("lease-orphan")).await.unwrap();
    let jreq = jwt_req("lease-orphan", json!("ledger"));
    let j = ca.issue(&jreq).await.unwrap();
    let cert = json!({"x509_svid": public(&x.credential, "certificate")});
    let token = json!({"jwt_svid": secret(&j.credential, "token"), "audience": "ledger"});
    assert!(ca.verify(&cert).await.unwrap().valid);
    assert!(ca.verify(&token).await.unwrap().valid);

    let revoke = revoke_req(&jreq, None);
    assert_eq!(ca.revoke(&revoke).await.unwrap(), RevokeOutcome::Revoked);
    assert_eq!(
        ca.verify(&cert).await.unwrap().reason.as_deref(),
        Some("revoked")
    );
    assert_eq!(
        ca.verify(&token).await.unwrap().reason.as_deref(),
        Some("revoked")
    );
    assert_eq!(
        crl_serials(&ca).await,
        vec![hex::encode(serial_for_lease("lease-orphan"))]
    );
    assert_eq!(
        ca.revoke(&revoke).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
    // With the handle, after the fact: nothing new to do.
    assert_eq!(
        ca.revoke(&revoke_req(&jreq, Some(x.handle))).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
}

#[tokio::test]
async fn revoking_an_expired_lease_is_already_gone() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let mut req = x509_req("lease-expired");
    req.expires_at = OffsetDateTime::now_utc() - time::Duration::seconds(10);
    assert_eq!(
        ca.revoke(&revoke_req(&req, None)).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
    let (_, body) = doc(&ca, "revoked.json").await;
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"serials": [], "jtis": []})
    );
}

#[tokio::test]
async fn reopen_keeps_ca_kid_and_revocations() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let req = x509_req("lease-reopen");
    let issued = ca.issue(&req).await.unwrap();
    ca.revoke(&revoke_req(&req, Some(issued.handle)))
        .await
        .unwrap();
    let (pem, kid) = (
        ca.ca_certificate_pem().to_owned(),
        ca.jwt_key_id().to_owned(),
    );
    let (_, jwks) = doc(&ca, "jwks.json").await;
    drop(ca);

    let ca = fx.open().await;
    assert_eq!(ca.ca_certificate_pem(), pem);
    assert_eq!(ca.jwt_key_id(), kid);
    assert_eq!(doc(&ca, "jwks.json").await.1, jwks);
    let v = ca
        .verify(&json!({"x509_svid": public(&issued.credential, "certificate")}))
        .await
        .unwrap();
    assert_eq!(v.reason.as_deref(), Some("revoked"));
    assert_eq!(
        crl_serials(&ca).await,
        vec![hex::encode(serial_for_lease("lease-reopen"))]
    );
    assert_eq!(
        ca.revoke(&revoke_req(&req, None)).await.unwrap(),
        RevokeOutcome::Revoked,
        "jti is new"
    );
}

#[tokio::test]
async fn open_compacts_the_revocation_file() {
    let fx = Fixture::new();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let path = &fx.cfg.revocation_file;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let lines = [
        json!({"serial": "aa", "expires_at": now - 3 * 86400, "revoked_at": now - 4 * 86400}).to_string(),
        json!({"serial": "bb", "jti": "lease-b", "expires_at": now - 3600, "revoked_at": now - 7200}).to_string(),
        json!({"serial": "4c", "expires_at": now + 3600, "revoked_at": now}).to_string(),
        "{\"serial\": \"dd\", \"expires_a".to_owned(),
    ];
    std::fs::write(path, lines.join("\n")).unwrap();
    let ca = fx.open().await;
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        !text.contains("\"aa\"") && !text.contains("\"dd\""),
        "{text}"
    );
    assert!(
        text.contains("\"bb\"") && text.contains("lease-b") && text.contains("\"4c\""),
        "{text}"
    );
    // Recently expired entries stay on file but are no longer published.
    let (_, body) = doc(&ca, "revoked.json").await;
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"serials": ["4c"], "jtis": []})
    );
    assert_eq!(crl_serials(&ca).await, vec!["4c".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_revokes_are_counted_once_and_durable() {
    const LEASES: usize = 300;
    let fx = Fixture::new();
    let ca = Arc::new(fx.open().await);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        for i in 0..LEASES {
            let ca = Arc::clone(&ca);
            tasks.push(tokio::spawn(async move {
                let req = x509_req(&format!("lease-{i}"));
                ca.revoke(&revoke_req(&req, None)).await.unwrap()
            }));
        }
    }
    let started = std::time::Instant::now();
    let mut revoked = 0;
    for t in tasks {
        if t.await.unwrap() == RevokeOutcome::Revoked {
            revoked += 1;
        }
    }
    eprintln!(
        "{} concurrent revokes took {:?}",
        2 * LEASES,
        started.elapsed()
    );
    assert_eq!(revoked, LEASES);
    drop(ca);
    let ca = fx.open().await;
    let (_, body) = doc(&ca, "revoked.json").await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["serials"].as_array().unwrap().len(), LEASES);
    assert_eq!(body["jtis"].as_array().unwrap().len(), LEASES);
}
