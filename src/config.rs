//! `keygate.toml`: the broker's configuration, loaded and checked at start-up.
//!
//! Config holds references to secrets (file paths, token hashes), never the
//! secrets themselves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keygate_provider_api::SecretRef;
use serde::Deserialize;

pub mod lifecycle;
mod messages;
pub(crate) use messages::{describe_toml_error, describe_yaml_error};
mod limits;
mod trust;
pub use lifecycle::{GovernanceConfig, LifecycleAction, LifecyclePolicy};
pub use limits::{ConnectionLimits, RateLimitConfig};
pub use trust::{
    ApprovalsConfig, FederationConfig, NotifyConfig, ProvisioningConfig, SlackConfig,
    TrustedIssuer, WebhookConfig,
};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file `{path}` is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    pub sessions: SessionConfig,
    #[serde(default)]
    pub leases: LeaseConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
    /// Provider instances by name; each table has a `kind` and the
    /// provider's own settings.
    #[serde(default)]
    pub providers: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub scopes: Vec<ScopeConfig>,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    #[serde(default)]
    pub provisioning: ProvisioningConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub limits: RateLimitConfig,
    #[serde(default)]
    pub governance: GovernanceConfig,
    /// Lifecycle policies by risk tier, environment or label.
    #[serde(default)]
    pub lifecycle: Vec<LifecyclePolicy>,
    /// The people directory: sponsors, reviewers, team leads (operators
    /// with an `email` are people too).
    #[serde(default)]
    pub people: Vec<crate::governance::people::PersonConfig>,
    /// Continuous validation: what every detector shares.
    #[serde(default)]
    pub validation: crate::validation::ValidationConfig,
    /// Detectors over each agent's behaviour, and what each does.
    #[serde(default)]
    pub detectors: Vec<crate::validation::DetectorConfig>,
    /// The web console.
    #[serde(default)]
    pub console: ConsoleConfig,
}

/// `[console]`: how people sign in to the web console.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Sign-in through an OIDC issuer (authorization code + PKCE): the name
    /// of a `[[federation.issuers]]` entry with `users = true`, whose
    /// `audience` is the console's client id. An operator signs in as the
    /// `[[operators]]` entry whose `oidc_subject` is the ID token's subject.
    #[serde(default)]
    pub oidc_issuer: Option<String>,
    /// The client secret, for issuers that want one (a secret reference);
    /// without it the console is a public client and PKCE alone binds the code.
    #[serde(default)]
    pub oidc_client_secret: Option<keygate_provider_api::SecretRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The broker's issuer URL (RFC 8414); the token endpoint is
    /// `{issuer}/oauth/token`.
    pub issuer: String,
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    #[serde(default)]
    pub log_format: LogFormat,
    /// An optional second listener with mTLS (RFC 8705 `tls_client_auth`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Connection limits and timeouts, for both listeners.
    #[serde(default)]
    pub connections: ConnectionLimits,
}

/// The mTLS listener: agents present X.509-SVIDs chaining to `client_ca_file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// The broker's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The trust bundle client certificates must chain to (PEM).
    pub client_ca_file: PathBuf,
    /// The SPIFFE trust domain client certificates must be in.
    pub trust_domain: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path/to/file.db` (created on first start), or
    /// `postgres://user@host:5432/db?sslmode=verify-full&sslrootcert=…`
    /// (one Keygate process per database for now: README "The store").
    pub url: String,
    /// PostgreSQL's password, by reference (`env:`, `file:`, `aws-sm:`):
    /// never in the URL.
    #[serde(default)]
    pub password: Option<SecretRef>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/keygate.db".into(),
            password: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// PKCS#8 PEM file with the broker's session-token signing key (P-256);
    /// generated on first start.
    pub signing_key_file: PathBuf,
    #[serde(default = "default_session_ttl")]
    pub default_ttl_secs: u64,
    #[serde(default = "default_session_max_ttl")]
    pub max_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// How often the reaper expires leases and tasks and resolves orphans.
    pub reaper_interval_secs: u64,
    /// The longest a provider call may take; a lease pending for longer is
    /// treated as orphaned and revoked.
    pub issue_timeout_secs: u64,
    /// Revocations in flight at once per provider instance.
    pub revoke_concurrency: usize,
    /// First retry delay after a failed revocation; doubles each attempt.
    pub revoke_backoff_base_ms: u64,
    /// Longest delay between revocation attempts.
    pub revoke_backoff_max_secs: u64,
    /// Providers no longer configured whose leases still in the store are
    /// given up: start-up no longer refuses for them, and Keygate will
    /// never revoke those credentials (their backend may be gone for good).
    #[serde(default)]
    pub abandoned_providers: Vec<String>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            reaper_interval_secs: 2,
            issue_timeout_secs: 30,
            revoke_concurrency: 32,
            revoke_backoff_base_ms: 500,
            revoke_backoff_max_secs: 300,
            abandoned_providers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Folder of `*.cedar` policy files and an optional `*.cedarschema`.
    pub dir: PathBuf,
    /// What a reload does to live leases the new set no longer permits:
    /// `revoke` (default) or `report`.
    #[serde(default)]
    pub on_change: crate::broker::OnChange,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: "config/policies".into(),
            on_change: crate::broker::OnChange::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Folder of `*.toml` agent definitions registered on start if absent.
    pub seed_dir: Option<PathBuf>,
}

