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
    /// With `journal` (a store shared by several replicas), providers keep
    /// what every replica must see there (the local CA's revocation list).
    pub async fn build(
        cfg: &Config,
        resolver: &SecretResolver,
        journal: Option<Arc<dyn keygate_provider_api::RevocationJournal>>,
    ) -> Result<Self, ConfigError> {
        // Every table is checked before any provider is opened (opening may
        // create files or call a backend).
        check_configs(cfg)?;
        let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        for (name, table) in &cfg.providers {
            providers.insert(
                name.clone(),
                build_one(name, table, resolver, journal.clone()).await?,
            );
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

    /// Whether `lease`'s provider must act when it reaches its TTL (rotate a
    /// secret, end a renewable token), judged from what it was minted with:
    /// its handle, not the scope as configured now. A lease whose provider
    /// is no longer configured has nobody to act.
    pub fn acts_at_expiry(&self, lease: &crate::model::Lease) -> bool {
        let Some(p) = self.providers.get(&lease.provider) else {
            return false;
        };
        let spec = self.scope_or_removed(&lease.scope);
        match &lease.handle {
            Some(h) => p.acts_at_expiry_of(&spec, h),
            None => p.acts_at_expiry(&spec),
        }
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
pub async fn secret_resolver(cfg: &Config) -> Result<SecretResolver, ConfigError> {
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

/// A provider table, parsed and checked, not yet opened.
enum Parsed {
    LocalCa(keygate_provider_local_ca::LocalCaConfig),
    #[cfg(feature = "vault")]
    Vault(keygate_provider_vault::VaultConfig),
    #[cfg(feature = "aws")]
    Aws(keygate_provider_aws::AwsConfig),
    #[cfg(feature = "azure")]
    Azure(keygate_provider_azure::AzureConfig),
}

/// Parses and checks every `[providers.*]` table without side effects (no
/// file is created, no backend called): a bad table, or a secret written
/// where its reference belongs, stops Keygate before it writes anything.
pub fn check_configs(cfg: &Config) -> Result<(), ConfigError> {
    for (name, table) in &cfg.providers {
        parse_one(name, table)?;
    }
    Ok(())
}

fn parse_one(name: &str, table: &toml::Table) -> Result<Parsed, ConfigError> {
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
    let table = toml::Value::Table(settings);
    match kind.as_str() {
        "local-ca" => Ok(Parsed::LocalCa(table.try_into().map_err(|e| invalid(&e))?)),
        #[cfg(feature = "vault")]
        keygate_provider_vault::KIND => {
            let cfg: keygate_provider_vault::VaultConfig =
                table.try_into().map_err(|e| invalid(&e))?;
            cfg.check().map_err(|e| invalid(&e))?;
            Ok(Parsed::Vault(cfg))
        }
        #[cfg(feature = "aws")]
        keygate_provider_aws::KIND => Ok(Parsed::Aws(table.try_into().map_err(|e| invalid(&e))?)),
        #[cfg(feature = "azure")]
        keygate_provider_azure::KIND => {
            Ok(Parsed::Azure(table.try_into().map_err(|e| invalid(&e))?))
        }
        other => Err(ConfigError::Invalid(format!(
            "provider `{name}`: unknown kind `{other}` (available: {})",
            KINDS.join(", ")
        ))),
    }
}

async fn build_one(
    name: &str,
    table: &toml::Table,
    resolver: &SecretResolver,
    journal: Option<Arc<dyn keygate_provider_api::RevocationJournal>>,
) -> Result<Arc<dyn Provider>, ConfigError> {
    #[cfg(not(any(feature = "azure", feature = "vault")))]
    let _ = resolver;
    let invalid =
        |e: &dyn std::fmt::Display| ConfigError::Invalid(format!("provider `{name}`: {e}"));
    match parse_one(name, table)? {
        Parsed::LocalCa(cfg) => {
            let shared = journal.map(|j| (j, name.to_owned()));
            let ca = keygate_provider_local_ca::LocalCa::open_shared(cfg, shared)
                .await
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(ca))
        }
        #[cfg(feature = "vault")]
        Parsed::Vault(cfg) => {
            let vault = keygate_provider_vault::VaultProvider::open(cfg, resolver.clone())
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(vault))
        }
        #[cfg(feature = "aws")]
        Parsed::Aws(cfg) => {
            let aws = keygate_provider_aws::AwsProvider::open(cfg)
                .await
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(aws))
        }
        #[cfg(feature = "azure")]
        Parsed::Azure(cfg) => {
            let azure = keygate_provider_azure::AzureProvider::open(cfg, resolver.clone())
                .map_err(|e| invalid(&e))?;
            Ok(Arc::new(azure))
        }
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
