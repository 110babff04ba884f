//! Scope parameters (`[scopes.params]`) of the two AWS scope kinds.

use std::collections::BTreeMap;
use std::time::Duration;

use keygate_provider_api::ProviderError;
use serde::Deserialize;

use crate::limits;

/// What a scope mints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum ScopeKind {
    /// STS AssumeRole: temporary credentials for a role.
    AssumeRole(AssumeRole),
    /// A brokered Secrets Manager read.
    Secret(Secret),
}

/// `kind = "assume_role"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AssumeRole {
    /// The role to assume.
    pub role_arn: String,
    /// The role's maximum session duration (AWS default 3600 s); the scope's
    /// max ttl must fit in it.
    pub max_session_secs: Option<u64>,
    /// Inline session policy (JSON text) narrowing the role for the session.
    pub session_policy: Option<String>,
    /// Managed policies narrowing the role for the session.
    #[serde(default)]
    pub policy_arns: Vec<String>,
    /// Extra static session tags, after Keygate's own five.
    #[serde(default)]
    pub session_tags: BTreeMap<String, String>,
}

/// `kind = "secret"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Secret {
    /// Secret name or ARN.
    pub secret_id: String,
    /// Version stage to read (default `AWSCURRENT`).
    pub version_stage: Option<String>,
    /// Rotate the secret when the lease ends, so the value the agent saw is
    /// no longer current.
    #[serde(default)]
    pub rotate_on_release: bool,
    /// Keygate owns the value: rotation writes a new random value
    /// (PutSecretValue) instead of asking the secret's rotation function
    /// (RotateSecret).
    #[serde(default)]
    pub keygate_owns_value: bool,
}

impl AssumeRole {
    /// The role's maximum session duration as configured (default 3600 s).
    pub(crate) fn max_session_secs(&self) -> u64 {
        self.max_session_secs
            .unwrap_or(limits::DEFAULT_MAX_SESSION_SECS)
    }

    /// The inline session policy, checked and compacted.
    pub(crate) fn compact_policy(&self) -> Result<Option<String>, ProviderError> {
        self.session_policy
            .as_deref()
            .map(limits::session_policy)
            .transpose()
    }
}

/// How a secret is rotated on release, as recorded in the lease's handle so
/// revocation works even if the scope changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rotation {
    /// No rotation: the read cannot be undone.
    None,
    /// PutSecretValue with a fresh random value.
    PutValue,
    /// RotateSecret through the secret's rotation function.
    RotateSecret,
}

impl Rotation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PutValue => "put_value",
            Self::RotateSecret => "rotate_secret",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [Self::None, Self::PutValue, Self::RotateSecret]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

impl Secret {
    pub(crate) fn rotation(&self) -> Rotation {
        match (self.rotate_on_release, self.keygate_owns_value) {
            (false, _) => Rotation::None,
            (true, true) => Rotation::PutValue,
            (true, false) => Rotation::RotateSecret,
        }
    }
}

/// Parses scope params without checking them against AWS's limits.
pub(crate) fn parse(params: &serde_json::Value) -> Result<ScopeKind, ProviderError> {
    ScopeKind::deserialize(params).map_err(|e| {
        ProviderError::InvalidParams(format!(
            "aws scope params (`kind` = `assume_role` or `secret`): {e}"
        ))
    })
}

/// Parses and checks a scope at config load.
pub(crate) fn validate(params: &serde_json::Value, max_ttl: Duration) -> Result<(), ProviderError> {
    match parse(params)? {
        ScopeKind::AssumeRole(p) => {
            limits::role_name(&p.role_arn)?;
            limits::session_limits(p.max_session_secs(), max_ttl.as_secs())?;
            p.compact_policy()?;
            limits::policy_arns(&p.policy_arns)?;
            // Keygate's five tags, with placeholder values, plus the scope's.
            let mut tags: Vec<(String, String)> = crate::sts::KEYGATE_TAGS
                .iter()
                .map(|k| ((*k).to_owned(), String::new()))
                .collect();
            tags.extend(p.session_tags.clone());
            limits::session_tags(&tags)
        }
        ScopeKind::Secret(p) => validate_secret(&p),
    }
}

