//! The `[providers.<name>]` table of a `vault` provider.
//!
//! Config names where Keygate's own Vault credentials live (a file, an
//! environment variable, or a secret reference such as `aws-sm:ID`), never
//! the credentials themselves: a literal `secret_id` or `token` is refused
//! at load time without being repeated.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use keygate_provider_api::{ProviderError, SecretRef, SecretResolver};
use secrecy::SecretString;
use serde::Deserialize;

/// How to reach one Vault or OpenBao server, and how Keygate logs in to it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Base URL, e.g. `https://vault.example.org:8200` (no `/v1`).
    pub address: String,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// PEM bundle of the CAs that sign the server's certificate (https only).
    #[serde(default)]
    pub ca_cert_file: Option<PathBuf>,
    /// How Keygate authenticates to Vault.
    pub auth: AuthConfig,
    /// Revocations in flight at once against this server (the broker also
    /// applies `leases.revoke_concurrency`; the smaller wins), so an
    /// emergency revocation of thousands of leases does not flood Vault.
    #[serde(default)]
    pub max_concurrent_revocations: Option<usize>,
    /// Timeout of one HTTP call to Vault.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// A token role (`auth/token/roles/<name>`, with `orphan = true` and the
    /// scopes' policies in `allowed_policies`) that agents' tokens are
    /// created against: they have no parent, so they live exactly their
    /// lease whatever happens to Keygate's own login. Without it, agents'
    /// tokens are children of Keygate's login and die with it.
    #[serde(default)]
    pub token_role: Option<String>,
}

fn default_timeout() -> u64 {
    10
}

impl fmt::Debug for VaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultConfig")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .field("auth", &self.auth.method_name())
            .field(
                "max_concurrent_revocations",
                &self.max_concurrent_revocations,
            )
            .finish_non_exhaustive()
    }
}

/// `auth = { method = "approle", ... }` or `auth = { method = "token", ... }`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `approle` or `token`.
    pub method: String,
    /// AppRole mount path (default `approle`).
    #[serde(default)]
    pub mount: Option<String>,
    /// AppRole role id (an identifier, not a secret).
    #[serde(default)]
    pub role_id: Option<String>,
    /// File holding the AppRole secret id, read at each login.
    #[serde(default)]
    pub secret_id_file: Option<PathBuf>,
    /// Environment variable holding the AppRole secret id.
    #[serde(default)]
    pub secret_id_env: Option<String>,
    /// File holding a Vault token, re-read at each re-authentication.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding a Vault token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A reference to the AppRole secret id: `env:NAME`, `file:PATH` or
    /// `aws-sm:SECRET-ID`. A literal secret id is refused (never repeated).
    #[serde(default)]
    pub secret_id: Option<String>,
    /// A reference to a Vault token, as `secret_id`.
    #[serde(default)]
    pub token: Option<String>,
}

impl AuthConfig {
    fn method_name(&self) -> &str {
        &self.method
    }
}

/// Where a secret is read from, at the point of use.
#[derive(Debug, Clone)]
pub(crate) enum SecretSource {
    File(PathBuf),
    Env(String),
    /// A secret reference, read through the broker's resolver (`aws-sm:`).
    Ref(SecretRef),
}

impl SecretSource {
    /// Reads the secret now (a rotated file or secret is picked up at the
    /// next login).
    pub(crate) async fn read(
        &self,
        resolver: &SecretResolver,
    ) -> Result<SecretString, ProviderError> {
        let raw = match self {
            Self::Ref(r) => return resolver.resolve(r).await,
            Self::File(p) => std::fs::read_to_string(p).map_err(|e| {
                ProviderError::Internal(format!("cannot read `{}`: {e}", p.display()))
            })?,
            Self::Env(v) => std::env::var(v).map_err(|_| {
                ProviderError::Internal(format!("environment variable `{v}` is not set"))
            })?,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(ProviderError::Internal(format!("{self} is empty")));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file `{}`", p.display()),
            Self::Env(v) => write!(f, "environment variable `{v}`"),
            Self::Ref(r) => write!(f, "secret `{r}`"),
        }
    }
}

