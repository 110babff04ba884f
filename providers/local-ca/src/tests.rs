//! Tests against a real `LocalCa` in a temporary directory.

mod jwt;
mod revocation;
mod setup;
mod x509;

use std::path::PathBuf;
use std::time::Duration;

use keygate_provider_api::{
    AgentInfo, Credential, CredentialField, IssueRequest, Provider, ProviderError, RevokeHandle,
    RevokeRequest, ScopeSpec,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{LocalCa, LocalCaConfig};

pub(crate) const TRUST_DOMAIN: &str = "example.org";
pub(crate) const AGENT: &str = "finance-invoice-agent-v1";

/// A CA's files in a fresh directory, removed when dropped.
pub(crate) struct Fixture {
    pub dir: PathBuf,
    pub cfg: LocalCaConfig,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("keygate-local-ca-{}", uuid::Uuid::new_v4()));
        let cfg = LocalCaConfig {
            trust_domain: TRUST_DOMAIN.into(),
            key_file: dir.join("ca").join("ca-key.pem"),
            cert_file: dir.join("ca").join("ca.pem"),
            jwt_key_file: dir.join("jwt-key.pem"),
            revocation_file: dir.join("state").join("revoked.jsonl"),
        };
        Self { dir, cfg }
    }

    pub async fn open(&self) -> LocalCa {
        LocalCa::open(self.cfg.clone()).await.unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn scope(params: Value) -> ScopeSpec {
    ScopeSpec {
        name: "svid".into(),
        max_ttl: Duration::from_secs(3600),
        params,
    }
}

pub(crate) fn issue_req(
    lease_id: &str,
    params: Value,
    request_params: Value,
    ttl: Duration,
) -> IssueRequest {
    IssueRequest {
        lease_id: lease_id.into(),
        task_id: "task-1".into(),
        agent: AgentInfo {
            id: AGENT.into(),
            team: "finance".into(),
            sponsor: "alice@example.org".into(),
            environment: "test".into(),
            risk_tier: 2,
        },
        scope: scope(params),
        ttl,
        expires_at: OffsetDateTime::now_utc() + ttl,
        request_params,
    }
}

pub(crate) fn x509_req(lease_id: &str) -> IssueRequest {
    issue_req(
        lease_id,
        json!({"kind": "x509_svid"}),
        json!({}),
        Duration::from_secs(300),
    )
}

pub(crate) fn jwt_req(lease_id: &str, audience: Value) -> IssueRequest {
    issue_req(
        lease_id,
        json!({"kind": "jwt_svid", "audiences": ["billing-api", "ledger"]}),
        json!({"audience": audience}),
        Duration::from_secs(300),
    )
}

pub(crate) fn revoke_req(issue: &IssueRequest, handle: Option<RevokeHandle>) -> RevokeRequest {
    RevokeRequest {
        lease_id: issue.lease_id.clone(),
        scope: issue.scope.clone(),
        handle,
        expires_at: issue.expires_at,
    }
}

/// A public string field of a credential.
pub(crate) fn public(c: &Credential, name: &str) -> String {
    match c.get(name) {
        Some(CredentialField::Public(Value::String(s))) => s.clone(),
        other => panic!("field {name} is not a public string: {other:?}"),
    }
}

/// A secret field, as the agent would receive it.
pub(crate) fn secret(c: &Credential, name: &str) -> String {
    assert!(
        matches!(c.get(name), Some(CredentialField::Secret(_))),
        "{name} is not secret"
    );
    c.expose_to_agent()[name].as_str().unwrap().to_owned()
}

pub(crate) async fn doc(ca: &LocalCa, name: &str) -> (String, Vec<u8>) {
    let d = ca.document(name).await.unwrap().unwrap();
    (d.content_type.to_owned(), d.body)
}

pub(crate) fn assert_invalid_params(r: Result<impl std::fmt::Debug, ProviderError>, needle: &str) {
    match r {
        Err(ProviderError::InvalidParams(msg)) => {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
        }
        other => panic!("expected invalid params mentioning {needle:?}, got {other:?}"),
    }
}
