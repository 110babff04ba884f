//! Entra identities through azure_identity: Keygate's own (for Graph) and
//! the scopes' apps (for access tokens), all on one reqwest client that
//! trusts the configured extra roots.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, Secret, TokenCredential};
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use keygate_provider_api::{ProviderError, SecretRef, SecretResolver};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;
use url::Url;

use crate::config::AuthConfig;
use crate::error;

/// How long one call to Entra or Graph may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP client for Entra and Graph: https only, no redirects (Graph and
/// Entra do not redirect API calls), the platform's roots plus `extra_roots`.
pub(crate) fn http_client(extra_roots: Option<&[u8]>) -> Result<reqwest::Client, ProviderError> {
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if let Some(pem) = extra_roots {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            ProviderError::InvalidParams(format!("`ca_file` holds no usable pem certificate: {e}"))
        })?;
        if certs.is_empty() {
            return Err(ProviderError::InvalidParams(
                "`ca_file` holds no pem certificate".into(),
            ));
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| ProviderError::Internal(format!("cannot build the https client: {e}")))
}

/// Where and how azure_identity's credentials talk to Entra.
#[derive(Clone)]
pub(crate) struct Entra {
    pub tenant_id: String,
    authority: Url,
    http: reqwest::Client,
}

impl fmt::Debug for Entra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entra")
            .field("tenant_id", &self.tenant_id)
            .field("authority", &self.authority.as_str())
            .finish_non_exhaustive()
    }
}

impl Entra {
    pub(crate) fn new(tenant_id: String, authority: Url, http: reqwest::Client) -> Self {
        Self {
            tenant_id,
            authority,
            http,
        }
    }

    /// azure_identity's pipeline options: the configured authority, Keygate's
    /// HTTP client, and no retries of its own (Keygate's revocation queue
    /// retries durably, and an issue should fail fast with the reason).
    fn client_options(&self) -> ClientOptions {
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = self.authority.as_str().trim_end_matches('/').to_owned();
        ClientOptions {
            transport: Some(Transport::new(Arc::new(self.http.clone()))),
            retry: RetryOptions::none(),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..ClientOptions::default()
        }
    }

    /// A client-secret credential for `client_id` with the secret read now.
    pub(crate) fn client_secret(
        &self,
        client_id: &str,
        secret: &secrecy::SecretString,
    ) -> Result<Arc<ClientSecretCredential>, ProviderError> {
        ClientSecretCredential::new(
            &self.tenant_id,
            client_id.to_owned(),
            Secret::new(secret.expose_secret().to_owned()),
            Some(ClientSecretCredentialOptions {
                client_options: self.client_options(),
            }),
        )
        .map_err(|e| {
            ProviderError::InvalidParams(format!(
                "cannot set up a client-secret credential for app `{client_id}`: {e}"
            ))
        })
    }
}

/// Keygate's own identity in Entra, as configured under `auth`.
pub(crate) struct KeygateCredential {
    source: Source,
}

enum Source {
    /// Workload or managed identity: azure_identity re-reads what it needs.
    Fixed(Arc<dyn TokenCredential>),
    /// A client secret by reference: read at first use, and read again
    /// after Entra refuses it (it may have been rotated).
    Secret(Box<SecretSource>),
}

struct SecretSource {
    client_id: String,
    secret: SecretRef,
    resolver: SecretResolver,
    entra: Entra,
    current: Mutex<Option<Arc<ClientSecretCredential>>>,
}

impl fmt::Debug for KeygateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match &self.source {
            Source::Fixed(_) => "workload or managed identity",
            Source::Secret(_) => "client secret",
        };
        f.debug_struct("KeygateCredential")
            .field("method", &method)
            .finish_non_exhaustive()
    }
}

impl KeygateCredential {
    /// Sets up the configured credential. Nothing is read or requested yet.
    pub(crate) fn new(
        auth: &AuthConfig,
        entra: &Entra,
        resolver: SecretResolver,
    ) -> Result<Self, ProviderError> {
        let bad = |what: &str, e: azure_core::Error| {
            ProviderError::InvalidParams(format!("cannot set up {what}: {e}"))
        };
        let source = match auth {
            AuthConfig::ClientSecret {
                client_id,
                client_secret,
            } => Source::Secret(Box::new(SecretSource {
                client_id: client_id.clone(),
                secret: client_secret.clone(),
                resolver,
                entra: entra.clone(),
                current: Mutex::new(None),
            })),
            AuthConfig::WorkloadIdentity {
                client_id,
                token_file,
            } => {
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: entra.client_options(),
                    },
                    client_id: Some(client_id.clone()),
                    tenant_id: Some(entra.tenant_id.clone()),
                    token_file_path: Some(token_file.clone()),
                };
                let c = WorkloadIdentityCredential::new(Some(options))
                    .map_err(|e| bad("workload identity", e))?;
                Source::Fixed(c)
            }
            AuthConfig::ManagedIdentity { client_id } => {
                let options = ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options: entra.client_options(),
                };
                let c = ManagedIdentityCredential::new(Some(options))
                    .map_err(|e| bad("the managed identity", e))?;
                Source::Fixed(c)
            }
        };
        Ok(Self { source })
    }

    /// A token for `scope` (azure_identity caches it until 5 minutes before
    /// its expiry).
    pub(crate) async fn token(&self, scope: &str) -> Result<AccessToken, ProviderError> {
        match &self.source {
            Source::Fixed(c) => c
                .get_token(&[scope], None)
                .await
                .map_err(|e| error::from_entra("keygate's own identity", &e)),
            Source::Secret(source) => {
                let SecretSource {
                    client_id,
                    secret,
                    resolver,
                    entra,
                    current,
                } = source.as_ref();
                let credential = {
                    let mut slot = current.lock().await;
                    match slot.as_ref() {
                        Some(c) => Arc::clone(c),
                        None => {
                            let value = resolver.resolve(secret).await?;
                            let c = entra.client_secret(client_id, &value)?;
                            *slot = Some(Arc::clone(&c));
                            c
                        }
                    }
                };
                match credential.get_token(&[scope], None).await {
                    Ok(t) => Ok(t),
                    Err(e) => {
                        if error::entra_refused(&e) {
                            // Read the reference again next time: the
                            // secret may have been rotated under us.
                            let mut slot = current.lock().await;
                            if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &credential)) {
                                *slot = None;
                            }
                        }
                        Err(error::from_entra(
                            &format!("keygate's own app `{client_id}`"),
                            &e,
                        ))
                    }
                }
            }
        }
    }
}