/// The checked login method.
#[derive(Debug, Clone)]
pub(crate) enum Login {
    AppRole {
        mount: String,
        role_id: String,
        secret_id: SecretSource,
    },
    Token(SecretSource),
}

fn one_source(
    reference: &Option<String>,
    file: &Option<PathBuf>,
    env: &Option<String>,
    what: &str,
) -> Result<SecretSource, ProviderError> {
    match (reference, file, env) {
        (Some(r), None, None) => r.parse().map(SecretSource::Ref).map_err(|_| {
            invalid(format!(
                "`{what}` must be a reference (`env:NAME`, `file:PATH`, `aws-sm:SECRET-ID`), never the secret itself (the value is not shown)"
            ))
        }),
        (None, Some(f), None) => Ok(SecretSource::File(f.clone())),
        (None, None, Some(e)) => Ok(SecretSource::Env(e.clone())),
        _ => Err(invalid(format!(
            "give exactly one of `{what}` (a reference), `{what}_file` and `{what}_env`"
        ))),
    }
}

fn invalid(msg: String) -> ProviderError {
    ProviderError::InvalidParams(msg)
}

impl VaultConfig {
    /// Checks the table without side effects: the login method (no secret
    /// written in the file) and the address.
    pub fn check(&self) -> Result<(), ProviderError> {
        self.login()?;
        self.checked_address()?;
        if let Some(role) = &self.token_role {
            crate::scope::check_path(role, "token role")?;
        }
        Ok(())
    }

    /// Checks the table and returns the login method.
    pub(crate) fn login(&self) -> Result<Login, ProviderError> {
        let a = &self.auth;
        match a.method.as_str() {
            "approle" => {
                if a.token.is_some() || a.token_file.is_some() || a.token_env.is_some() {
                    return Err(invalid(
                        "`token`/`token_file`/`token_env` belong to `method = \"token\"`".into(),
                    ));
                }
                let role_id = a
                    .role_id
                    .clone()
                    .filter(|r| !r.trim().is_empty())
                    .ok_or_else(|| invalid("the approle method needs `role_id`".into()))?;
                let mount = a.mount.clone().unwrap_or_else(|| "approle".into());
                crate::scope::check_path(&mount, "auth mount")?;
                Ok(Login::AppRole {
                    mount,
                    role_id,
                    secret_id: one_source(
                        &a.secret_id,
                        &a.secret_id_file,
                        &a.secret_id_env,
                        "secret_id",
                    )?,
                })
            }
            "token" => {
                if a.role_id.is_some()
                    || a.secret_id.is_some()
                    || a.secret_id_file.is_some()
                    || a.secret_id_env.is_some()
                {
                    return Err(invalid(
                        "`role_id`/`secret_id_*` belong to `method = \"approle\"`".into(),
                    ));
                }
                Ok(Login::Token(one_source(
                    &a.token,
                    &a.token_file,
                    &a.token_env,
                    "token",
                )?))
            }
            other => Err(invalid(format!(
                "unknown auth method `{other}` (use `approle` or `token`)"
            ))),
        }
    }

