#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! Keygate's Azure provider: Entra credentials through `azure_identity` and
//! Microsoft Graph.
//!
//! Scope kinds:
//! - **`app_password`**: Graph `addPassword` on the scope's app registration,
//!   named `keygate:<agent>:<task>:<lease>` and ending (`endDateTime`) at the
//!   lease's expiry; the agent gets the app's client id, the new client
//!   secret and the tenant id. Revocable: `removePassword` by key id (a
//!   password already gone counts as revoked). Issue refuses when the app
//!   already holds the scope's `max_passwords` live Keygate passwords.
//! - **`access_token`**: an Entra access token for the scope's resource,
//!   obtained with the scope's own app credentials (client credentials).
//!   Entra access tokens cannot be revoked: the lease lives until the
//!   token's expiry, and says so.
//!
//! Keygate's own identity (for Graph) is a client secret by reference, a
//! workload identity token file, or a managed identity; the authority and
//! Graph endpoints come from config, so sovereign clouds work. A sweeper
//! removes Keygate-named passwords whose lease is gone or that expired.

mod access_token;
mod app_password;
mod config;
mod error;
mod graph;
mod identity;
mod provider;
mod scope;
mod sweep;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate_provider_api::{ProviderError, SecretResolver};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use config::{AuthConfig, AzureConfig};

use graph::Graph;
use identity::{Entra, KeygateCredential};

/// The `kind` of this provider in config.
pub const KIND: &str = "azure";

/// A configured Entra tenant. Build it with [`AzureProvider::open`] and hand
/// it to the broker as an `Arc<dyn Provider>`.
pub struct AzureProvider {
    entra: Entra,
    graph: Graph,
    resolver: SecretResolver,
    sweep_every: Duration,
    max_revocations: Option<usize>,
    /// One issue lock per application (see `add_app_password`).
    app_locks: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureProvider")
            .field("entra", &self.entra)
            .finish_non_exhaustive()
    }
}

impl AzureProvider {
    /// Checks the settings, reads `ca_file` and sets up the credentials.
    /// Neither Entra nor Graph is called here, and Keygate's own secret is
    /// read at its first use: the broker starts (and its revocation queue
    /// resumes) while Azure is unreachable.
    pub fn open(cfg: AzureConfig, resolver: SecretResolver) -> Result<Self, ProviderError> {
        let checked = cfg.validate()?;
        let roots = match &cfg.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ProviderError::InvalidParams(format!(
                    "cannot read `ca_file` `{}`: {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let http = identity::http_client(roots.as_deref())?;
        let entra = Entra::new(
            cfg.tenant_id.clone(),
            checked.authority.clone(),
            http.clone(),
        );
        let credential = KeygateCredential::new(&cfg.auth, &entra, resolver.clone())?;
        tracing::info!(tenant = %cfg.tenant_id, authority = %checked.authority, graph = %checked.graph, graph_scope = %checked.graph_scope, identity = ?credential, "azure provider ready");
        Ok(Self {
            graph: Graph::new(http, &checked.graph, checked.graph_scope, credential),
            entra,
            resolver,
            sweep_every: cfg.sweep_interval(),
            max_revocations: cfg.max_concurrent_revocations,
            app_locks: Mutex::new(BTreeMap::new()),
        })
    }
}

fn rfc3339(t: OffsetDateTime) -> Result<String, ProviderError> {
    t.format(&Rfc3339)
        .map_err(|e| ProviderError::Internal(e.to_string()))
}
