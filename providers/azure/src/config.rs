//! The `[providers.<name>]` table of an `azure` provider.

use std::path::PathBuf;
use std::time::Duration;

use keygate_provider_api::{ProviderError, SecretRef};
use serde::Deserialize;
use url::Url;

/// Entra's authority in Azure's public cloud.
pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Microsoft Graph v1.0 in Azure's public cloud.
pub const PUBLIC_GRAPH: &str = "https://graph.microsoft.com/v1.0";
/// How often the sweeper looks for leftover app passwords by default.
const DEFAULT_SWEEP_SECS: u64 = 300;

/// How Keygate reaches Entra and Graph, and who it is there. Endpoints come
/// from config so sovereign clouds (and test stand-ins) work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The directory (tenant) id Keygate and the scopes' apps live in.
    pub tenant_id: String,
    /// Entra's authority host; https only. Default: Azure's public cloud.
    #[serde(default = "default_authority")]
    pub authority_host: String,
    /// Microsoft Graph's base URL including its version; https only.
    #[serde(default = "default_graph")]
    pub graph_endpoint: String,
    /// The scope Keygate asks Entra for to call Graph. Default: the origin
    /// of `graph_endpoint` + `/.default`.
    pub graph_scope: Option<String>,
    /// A PEM file of extra root certificates trusted for Entra and Graph
    /// (private clouds, TLS-inspecting proxies, tests).
    pub ca_file: Option<PathBuf>,
    /// Seconds between sweeps for leftover Keygate app passwords (also one
    /// at start).
    #[serde(default = "default_sweep_secs")]
    pub sweep_interval_secs: u64,
    /// Revocations (removePassword calls) in flight at once; unset leaves
    /// only the broker's per-provider limit.
    pub max_concurrent_revocations: Option<usize>,
    /// Keygate's own identity in Entra.
    pub auth: AuthConfig,
}

/// Keygate's own credential for Graph (it needs `Application.ReadWrite.OwnedBy`
/// on the scopes' apps, or `Application.ReadWrite.All`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// An app registration's client secret, read by reference
    /// (`env:`, `file:`, `aws-sm:`) at first use and again after Entra
    /// refuses it, so a rotated secret is picked up.
    ClientSecret {
        /// The app's client (application) id.
        client_id: String,
        /// Where the secret lives; never the secret itself.
        client_secret: SecretRef,
    },
    /// Workload identity federation: a federated token file (Kubernetes
    /// projected service-account token), re-read as it is rotated.
    WorkloadIdentity {
        /// The app's (or user-assigned identity's) client id.
        client_id: String,
        /// The federated token file.
        token_file: PathBuf,
    },
    /// The Azure VM's or App Service's managed identity.
    ManagedIdentity {
        /// A user-assigned identity's client id; unset for the
        /// system-assigned identity.
        client_id: Option<String>,
    },
}

fn default_authority() -> String {
    PUBLIC_AUTHORITY.into()
}
fn default_graph() -> String {
    PUBLIC_GRAPH.into()
}
fn default_sweep_secs() -> u64 {
    DEFAULT_SWEEP_SECS
}

impl AzureConfig {
    /// Checks what can be checked without calling Azure; returns the parsed
    /// authority and Graph URLs and Keygate's Graph scope.
    pub(crate) fn validate(&self) -> Result<Checked, ProviderError> {
        let invalid = |m: String| ProviderError::InvalidParams(m);
        if !is_guid(&self.tenant_id) {
            return Err(invalid(format!(
                "`tenant_id` `{}` is not a directory (tenant) id: write its guid",
                self.tenant_id
            )));
        }
        let authority = https_url("authority_host", &self.authority_host)?;
        let graph = https_url("graph_endpoint", &self.graph_endpoint)?;
        let graph_scope = match &self.graph_scope {
            Some(s) => {
                crate::scope::check_entra_scope("graph_scope", s)?;
                s.clone()
            }
            None => format!("{}/.default", graph.origin().ascii_serialization()),
        };
        if self.sweep_interval_secs == 0 {
            return Err(invalid("`sweep_interval_secs` must be at least 1".into()));
        }
        if self.max_concurrent_revocations == Some(0) {
            return Err(invalid(
                "`max_concurrent_revocations` must be at least 1".into(),
            ));
        }
        match &self.auth {
            AuthConfig::ClientSecret { client_id, .. }
            | AuthConfig::WorkloadIdentity { client_id, .. }
                if !is_guid(client_id) =>
            {
                return Err(invalid(format!(
                    "`auth.client_id` `{client_id}` is not an application (client) id: write its guid"
                )));
            }
            AuthConfig::ManagedIdentity {
                client_id: Some(id),
            } if !is_guid(id) => {
                return Err(invalid(format!(
                    "`auth.client_id` `{id}` is not a managed identity's client id: write its guid, or leave it out for the system-assigned identity"
                )));
            }
            _ => {}
        }
        Ok(Checked {
            authority,
            graph,
            graph_scope,
        })
    }

