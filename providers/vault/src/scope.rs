//! Scope parameters (`[scopes.params]`) of the four kinds, checked at load.

use keygate_provider_api::ProviderError;
use serde::Deserialize;

/// What a scope mints.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ScopeKind {
    /// A child token of Keygate's token with these policies.
    Token {
        policies: Vec<String>,
        #[serde(default)]
        num_uses: Option<u64>,
        #[serde(default = "yes")]
        renewable: bool,
    },
    /// Dynamic credentials from a database secrets engine role.
    Database {
        #[serde(default = "database_mount")]
        mount: String,
        role: String,
    },
    /// A certificate from a PKI role, with the agent's SPIFFE ID as URI SAN.
    Pki {
        #[serde(default = "pki_mount")]
        mount: String,
        role: String,
        trust_domain: String,
    },
    /// A brokered read of a KV v2 secret.
    Kv {
        #[serde(default = "kv_mount")]
        mount: String,
        path: String,
        #[serde(default)]
        version: Option<u64>,
    },
}

fn yes() -> bool {
    true
}
fn database_mount() -> String {
    "database".into()
}
fn pki_mount() -> String {
    "pki".into()
}
fn kv_mount() -> String {
    "secret".into()
}

/// Parses and checks a scope's parameters.
pub(crate) fn parse(params: &serde_json::Value) -> Result<ScopeKind, ProviderError> {
    let kind: ScopeKind = serde_json::from_value(params.clone()).map_err(|e| {
        ProviderError::InvalidParams(format!(
            "vault scope params: {e} (kinds: token, database, pki, kv)"
        ))
    })?;
    match &kind {
        ScopeKind::Token {
            policies, num_uses, ..
        } => {
            if policies.is_empty() {
                return Err(invalid("a `token` scope needs at least one policy"));
            }
            if policies.iter().any(|p| p == "root") {
                return Err(invalid("a `token` scope may not grant the `root` policy"));
            }
            if policies
                .iter()
                .any(|p| p.trim().is_empty() || p.contains(','))
            {
                return Err(invalid("policy names must be non-empty and contain no `,`"));
            }
            if *num_uses == Some(0) {
                return Err(invalid(
                    "`num_uses` must be at least 1 (omit it for unlimited)",
                ));
            }
        }
        ScopeKind::Database { mount, role } => {
            check_path(mount, "mount")?;
            check_segment(role, "role")?;
        }
        ScopeKind::Pki {
            mount,
            role,
            trust_domain,
        } => {
            check_path(mount, "mount")?;
            check_segment(role, "role")?;
            check_trust_domain(trust_domain)?;
        }
        ScopeKind::Kv {
            mount,
            path,
            version,
        } => {
            check_path(mount, "mount")?;
            check_path(path, "path")?;
            if *version == Some(0) {
                return Err(invalid("`version` starts at 1 (omit it for the latest)"));
            }
        }
    }
    Ok(kind)
}

fn invalid(m: &str) -> ProviderError {
    ProviderError::InvalidParams(m.into())
}

/// A Vault path (mount or secret path): segments of safe characters, no
/// `..`, no leading or trailing `/`.
pub(crate) fn check_path(p: &str, what: &str) -> Result<(), ProviderError> {
    if p.is_empty() || p.split('/').any(|s| check_segment(s, what).is_err()) {
        return Err(ProviderError::InvalidParams(format!(
            "{what} `{p}` must be `/`-separated names of letters, digits, `-`, `_` and `.`"
        )));
    }
    Ok(())
}

fn check_segment(s: &str, what: &str) -> Result<(), ProviderError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if s.is_empty() || s == "." || s == ".." || !s.chars().all(ok) {
        return Err(ProviderError::InvalidParams(format!(
            "{what} `{s}` must be letters, digits, `-`, `_` and `.`"
        )));
    }
    Ok(())
}

fn check_trust_domain(td: &str) -> Result<(), ProviderError> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if td.is_empty() || td.len() > 255 || !td.chars().all(ok) {
        return Err(ProviderError::InvalidParams(format!(
            "trust domain `{td}` must be a bare lowercase name (no `spiffe://`)"
        )));
    }
    Ok(())
}

/// Checks that an agent id can be one SPIFFE path segment.
pub(crate) fn spiffe_id(trust_domain: &str, agent: &str) -> Result<String, ProviderError> {
    check_segment(agent, "agent id")?;
    Ok(format!("spiffe://{trust_domain}/agent/{agent}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds() {
        assert!(parse(&json!({"kind": "token", "policies": ["reader"]})).is_ok());
        assert!(parse(&json!({"kind": "token", "policies": []})).is_err());
        assert!(parse(&json!({"kind": "token", "policies": ["root"]})).is_err());
        assert!(parse(&json!({"kind": "database", "role": "app"})).is_ok());
        assert!(parse(&json!({"kind": "database", "role": "../sys"})).is_err());
        assert!(
            parse(&json!({"kind": "pki", "role": "agent", "trust_domain": "example.org"})).is_ok()
        );
        assert!(
            parse(&json!({"kind": "pki", "role": "agent", "trust_domain": "spiffe://x"})).is_err()
        );
        assert!(parse(&json!({"kind": "kv", "path": "team/db"})).is_ok());
        assert!(parse(&json!({"kind": "kv", "path": "/abs"})).is_err());
        assert!(parse(&json!({"kind": "kv", "path": "a", "typo": 1})).is_err());
        assert!(parse(&json!({"kind": "transit"})).is_err());
    }
}
