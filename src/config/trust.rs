//! The config of who is trusted and who decides: trusted issuers for
//! workload identity federation, approvals and provisioning approvals, and
//! how approvers and reviewers are told (Slack, webhooks).

use std::collections::BTreeMap;
use std::path::PathBuf;

use keygate_provider_api::SecretRef;
use serde::Deserialize;

/// Issuers whose JWTs may authenticate agents (workload identity federation).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    #[serde(default)]
    pub issuers: Vec<TrustedIssuer>,
}

/// One trusted issuer: a Kubernetes cluster, a CI system, a cloud.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The name agents' `federated.issuer` refers to.
    pub name: String,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Where its keys are; default: OIDC discovery at `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The `aud` its tokens must carry for Keygate.
    pub audience: String,
    /// Signature algorithms accepted (asymmetric only).
    #[serde(default = "default_federation_algs")]
    pub algorithms: Vec<String>,
    /// Claims that must have exactly these string values.
    #[serde(default)]
    pub required_claims: BTreeMap<String, String>,
    /// The claim that names the workload (default `sub`).
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Extra trusted root (PEM) for fetching its keys.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `true`: it issues users' ID tokens (for tasks acting on behalf of a
    /// user), not workload identities.
    #[serde(default)]
    pub users: bool,
    /// The claim listing a user's groups (default `groups`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_federation_algs() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

fn default_subject_claim() -> String {
    "sub".into()
}

/// How sensitive-scope approvals work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// How long a request waits for its approvers (never past its task).
    pub expiry_secs: u64,
    /// Approvals needed by the agent's risk tier (tier 1, 2, 3), unless the
    /// scope sets `approvals`.
    pub quorum_by_tier: [u32; 3],
    /// Whether the agent's sponsor may be the only approver of its requests
    /// (separation of duties says no).
    pub sponsor_may_approve_alone: bool,
    /// Risk tiers whose approvals cannot be decided by a Slack click: Slack
    /// links to Keygate and the approver decides through the API or CLI.
    pub confirm_in_api_tiers: Vec<u8>,
    /// The longest `?wait=` an agent may long-poll an approval for.
    pub max_wait_secs: u64,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            expiry_secs: 3600,
            quorum_by_tier: [1, 1, 2],
            sponsor_may_approve_alone: false,
            confirm_in_api_tiers: Vec::new(),
            max_wait_secs: 60,
        }
    }
}

/// Sign-off for new agent identities and widened permissions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// New agents start `pending` and changes that widen an agent's reachable
    /// scopes wait, until approved.
    pub require_approval: bool,
    /// Approvals needed (seed 000: team lead + CISO office = 2).
    pub approvals: u32,
    /// Teams whose approvers may decide; empty means any approver.
    pub approver_teams: Vec<String>,
    pub sponsor_may_approve_alone: bool,
    /// How long a provisioning request waits.
    pub expiry_secs: u64,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            require_approval: false,
            approvals: 2,
            approver_teams: Vec::new(),
            sponsor_may_approve_alone: false,
            expiry_secs: 7 * 24 * 3600,
        }
    }
}

/// Where approval requests are announced. Every channel is optional; the
/// API and CLI always work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    pub slack: Option<SlackConfig>,
    pub webhooks: Vec<WebhookConfig>,
    /// First retry delay after a failed delivery; doubles each attempt.
    pub retry_base_ms: u64,
    /// Longest delay between delivery attempts.
    pub retry_max_secs: u64,
    /// The address approvers reach Keygate at, for links in messages
    /// (defaults to `server.issuer`).
    pub public_url: Option<String>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            slack: None,
            webhooks: Vec::new(),
            retry_base_ms: 1000,
            retry_max_secs: 300,
            public_url: None,
        }
    }
}

/// A Slack app: posts approval requests, receives button clicks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Reference to the bot token (`xoxb-…`): `env:NAME`, `file:PATH`, `aws-sm:ID`.
    pub bot_token: SecretRef,
    /// Reference to the app's signing secret.
    pub signing_secret: SecretRef,
    /// Channel for scopes that name none.
    pub default_channel: String,
    /// Channel for continuous validation's `alert` incidents (SecOps);
    /// `default_channel` when unset.
    #[serde(default)]
    pub incident_channel: Option<String>,
    /// Slack's Web API base URL.
    #[serde(default = "default_slack_api")]
    pub api_url: String,
}

/// A generic webhook: signed JSON events; decisions come back via the API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// Reference to the HMAC key the events are signed with.
    pub secret: SecretRef,
}

fn default_slack_api() -> String {
    "https://slack.com/api".into()
}