    /// How often to sweep.
    pub(crate) fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs)
    }
}

/// The settings after checking.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub authority: Url,
    pub graph: Url,
    pub graph_scope: String,
}

fn https_url(field: &str, value: &str) -> Result<Url, ProviderError> {
    let url = Url::parse(value).map_err(|e| {
        ProviderError::InvalidParams(format!("`{field}` `{value}` is not a url: {e}"))
    })?;
    if url.scheme() != "https" || url.host_str().is_none() {
        return Err(ProviderError::InvalidParams(format!(
            "`{field}` `{value}` must be an https url: Entra tokens and app secrets never travel in the clear (azure_identity refuses plain http too)"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ProviderError::InvalidParams(format!(
            "`{field}` `{value}` must not have a query or fragment"
        )));
    }
    Ok(url)
}

/// Whether `s` is a guid as Entra writes object, tenant and client ids.
pub(crate) fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const CLIENT: &str = "00000000-0000-0000-0000-00000000c11e";

    fn cfg(extra: &str) -> Result<AzureConfig, String> {
        let text = format!(
            "tenant_id = \"{TENANT}\"\n{extra}\n[auth]\nmethod = \"client_secret\"\nclient_id = \"{CLIENT}\"\nclient_secret = \"env:KEYGATE_AZURE_SECRET\"\n"
        );
        toml_like(&text)
    }

    fn toml_like(text: &str) -> Result<AzureConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_public_cloud() {
        let c = cfg("").unwrap();
        let checked = c.validate().unwrap();
        assert_eq!(
            checked.authority.as_str(),
            "https://login.microsoftonline.com/"
        );
        assert_eq!(checked.graph_scope, "https://graph.microsoft.com/.default");
        assert_eq!(c.sweep_interval(), Duration::from_secs(300));
    }

    #[test]
    fn sovereign_clouds_derive_the_graph_scope() {
        let c = cfg(
            "authority_host = \"https://login.microsoftonline.us\"\ngraph_endpoint = \"https://graph.microsoft.us/v1.0\"",
        )
        .unwrap();
        assert_eq!(
            c.validate().unwrap().graph_scope,
            "https://graph.microsoft.us/.default"
        );
    }

    #[test]
    fn refuses_what_azure_would() {
        for (extra, needle) in [
            (
                "authority_host = \"http://127.0.0.1:8080\"",
                "`authority_host` `http://127.0.0.1:8080` must be an https url",
            ),
            (
                "graph_endpoint = \"http://graph.local/v1.0\"",
                "`graph_endpoint`",
            ),
            ("authority_host = \"login\"", "is not a url"),
            ("sweep_interval_secs = 0", "`sweep_interval_secs`"),
            ("max_concurrent_revocations = 0", "at least 1"),
            ("graph_scope = \"has space\"", "`graph_scope`"),
        ] {
            let err = cfg(extra).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let err = toml_like("tenant_id = \"contoso\"\n[auth]\nmethod = \"managed_identity\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tenant_id` `contoso`"), "{err}");
    }

    #[test]
    fn auth_methods() {
        let c = toml_like(&format!(
            "tenant_id = \"{TENANT}\"\n[auth]\nmethod = \"workload_identity\"\nclient_id = \"{CLIENT}\"\ntoken_file = \"/var/run/secrets/azure/tokens/azure-identity-token\"\n"
        ))
        .unwrap();
        assert!(matches!(c.auth, AuthConfig::WorkloadIdentity { .. }));
        c.validate().unwrap();
        let c = toml_like(&format!(
            "tenant_id = \"{TENANT}\"\n[auth]\nmethod = \"managed_identity\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        // A literal secret is not a reference.
        let err = toml_like(&format!(
            "tenant_id = \"{TENANT}\"\n[auth]\nmethod = \"client_secret\"\nclient_id = \"{CLIENT}\"\nclient_secret = \"abc~def\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("not valid"), "{err}");
        let err = toml_like(&format!(
            "tenant_id = \"{TENANT}\"\n[auth]\nmethod = \"password\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("password"), "{err}");
        let err = toml_like(&format!(
            "tenant_id = \"{TENANT}\"\n[auth]\nmethod = \"client_secret\"\nclient_id = \"app\"\nclient_secret = \"env:X\"\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`auth.client_id` `app`"), "{err}");
    }

    #[test]
    fn guids() {
        assert!(is_guid(TENANT));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("72f988bf86f141af91ab2d7cd011db47"));
        assert!(!is_guid("zzf988bf-86f1-41af-91ab-2d7cd011db47"));
    }
}