/// A human who may call the admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    pub name: String,
    pub roles: Vec<Role>,
    /// Hex SHA-256 of the operator's bearer token.
    pub token_sha256: String,
    /// The operator's team, for approvals restricted to some teams.
    #[serde(default)]
    pub team: Option<String>,
    /// The operator's email: an agent whose `sponsor` it is counts the
    /// operator as its sponsor.
    #[serde(default)]
    pub email: Option<String>,
    /// The operator's Slack user id (`U…`), for decisions made in Slack.
    #[serde(default)]
    pub slack_user_id: Option<String>,
    /// The subject of the operator's ID token at `[console] oidc_issuer`,
    /// for signing in to the console without the token.
    #[serde(default)]
    pub oidc_subject: Option<String>,
}

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Secops,
    Approver,
    Auditor,
    /// A resource server that may introspect session tokens (RFC 7662).
    Introspector,
}

/// A named credential template bound to one provider instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    pub name: String,
    pub provider: String,
    pub max_ttl_secs: u64,
    #[serde(default)]
    pub sensitive: bool,
    #[serde(default)]
    pub description: String,
    /// Approvals a sensitive request needs; default by the agent's risk tier.
    #[serde(default)]
    pub approvals: Option<u32>,
    /// Teams whose approvers may decide; empty means any approver.
    #[serde(default)]
    pub approver_teams: Vec<String>,
    /// Slack channel for this scope's approval requests.
    #[serde(default)]
    pub slack_channel: Option<String>,
    /// Provider-specific parameters.
    #[serde(default)]
    pub params: toml::Table,
    /// Usage limit: live credentials of this scope one agent may hold at
    /// once; more are refused with 429.
    #[serde(default)]
    pub max_live_leases_per_agent: Option<u32>,
}

impl ScopeConfig {
    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(self.max_ttl_secs)
    }
}

fn default_body_limit() -> usize {
    64 * 1024
}
fn default_session_ttl() -> u64 {
    3600
}
fn default_session_max_ttl() -> u64 {
    4 * 3600
}

