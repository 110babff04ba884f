//! Scope parameters (`[scopes.params]`) of the two Azure scope kinds.

use keygate_provider_api::{ProviderError, SecretRef};
use serde::Deserialize;

use crate::config::is_guid;

/// How many live Keygate passwords an app may hold when the scope says
/// nothing.
const DEFAULT_MAX_PASSWORDS: u32 = 5;
/// A ceiling on `max_passwords`: every password is a standing way into the
/// app, and Entra keeps them all in one attribute of the app object.
const MAX_MAX_PASSWORDS: u32 = 100;

/// What a scope mints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum ScopeKind {
    /// A new client secret on an app registration (Graph `addPassword`).
    AppPassword(AppPassword),
    /// An Entra access token for a resource, as the scope's app.
    AccessToken(AccessToken),
}

/// `kind = "app_password"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppPassword {
    /// The app registration's object id (Graph `/applications/{id}`).
    pub application_object_id: String,
    /// The app's client (application) id, handed to the agent.
    pub client_id: String,
    /// The most live Keygate passwords the app may hold at once.
    #[serde(default = "default_max_passwords")]
    pub max_passwords: u32,
}

/// `kind = "access_token"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccessToken {
    /// The resource the token is for (`https://management.azure.com`);
    /// Keygate asks for its `/.default` scope.
    pub resource: String,
    /// The client id of the app whose identity the token carries.
    pub client_id: String,
    /// That app's client secret, by reference (`env:`, `file:`, `aws-sm:`),
    /// read at each issue.
    pub client_secret: SecretRef,
}

fn default_max_passwords() -> u32 {
    DEFAULT_MAX_PASSWORDS
}

impl AccessToken {
    /// The Entra scope asked for: the resource's `.default`.
    pub(crate) fn entra_scope(&self) -> String {
        format!("{}/.default", self.resource.trim_end_matches('/'))
    }
}

/// Parses scope params without checking them further.
pub(crate) fn parse(params: &serde_json::Value) -> Result<ScopeKind, ProviderError> {
    ScopeKind::deserialize(params).map_err(|e| {
        ProviderError::InvalidParams(format!(
            "azure scope params (`kind` = `app_password` or `access_token`): {e}"
        ))
    })
}

/// Parses and checks a scope at config load.
pub(crate) fn validate(params: &serde_json::Value) -> Result<ScopeKind, ProviderError> {
    let kind = parse(params)?;
    let invalid = |m: String| Err(ProviderError::InvalidParams(m));
    match &kind {
        ScopeKind::AppPassword(p) => {
            if !is_guid(&p.application_object_id) {
                return invalid(format!(
                    "`application_object_id` `{}` is not an object id: write the app registration's object id (a guid; not its client id)",
                    p.application_object_id
                ));
            }
            if !is_guid(&p.client_id) {
                return invalid(format!(
                    "`client_id` `{}` is not an application (client) id: write its guid",
                    p.client_id
                ));
            }
            if p.application_object_id.eq_ignore_ascii_case(&p.client_id) {
                return invalid(
                    "`application_object_id` and `client_id` are the same guid: the object id and the client id of an app registration differ".into(),
                );
            }
            if !(1..=MAX_MAX_PASSWORDS).contains(&p.max_passwords) {
                return invalid(format!(
                    "`max_passwords` must be between 1 and {MAX_MAX_PASSWORDS}, got {}",
                    p.max_passwords
                ));
            }
        }
        ScopeKind::AccessToken(p) => {
            if p.resource.ends_with("/.default") {
                return invalid(format!(
                    "`resource` `{}`: write the resource alone; keygate asks for its `/.default` scope",
                    p.resource
                ));
            }
            check_entra_scope("resource", &p.entra_scope())?;
            if !is_guid(&p.client_id) {
                return invalid(format!(
                    "`client_id` `{}` is not an application (client) id: write its guid",
                    p.client_id
                ));
            }
        }
    }
    Ok(kind)
}

/// Entra scopes as azure_identity accepts them: letters, digits and
/// `.-_:/`, so a bad one is a start-up error, not a failed request.
pub(crate) fn check_entra_scope(field: &str, scope: &str) -> Result<(), ProviderError> {
    let ok = |c: char| c.is_alphanumeric() || ".-_:/".contains(c);
    if scope.is_empty() || scope.starts_with('/') || !scope.chars().all(ok) {
        return Err(ProviderError::InvalidParams(format!(
            "`{field}` gives the entra scope `{scope}`, which azure_identity refuses: use letters, digits and `.-_:/` only"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use serde_json::json;

    use super::*;

    const APP: &str = "6a8b4b7e-0000-4c5d-9e2f-0000000000a1";
    const CLIENT: &str = "6a8b4b7e-0000-4c5d-9e2f-0000000000c1";

    fn check(params: serde_json::Value) -> Result<ScopeKind, String> {
        validate(&params).map_err(|e| e.to_string())
    }

    #[test]
    fn app_password_scopes() {
        let k = check(
            json!({"kind": "app_password", "application_object_id": APP, "client_id": CLIENT}),
        )
        .unwrap();
        let ScopeKind::AppPassword(p) = k else {
            panic!("{k:?}")
        };
        assert_eq!(p.max_passwords, 5);
        for (params, needle) in [
            (
                json!({"kind": "app_password", "client_id": CLIENT}),
                "application_object_id",
            ),
            (
                json!({"kind": "app_password", "application_object_id": "my-app", "client_id": CLIENT}),
                "`application_object_id` `my-app`",
            ),
            (
                json!({"kind": "app_password", "application_object_id": APP, "client_id": APP}),
                "differ",
            ),
            (
                json!({"kind": "app_password", "application_object_id": APP, "client_id": CLIENT, "max_passwords": 0}),
                "`max_passwords`",
            ),
            (
                json!({"kind": "app_password", "application_object_id": APP, "client_id": CLIENT, "ttl": 5}),
                "`ttl`",
            ),
            (json!({"kind": "service_principal"}), "`service_principal`"),
            (json!(null), "kind"),
        ] {
            let err = check(params.clone()).unwrap_err();
            assert!(err.contains(needle), "{params}: {err}");
        }
    }

    #[test]
    fn access_token_scopes() {
        let k = check(
            json!({"kind": "access_token", "resource": "https://management.azure.com/",
            "client_id": CLIENT, "client_secret": "env:ARM_READER_SECRET"}),
        )
        .unwrap();
        let ScopeKind::AccessToken(p) = k else {
            panic!("{k:?}")
        };
        assert_eq!(p.entra_scope(), "https://management.azure.com/.default");
        assert_eq!(p.client_secret, SecretRef::Env("ARM_READER_SECRET".into()));
        for (params, needle) in [
            (
                json!({"kind": "access_token", "resource": "https://vault.azure.net/.default",
                    "client_id": CLIENT, "client_secret": "env:X"}),
                "write the resource alone",
            ),
            (
                json!({"kind": "access_token", "resource": "https://x y",
                    "client_id": CLIENT, "client_secret": "env:X"}),
                "azure_identity refuses",
            ),
            (
                json!({"kind": "access_token", "resource": "https://management.azure.com",
                    "client_id": CLIENT, "client_secret": "s3cr3t-literal"}),
                "not valid",
            ),
            (
                json!({"kind": "access_token", "resource": "https://management.azure.com",
                    "client_id": CLIENT}),
                "client_secret",
            ),
        ] {
            let err = check(params.clone()).unwrap_err();
            assert!(err.contains(needle), "{params}: {err}");
            assert!(!err.contains("s3cr3t-literal"), "{err}");
        }
    }
}
