//! Builds provider instances from `[providers.<name>]` tables: the one place
//! that knows backends by kind.

use std::collections::BTreeMap;
use std::sync::Arc;

use keygate_provider_api::{Provider, ScopeSpec, SecretResolver};

use crate::config::{Config, ConfigError};

/// Provider instances by name, and scopes as providers see them.
#[derive(Clone)]
pub struct Registry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
    scopes: BTreeMap<String, ScopeSpec>,
    /// Each provider instance's scopes, for its sweeper.
    by_provider: BTreeMap<String, Vec<ScopeSpec>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("scopes", &self.scopes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// Builds every configured provider and checks every scope against its
    /// provider.
    pub async fn build(cfg: &Config) -> Result<Self, ConfigError> {
        let resolver = secret_resolver(cfg).await?;
        let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        for (name, table) in &cfg.providers {
            providers.insert(name.clone(), build_one(name, table, &resolver).await?);
        }
        let mut scopes = BTreeMap::new();
        let mut by_provider: BTreeMap<String, Vec<ScopeSpec>> = BTreeMap::new();
        for s in &cfg.scopes {
            let spec = ScopeSpec {
                name: s.name.clone(),
                max_ttl: s.max_ttl(),
                params: serde_json::to_value(&s.params)
                    .map_err(|e| ConfigError::Invalid(format!("scope `{}`: {e}", s.name)))?,
            };
            let provider = providers.get(&s.provider).ok_or_else(|| {
                ConfigError::Invalid(format!("scope `{}`: unknown provider", s.name))
            })?;
            provider
                .validate_scope(&spec)
                .map_err(|e| ConfigError::Invalid(format!("scope `{}`: {e}", s.name)))?;
            by_provider
                .entry(s.provider.clone())
                .or_default()
                .push(spec.clone());
            scopes.insert(s.name.clone(), spec);
        }
        Ok(Self {
            providers,
            scopes,
            by_provider,
        })
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    pub fn scope(&self, name: &str) -> Option<&ScopeSpec> {
        self.scopes.get(name)
    }

    /// The scope a lease was minted for, or a bare stand-in when the scope
    /// has since been removed from config (its leases must still be revoked).
    pub fn scope_or_removed(&self, name: &str) -> ScopeSpec {
        self.scopes.get(name).cloned().unwrap_or(ScopeSpec {
            name: name.to_owned(),
            max_ttl: std::time::Duration::ZERO,
            params: serde_json::Value::Null,
        })
    }

    /// The scopes configured on one provider instance.
    pub fn provider_scopes(&self, provider: &str) -> &[ScopeSpec] {
        self.by_provider.get(provider).map_or(&[], Vec::as_slice)
    }

    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// Every provider instance with its name.
    pub fn providers(&self) -> impl Iterator<Item = (&str, &Arc<dyn Provider>)> {
        self.providers.iter().map(|(n, p)| (n.as_str(), p))
    }
}

/// Reads Keygate's own secret references (`env:`, `file:`, and `aws-sm:`
/// through the settings of the one `aws` provider, when there is exactly
/// one), for the providers that take root secrets by reference.
async fn secret_resolver(cfg: &Config) -> Result<SecretResolver, ConfigError> {
    let resolver = SecretResolver::new();
    #[cfg(feature = "aws")]
    {
        let kind_is =
            |t: &toml::Table, k: &str| t.get("kind").and_then(toml::Value::as_str) == Some(k);
        let aws: Vec<(&String, &toml::Table)> = cfg
            .providers
            .iter()
            .filter(|(_, t)| kind_is(t, keygate_provider_aws::KIND))
            .collect();
        match aws.as_slice() {
            [(name, table)] => {
                let mut settings = (*table).clone();
                settings.remove("kind");
                let invalid = |e: &dyn std::fmt::Display| {
                    ConfigError::Invalid(format!("provider `{name}`: {e}"))
                };
                let aws_cfg: keygate_provider_aws::AwsConfig = toml::Value::Table(settings)
                    .try_into()
                    .map_err(|e| invalid(&e))?;
                let source = keygate_provider_aws::SecretsManagerSource::open(&aws_cfg)
                    .await
                    .map_err(|e| invalid(&e))?;
                return Ok(resolver.with_source(Arc::new(source)));
            }
            [] => {}
            several => tracing::warn!(
                count = several.len(),
                "several `aws` providers are configured: `aws-sm:` secret references are not available (which account would they read?)"
            ),
        }
    }
    #[cfg(not(feature = "aws"))]
    let _ = cfg;
    Ok(resolver)
}

async fn build_one(
    name: &str,
    table: &toml::Table,
    resolver: &SecretResolver,
) -> Result<Arc<dyn Provider>, ConfigError> {
    #[cfg(not(feature = "azure"))]
    let _ = resolver;
    let mut settings = table.clone();
    let kind = match settings.remove("kind") {
        Some(toml::Value::String(k)) => k,
        _ => {
            return Err(ConfigError::Invalid(format!(
                "provider `{name}` needs a `kind`"
            )));
        }
    };
    let invalid =
        |e: &dyn std::fmt::Display| ConfigError::Invalid(format!("provider `{name}`: {e}"));
    match kind.as_str() {
        "local-ca" => {
            let cfg: keygate_provider_local_ca::LocalCaConfig = toml::Value::Table(settings)
                .try_into()
                .map_err(|e| invalid(&e))?;
            let ca = keygate_provider_local_ca::LocalCa::open(cfg)
                .await
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(ca))
        }
        #[cfg(feature = "vault")]
        keygate_provider_vault::KIND => {
            let cfg: keygate_provider_vault::VaultConfig = toml::Value::Table(settings)
                .try_into()
                .map_err(|e| invalid(&e))?;
            let vault =
                keygate_provider_vault::VaultProvider::open(cfg).map_err(|e| invalid(&e))?;
            Ok(Arc::new(vault))
        }
        #[cfg(feature = "aws")]
        keygate_provider_aws::KIND => {
            let cfg: keygate_provider_aws::AwsConfig = toml::Value::Table(settings)
                .try_into()
                .map_err(|e| invalid(&e))?;
            let aws = keygate_provider_aws::AwsProvider::open(cfg)
                .await
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(aws))
        }
        #[cfg(feature = "azure")]
        keygate_provider_azure::KIND => {
            let cfg: keygate_provider_azure::AzureConfig = toml::Value::Table(settings)
                .try_into()
                .map_err(|e| invalid(&e))?;
            let azure = keygate_provider_azure::AzureProvider::open(cfg, resolver.clone())
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(azure))
        }
        other => Err(ConfigError::Invalid(format!(
            "provider `{name}`: unknown kind `{other}` (available: {})",
            KINDS.join(", ")
        ))),
    }
}

/// The provider kinds this build knows.
const KINDS: &[&str] = &[
    "local-ca",
    #[cfg(feature = "vault")]
    "vault",
    #[cfg(feature = "aws")]
    "aws",
    #[cfg(feature = "azure")]
    "azure",
];
