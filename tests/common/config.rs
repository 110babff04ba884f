//! The config file a test broker runs with: operators, policies, scopes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{ISSUER, TRUST_DOMAIN};

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Operator bearer tokens, fresh per test; config holds only their hashes.
#[derive(Debug, Clone)]
pub struct Operators {
    pub admin: String,
    pub secops: String,
    pub auditor: String,
    pub approver: String,
}

impl Operators {
    pub(super) fn generate() -> Self {
        let t = |role: &str| format!("kgop-{role}-{}", uuid::Uuid::new_v4().simple());
        Self {
            admin: t("admin"),
            secops: t("secops"),
            auditor: t("auditor"),
            approver: t("approver"),
        }
    }

    pub(super) fn toml(&self) -> String {
        [
            ("admin", &self.admin),
            ("secops", &self.secops),
            ("auditor", &self.auditor),
            ("approver", &self.approver),
        ]
        .iter()
        .map(|(role, token)| {
            format!(
                "[[operators]]\nname = \"test-{role}\"\nroles = [\"{role}\"]\ntoken_sha256 = \"{}\"\n",
                sha256_hex(token)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }
}

/// What a test may change in the generated config.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Copy `config/policies/*` (the shipped policies and schema).
    pub repo_policies: bool,
    /// Extra `(file name, content)` policy files.
    pub policies: Vec<(String, String)>,
    /// The `[[scopes]]` tables; `None` for [`DEFAULT_SCOPES`].
    pub scopes: Option<String>,
    /// More config (e.g. `[providers.*]` tables), placed before the scopes.
    pub extra_config: String,
    /// Environment variables for the broker process.
    pub env: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            repo_policies: true,
            policies: Vec::new(),
            scopes: None,
            extra_config: String::new(),
            env: Vec::new(),
        }
    }
}

/// Lets any agent obtain any non-sensitive CA scope (the shipped guardrails
/// still apply), for tests about teams other than `platform`.
pub const PERMIT_CA: &str = r#"
@id("test-permit-ca")
permit (
  principal,
  action == Keygate::Action::"request_credential",
  resource
)
when { resource.provider == "ca" && !resource.sensitive };
"#;

impl Setup {
    /// The shipped policies plus [`PERMIT_CA`].
    pub fn permissive() -> Self {
        Self {
            policies: vec![("test-permit.cedar".into(), PERMIT_CA.into())],
            ..Self::default()
        }
    }
}

/// A policy file letting any agent obtain any non-sensitive scope of
/// `provider`: `(file name, text)` for [`Setup::policies`].
pub fn permit_provider(provider: &str) -> (String, String) {
    (
        format!("test-permit-{provider}.cedar"),
        format!(
            r#"@id("test-permit-{provider}")
permit (
  principal,
  action == Keygate::Action::"request_credential",
  resource
)
when {{ resource.provider == "{provider}" && !resource.sensitive }};
"#
        ),
    )
}

pub const DEFAULT_SCOPES: &str = r#"
[[scopes]]
name = "x509-svid"
provider = "ca"
max_ttl_secs = 3600
params = { kind = "x509_svid" }

[[scopes]]
name = "jwt-svid"
provider = "ca"
max_ttl_secs = 900
params = { kind = "jwt_svid", audiences = ["https://api.keygate.test"] }

[[scopes]]
name = "payments-ca"
provider = "ca"
max_ttl_secs = 600
sensitive = true
params = { kind = "x509_svid" }
"#;
pub(super) fn config_toml(dir: &Path, ops: &Operators, extra: &str, scopes: &str) -> String {
    let d = dir.display();
    format!(
        r#"[server]
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
log_format = "text"

[store]
{store}

[sessions]
signing_key_file = "{d}/session-signing-key.pem"
default_ttl_secs = 600
max_ttl_secs = 3600

[leases]
reaper_interval_secs = 1
issue_timeout_secs = 5
revoke_concurrency = 8
revoke_backoff_base_ms = 100
revoke_backoff_max_secs = 2

[policy]
dir = "{d}/policies"

{operators}
[providers.ca]
kind = "local-ca"
trust_domain = "{TRUST_DOMAIN}"
key_file = "{d}/ca/ca-key.pem"
cert_file = "{d}/ca/ca-cert.pem"
jwt_key_file = "{d}/ca/jwt-svid-key.pem"
revocation_file = "{d}/ca/revocations.jsonl"
{extra}
{scopes}"#,
        operators = ops.toml(),
        store = super::store::engine().store_toml(dir),
    )
}

/// A JSON value as a TOML inline value (agent definition files in tests).
pub fn toml_inline(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => format!(
            "{{ {} }}",
            m.iter()
                .map(|(k, v)| format!("{k} = {}", toml_inline(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_inline).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}
