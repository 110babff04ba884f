use keygate_provider_api::Provider;
use serde_json::json;

use super::*;

#[tokio::test]
async fn debug_output_holds_no_private_key() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let issued = ca.issue(&x509_req("lease-debug")).await.unwrap();
    let key_pem = secret(&issued.credential, "private_key");
    let jwt = ca
        .issue(&jwt_req("lease-debug-jwt", json!("ledger")))
        .await
        .unwrap();
    let token = secret(&jwt.credential, "token");
    let key_body = |pem: &str| pem.lines().nth(1).unwrap().to_owned();
    let secrets = [
        key_body(&key_pem),
        key_body(&std::fs::read_to_string(&fx.cfg.key_file).unwrap()),
        key_body(&std::fs::read_to_string(&fx.cfg.jwt_key_file).unwrap()),
        token.clone(),
    ];
    let outputs = [
        format!("{issued:?}"),
        format!("{:?}", issued.credential),
        format!("{jwt:?}"),
        format!("{ca:?}"),
        format!("{:?}", ca.ca),
        format!("{:?}", ca.jwt),
        issued.credential.public_view().to_string(),
        jwt.credential.public_view().to_string(),
    ];
    for out in &outputs {
        assert!(!out.contains("PRIVATE KEY"), "{out}");
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "secret leaked into {out}");
        }
    }
}

#[tokio::test]
async fn bad_scope_params_are_rejected() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    assert_eq!(ca.kind(), "local-ca");
    assert!(
        ca.validate_scope(&scope(json!({"kind": "x509_svid"})))
            .is_ok()
    );
    assert!(
        ca.validate_scope(&scope(json!({"kind": "jwt_svid", "audiences": ["a"]})))
            .is_ok()
    );
    assert_invalid_params(
        ca.validate_scope(&scope(json!({"kind": "ssh"}))),
        "unknown credential kind `ssh`",
    );
    assert_invalid_params(
        ca.validate_scope(&scope(json!({"kind": "x509_svid", "ttl": 1}))),
        "`ttl`",
    );
    assert_invalid_params(
        ca.validate_scope(&scope(json!({"kind": "jwt_svid", "audiences": [1]}))),
        "`audiences`",
    );
    assert_invalid_params(ca.validate_scope(&scope(json!(["x509_svid"]))), "`kind`");

    let mut req = x509_req("lease-bad");
    req.request_params = json!({"ttl": 5});
    assert_invalid_params(ca.issue(&req).await, "`ttl`");
    let mut req = x509_req("lease-bad-agent");
    req.agent.id = "../root".into();
    assert_invalid_params(ca.issue(&req).await, "`../root`");
    assert!(ca.document("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn config_is_checked() {
    let fx = Fixture::new();
    let json = json!({
        "trust_domain": "example.org",
        "key_file": "a", "cert_file": "b", "jwt_key_file": "c", "revocation_file": "d",
    });
    assert!(serde_json::from_value::<LocalCaConfig>(json.clone()).is_ok());
    let mut extra = json;
    extra["typo"] = json!(1);
    assert!(serde_json::from_value::<LocalCaConfig>(extra).is_err());

    for td in ["spiffe://example.org", "Example.org", "example.org/x", ""] {
        let mut cfg = fx.cfg.clone();
        cfg.trust_domain = td.into();
        assert_invalid_params(LocalCa::open(cfg).await, "trust domain");
    }
    assert!(!fx.dir.exists(), "nothing written for a bad config");
}

#[tokio::test]
async fn mismatched_files_are_refused() {
    let fx = Fixture::new();
    drop(fx.open().await);
    // Same files, different trust domain: needs a new CA.
    let mut cfg = fx.cfg.clone();
    cfg.trust_domain = "other.org".into();
    let err = LocalCa::open(cfg).await.unwrap_err();
    assert!(err.to_string().contains("`other.org`"), "{err}");
    // A certificate whose key is gone is not silently replaced.
    std::fs::remove_file(&fx.cfg.key_file).unwrap();
    let err = LocalCa::open(fx.cfg.clone()).await.unwrap_err();
    assert!(err.to_string().contains("key file"), "{err}");
    // Nor one that does not match the key file.
    let other = Fixture::new();
    drop(other.open().await);
    std::fs::copy(&other.cfg.key_file, &fx.cfg.key_file).unwrap();
    let err = LocalCa::open(fx.cfg.clone()).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}