    /// Checks the address: `http` or `https`, no path beyond `/`.
    pub(crate) fn checked_address(&self) -> Result<String, ProviderError> {
        let a = self.address.trim_end_matches('/');
        let rest = a
            .strip_prefix("https://")
            .or_else(|| a.strip_prefix("http://"))
            .ok_or_else(|| {
                invalid(format!(
                    "address `{}` must start with http:// or https://",
                    self.address
                ))
            })?;
        if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
            return Err(invalid(format!(
                "address `{}` must be scheme://host[:port] without a path",
                self.address
            )));
        }
        if self.ca_cert_file.is_some() && a.starts_with("http://") {
            return Err(invalid("`ca_cert_file` needs an https address".into()));
        }
        if self.max_concurrent_revocations == Some(0) {
            return Err(invalid(
                "`max_concurrent_revocations` must be at least 1".into(),
            ));
        }
        Ok(a.to_owned())
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_auth: &str) -> Result<Login, ProviderError> {
        let v: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"address": "http://127.0.0.1:8200", "auth": {toml_auth}}}"#
        ))
        .unwrap();
        let cfg: VaultConfig = serde_json::from_value(v).map_err(|e| invalid(e.to_string()))?;
        cfg.checked_address()?;
        cfg.login()
    }

    #[test]
    fn literal_secrets_are_refused() {
        let e = parse(r#"{"method": "approle", "role_id": "r", "secret_id": "s3cr3t"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("never the secret"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = parse(r#"{"method": "token", "token": "hvs.x"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("never the secret") && !e.contains("hvs.x"),
            "{e}"
        );
    }

    #[test]
    fn sources() {
        assert!(parse(r#"{"method": "approle", "role_id": "r", "secret_id_file": "/f"}"#).is_ok());
        assert!(parse(r#"{"method": "approle", "role_id": "r", "secret_id_env": "E"}"#).is_ok());
        for reference in ["aws-sm:prod/keygate-approle", "env:E", "file:/f"] {
            let auth =
                format!(r#"{{"method": "approle", "role_id": "r", "secret_id": "{reference}"}}"#);
            assert!(
                matches!(parse(&auth), Ok(Login::AppRole { secret_id: SecretSource::Ref(r), .. }) if r.to_string() == reference),
                "{reference}"
            );
        }
        assert!(matches!(
            parse(r#"{"method": "token", "token": "aws-sm:vault-token"}"#),
            Ok(Login::Token(SecretSource::Ref(_)))
        ));
        assert!(parse(r#"{"method": "approle", "role_id": "r"}"#).is_err());
        assert!(
            parse(r#"{"method": "approle", "role_id": "r", "secret_id_env": "E", "secret_id_file": "/f"}"#)
                .is_err()
        );
        assert!(
            parse(r#"{"method": "approle", "role_id": "r", "secret_id": "env:E", "secret_id_file": "/f"}"#)
                .is_err()
        );
        assert!(parse(r#"{"method": "token", "token_env": "VAULT_TOKEN"}"#).is_ok());
        assert!(parse(r#"{"method": "token", "secret_id": "env:E"}"#).is_err());
        assert!(parse(r#"{"method": "ldap"}"#).is_err());
    }

    #[test]
    fn debug_shows_no_paths_to_secrets_or_values() {
        for auth in [
            serde_json::json!({"method": "approle", "role_id": "role-id-7f3a", "secret_id_env": "VAULT_SECRET_ENV_9c1"}),
            serde_json::json!({"method": "approle", "role_id": "role-id-7f3a", "secret_id_file": "/run/secrets/approle-9c1"}),
            serde_json::json!({"method": "token", "token": "env:VAULT_TOKEN_ENV_9c1"}),
        ] {
            let cfg: VaultConfig = serde_json::from_value(serde_json::json!({
                "address": "http://127.0.0.1:8200",
                "auth": auth,
            }))
            .unwrap();
            let d = format!("{cfg:?}");
            // What it shows: where Vault is and how Keygate logs in.
            assert!(d.contains("127.0.0.1"), "{d}");
            assert!(d.contains("approle") || d.contains("token"), "{d}");
            // What it never shows: the role id, or where a secret is kept.
            for hidden in [
                "role-id-7f3a",
                "VAULT_SECRET_ENV_9c1",
                "/run/secrets",
                "VAULT_TOKEN_ENV_9c1",
            ] {
                assert!(!d.contains(hidden), "`{hidden}` in {d}");
            }
        }
    }
}