fn validate_secret(p: &Secret) -> Result<(), ProviderError> {
    let invalid = |m: &str| Err(ProviderError::InvalidParams(m.to_owned()));
    if p.secret_id.is_empty() || p.secret_id.len() > 2048 {
        return invalid("`secret_id` must be a secret name or arn");
    }
    if p.version_stage.as_deref() == Some("") {
        return invalid("`version_stage` is empty; leave it out to read `AWSCURRENT`");
    }
    if p.keygate_owns_value && !p.rotate_on_release {
        return invalid("`keygate_owns_value` only matters with `rotate_on_release = true`");
    }
    if p.rotate_on_release && !matches!(p.version_stage.as_deref(), None | Some("AWSCURRENT")) {
        return invalid(
            "`rotate_on_release` needs the scope to read `AWSCURRENT`: rotating makes the current value old, not an older one",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use serde_json::json;

    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/reports";

    fn check(params: serde_json::Value, ttl: u64) -> Result<(), String> {
        validate(&params, Duration::from_secs(ttl)).map_err(|e| e.to_string())
    }

    #[test]
    fn assume_role_scopes() {
        check(json!({"kind": "assume_role", "role_arn": ROLE}), 3600).unwrap();
        check(
            json!({"kind": "assume_role", "role_arn": ROLE, "max_session_secs": 7200,
                   "session_policy": r#"{"Version":"2012-10-17","Statement":[]}"#,
                   "policy_arns": ["arn:aws:iam::aws:policy/ReadOnlyAccess"],
                   "session_tags": {"cost-center": "42"}}),
            7200,
        )
        .unwrap();
        let cases = [
            (json!({"kind": "assume_role"}), 3600, "role_arn"),
            (
                json!({"kind": "assume_role", "role_arn": "x"}),
                3600,
                "not an iam role arn",
            ),
            (
                json!({"kind": "assume_role", "role_arn": ROLE, "ttl": 1}),
                3600,
                "`ttl`",
            ),
            (
                json!({"kind": "assume_role", "role_arn": ROLE}),
                600,
                "at least 900",
            ),
            (
                json!({"kind": "assume_role", "role_arn": ROLE}),
                7200,
                "`max_session_secs`",
            ),
            (
                json!({"kind": "assume_role", "role_arn": ROLE, "session_policy": "{"}),
                900,
                "not valid json",
            ),
            (
                json!({"kind": "assume_role", "role_arn": ROLE, "session_tags": {"agent": "x"}}),
                900,
                "twice",
            ),
            (json!({"kind": "ssh"}), 900, "`ssh`"),
            (json!(null), 900, "kind"),
        ];
        for (params, ttl, needle) in cases {
            let err = check(params.clone(), ttl).unwrap_err();
            assert!(err.contains(needle), "{params}: {err}");
        }
        let tags: BTreeMap<String, String> =
            (0..46).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        let err = check(
            json!({"kind": "assume_role", "role_arn": ROLE, "session_tags": tags}),
            900,
        )
        .unwrap_err();
        assert!(err.contains("51 session tags"), "{err}");
    }

    #[test]
    fn secret_scopes() {
        check(json!({"kind": "secret", "secret_id": "prod/db"}), 60).unwrap();
        check(
            json!({"kind": "secret", "secret_id": "prod/db", "rotate_on_release": true,
                   "keygate_owns_value": true}),
            60,
        )
        .unwrap();
        for (params, needle) in [
            (json!({"kind": "secret", "secret_id": ""}), "`secret_id`"),
            (
                json!({"kind": "secret", "secret_id": "x", "keygate_owns_value": true}),
                "`keygate_owns_value`",
            ),
            (
                json!({"kind": "secret", "secret_id": "x", "rotate_on_release": true,
                       "version_stage": "AWSPREVIOUS"}),
                "`AWSCURRENT`",
            ),
            (
                json!({"kind": "secret", "secret_id": "x", "stage": "y"}),
                "`stage`",
            ),
        ] {
            let err = check(params.clone(), 60).unwrap_err();
            assert!(err.contains(needle), "{params}: {err}");
        }
        let ScopeKind::Secret(s) = parse(&json!({"kind": "secret", "secret_id": "x",
            "rotate_on_release": true}))
        .unwrap() else {
            panic!("not a secret scope")
        };
        assert_eq!(s.rotation(), Rotation::RotateSecret);
        assert_eq!(Rotation::parse("put_value"), Some(Rotation::PutValue));
    }
}
