//! The suite itself must be able to fail: a fake backend that behaves, and
//! one that leaks its secret into the logs and never really revokes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use keygate_provider_api::{
    Credential, IssueRequest, Issued, Provider, ProviderError, Revocability, RevokeHandle,
    RevokeOutcome, RevokeRequest, ScopeSpec,
};
use keygate_provider_testkit::{Case, Check, run};
use secrecy::SecretString;
use serde_json::{Value, json};

/// Issues random secrets; `live` is the fake backend's state.
struct Fake {
    live: Mutex<BTreeSet<String>>,
    leaky: bool,
    /// Ignores a revoke without its handle, yet says it revoked.
    forgets_orphans: bool,
}

#[async_trait]
impl Provider for Fake {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn validate_scope(&self, _: &ScopeSpec) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn issue(&self, req: &IssueRequest) -> Result<Issued, ProviderError> {
        if req.expires_at <= time::OffsetDateTime::now_utc() {
            return Err(ProviderError::InvalidParams("expired".into()));
        }
        let secret = format!("fake-secret-{}", req.lease_id);
        if self.leaky {
            tracing::debug!(secret = %secret, "issued");
        }
        self.live.lock().unwrap().insert(secret.clone());
        Ok(Issued {
            credential: Credential::new().secret("token", SecretString::from(secret.clone())),
            handle: RevokeHandle(json!({ "id": req.lease_id })),
            expires_at: req.expires_at,
            revocability: Revocability::Revocable,
        })
    }
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, ProviderError> {
        // The handle is the lease id: an orphan is found by it too.
        let id = match req.handle.as_ref() {
            Some(h) => h.0["id"].as_str().unwrap_or_default(),
            None if self.forgets_orphans => "",
            None => req.lease_id.as_str(),
        };
        if !self.leaky {
            self.live
                .lock()
                .unwrap()
                .remove(&format!("fake-secret-{id}"));
        }
        Ok(RevokeOutcome::Revoked)
    }
}

struct FakeCheck<'a>(&'a Fake);

impl Check for FakeCheck<'_> {
    async fn works(&self, c: &Value) -> Result<bool, String> {
        Ok(self
            .0
            .live
            .lock()
            .unwrap()
            .contains(c["token"].as_str().unwrap()))
    }
}

fn case() -> Case {
    Case {
        scope: ScopeSpec {
            name: "fake".into(),
            max_ttl: Duration::from_secs(60),
            params: Value::Null,
        },
        request_params: Value::Null,
        ttl: Duration::from_secs(30),
        never_issued: Some(RevokeHandle(json!({ "id": "never" }))),
    }
}

#[tokio::test]
async fn a_good_provider_passes() {
    let p = Fake {
        live: Mutex::default(),
        leaky: false,
        forgets_orphans: false,
    };
    let r = run(&p, &case(), &FakeCheck(&p)).await;
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(r.secrets_checked, 1);
}

#[tokio::test]
async fn a_provider_that_cannot_find_its_orphans_fails() {
    let p = Fake {
        live: Mutex::default(),
        leaky: false,
        forgets_orphans: true,
    };
    let r = run(&p, &case(), &FakeCheck(&p)).await;
    assert_eq!(
        r.failed,
        ["no longer works after a revoke without its handle: the backend says works = true"]
    );
}

#[tokio::test]
async fn leaks_and_fake_revocations_fail() {
    let p = Fake {
        live: Mutex::default(),
        leaky: true,
        forgets_orphans: false,
    };
    let r = run(&p, &case(), &FakeCheck(&p)).await;
    let failed = r.failed.join("\n");
    assert!(failed.contains("no longer works after revoke"), "{failed}");
    assert!(failed.contains("no secret in logs"), "{failed}");
}