impl Config {
    /// Every secret reference in the config, with the setting it fills
    /// (`notify.slack.signing_secret`, …), for checking them all at start.
    pub fn secret_references(&self) -> Vec<(String, keygate_provider_api::SecretRef)> {
        let mut refs = Vec::new();
        if let Some(p) = &self.store.password {
            refs.push(("store.password".to_owned(), p.clone()));
        }
        if let Some(slack) = &self.notify.slack {
            refs.push(("notify.slack.bot_token".to_owned(), slack.bot_token.clone()));
            refs.push((
                "notify.slack.signing_secret".to_owned(),
                slack.signing_secret.clone(),
            ));
        }
        for w in &self.notify.webhooks {
            refs.push((
                format!("notify.webhooks `{}` secret", w.name),
                w.secret.clone(),
            ));
        }
        refs
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&e, text),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.server.issuer.starts_with("https://")
            || self.server.issuer.starts_with("http://"))
        {
            return bad(format!(
                "`server.issuer` must be an http(s) URL, got `{}`",
                self.server.issuer
            ));
        }
        if self.sessions.default_ttl_secs == 0
            || self.sessions.default_ttl_secs > self.sessions.max_ttl_secs
        {
            return bad("`sessions.default_ttl_secs` must be between 1 and `max_ttl_secs`".into());
        }
        lifecycle::validate(&self.lifecycle).map_err(ConfigError::Invalid)?;
        crate::validation::validate(&self.validation, &self.detectors)
            .map_err(ConfigError::Invalid)?;
        if let Some(d) = self.detectors.iter().find(|d| {
            d.scope
                .as_ref()
                .is_some_and(|s| !self.scopes.iter().any(|c| &c.name == s))
        }) {
            return bad(format!(
                "`[[detectors]]` `{}`: `scope` names no configured scope",
                d.name
            ));
        }
        crate::governance::people::validate(&self.people).map_err(ConfigError::Invalid)?;
        if self.governance.sweep_interval_secs == 0 {
            return bad("`governance.sweep_interval_secs` must be at least 1".into());
        }
        if self.leases.revoke_concurrency == 0 {
            return bad("`leases.revoke_concurrency` must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for op in &self.operators {
            if !names.insert(op.name.as_str()) {
                return bad(format!("operator `{}` is declared twice", op.name));
            }
            let h = &op.token_sha256;
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!(
                    "operator `{}`: `token_sha256` must be 64 hex digits (sha256 of the token)",
                    op.name
                ));
            }
            if op.roles.is_empty() {
                return bad(format!("operator `{}` has no roles", op.name));
            }
        }
        let mut scopes = std::collections::BTreeSet::new();
        for s in &self.scopes {
            if !scopes.insert(s.name.as_str()) {
                return bad(format!("scope `{}` is declared twice", s.name));
            }
            if !self.providers.contains_key(&s.provider) {
                return bad(format!(
                    "scope `{}` names provider `{}`, which is not declared under [providers]",
                    s.name, s.provider
                ));
            }
            if s.max_ttl_secs == 0 {
                return bad(format!(
                    "scope `{}`: `max_ttl_secs` must be positive",
                    s.name
                ));
            }
        }
        for op in &self.operators {
            if let Some(u) = &op.slack_user_id
                && self
                    .operators
                    .iter()
                    .filter(|o| o.slack_user_id.as_ref() == Some(u))
                    .count()
                    > 1
            {
                return bad(format!(
                    "Slack user `{u}` is mapped to more than one operator"
                ));
            }
        }
        for s in &self.scopes {
            if s.approvals == Some(0) {
                return bad(format!(
                    "scope `{}`: `approvals` must be at least 1",
                    s.name
                ));
            }
        }
        if self.approvals.quorum_by_tier.contains(&0) || self.provisioning.approvals == 0 {
            return bad("approval quorums must be at least 1".into());
        }
        if self.approvals.expiry_secs == 0 || self.provisioning.expiry_secs == 0 {
            return bad("approval expiries must be positive".into());
        }
        if let Some(slack) = &self.notify.slack {
            check_outbound_url("notify.slack.api_url", &slack.api_url)?;
        }
        let mut hooks = std::collections::BTreeSet::new();
        for h in &self.notify.webhooks {
            if !hooks.insert(h.name.as_str()) {
                return bad(format!("webhook `{}` is declared twice", h.name));
            }
            check_outbound_url(&format!("webhook `{}`", h.name), &h.url)?;
        }
        if let Some(name) = &self.console.oidc_issuer
            && !self
                .federation
                .issuers
                .iter()
                .any(|i| &i.name == name && i.users)
        {
            return bad(format!(
                "`[console] oidc_issuer` names `{name}`, which is not a `[[federation.issuers]]` entry with `users = true`"
            ));
        }
        let mut fed = std::collections::BTreeSet::new();
        let mut urls = std::collections::BTreeMap::new();
        for i in &self.federation.issuers {
            if !fed.insert(i.name.as_str()) {
                return bad(format!("federation issuer `{}` is declared twice", i.name));
            }
            // A token names its issuer by URL: a second entry for the same
            // URL would never be the one a token is checked against.
            if let Some(first) = urls.insert(i.issuer.trim_end_matches('/'), i.name.as_str()) {
                return bad(format!(
                    "federation issuers `{first}` and `{}` both name issuer `{}`: a token is checked against one entry per issuer, so declare it once",
                    i.name, i.issuer
                ));
            }
            check_outbound_url(&format!("federation issuer `{}`", i.name), &i.issuer)?;
            if let Some(u) = &i.jwks_url {
                check_outbound_url(&format!("federation issuer `{}` jwks_url", i.name), u)?;
            }
            if i.audience.trim().is_empty() {
                return bad(format!(
                    "federation issuer `{}` needs an `audience`",
                    i.name
                ));
            }
        }
        for (name, table) in &self.providers {
            if !matches!(table.get("kind"), Some(toml::Value::String(_))) {
                return bad(format!("provider `{name}` needs a `kind`"));
            }
        }
        Ok(())
    }

    /// Where approvers reach Keygate, for links in messages.
    pub fn public_url(&self) -> &str {
        self.notify
            .public_url
            .as_deref()
            .unwrap_or(&self.server.issuer)
            .trim_end_matches('/')
    }

    /// The token endpoint URL, which client assertions may name as `aud`.
    pub fn token_endpoint(&self) -> String {
        format!("{}/oauth/token", self.server.issuer.trim_end_matches('/'))
    }
}

/// Outbound notification URLs must be https, except to this machine
/// (development and tests).
fn check_outbound_url(what: &str, raw: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(raw)
        .map_err(|e| ConfigError::Invalid(format!("{what}: `{raw}` is not a URL: {e}")))?;
    let loopback = matches!(
        url.host(),
        Some(url::Host::Ipv4(a)) if a.is_loopback()
    ) || matches!(url.host(), Some(url::Host::Ipv6(a)) if a.is_loopback())
        || url.host_str() == Some("localhost");
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(ConfigError::Invalid(format!(
            "{what}: `{raw}` must be an https URL (plain http only to localhost)"
        ))),
    }
}
