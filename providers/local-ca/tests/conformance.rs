//! The provider conformance suite against the built-in CA: its relying-party
//! check (`verify`, which honours the revocation list) is the backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use keygate_provider_api::{Provider, RevokeHandle, ScopeSpec};
use keygate_provider_local_ca::{LocalCa, LocalCaConfig};
use keygate_provider_testkit::{Case, FnCheck, run};
use serde_json::{Value, json};

const AUDIENCE: &str = "https://api.conformance.test";

async fn open_ca() -> (Arc<LocalCa>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "keygate-ca-conformance-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let cfg = LocalCaConfig {
        trust_domain: "conformance.test".into(),
        key_file: dir.join("ca-key.pem"),
        cert_file: dir.join("ca-cert.pem"),
        jwt_key_file: dir.join("jwt-key.pem"),
        revocation_file: dir.join("revocations.jsonl"),
    };
    (Arc::new(LocalCa::open(cfg).await.unwrap()), dir)
}

fn scope(name: &str, params: Value) -> ScopeSpec {
    ScopeSpec {
        name: name.into(),
        max_ttl: Duration::from_secs(3600),
        params,
    }
}

/// Whether the CA, as a relying party would ask it, accepts the credential.
async fn verified(ca: Arc<LocalCa>, presented: Value) -> bool {
    ca.verify(&presented).await.unwrap().valid
}

#[tokio::test]
async fn x509_svid_conforms() {
    let (ca, dir) = open_ca().await;
    let in_ten_minutes = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
    let case = Case {
        scope: scope("x509", json!({ "kind": "x509_svid" })),
        request_params: Value::Null,
        ttl: Duration::from_secs(300),
        never_issued: Some(RevokeHandle(json!({
            "kind": "x509_svid", "serial": "7f00000000000000000000000000abcd", "expires_at": in_ten_minutes,
        }))),
    };
    let c = Arc::clone(&ca);
    let check = FnCheck(move |cred: Value| {
        let presented = json!({ "x509_svid": cred["certificate"] });
        verified(Arc::clone(&c), presented)
    });
    let report = run(ca.as_ref(), &case, &check).await.into_result().unwrap();
    assert!(report.secrets_checked > 0, "{report:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn jwt_svid_conforms() {
    let (ca, dir) = open_ca().await;
    let case = Case {
        scope: scope(
            "jwt",
            json!({ "kind": "jwt_svid", "audiences": [AUDIENCE] }),
        ),
        request_params: json!({ "audience": AUDIENCE }),
        ttl: Duration::from_secs(120),
        never_issued: Some(RevokeHandle(json!({
            "kind": "jwt_svid", "jti": "ls_never_issued", "expires_at": time::OffsetDateTime::now_utc().unix_timestamp() + 600,
        }))),
    };
    let c = Arc::clone(&ca);
    let check = FnCheck(move |cred: Value| {
        let presented = json!({ "jwt_svid": cred["token"], "audience": AUDIENCE });
        verified(Arc::clone(&c), presented)
    });
    let report = run(ca.as_ref(), &case, &check).await.into_result().unwrap();
    assert!(report.secrets_checked > 0, "{report:?}");
    let _ = std::fs::remove_dir_all(dir);
}
