//! The broker's records: agents, tasks, leases, revocations. Plain data; the
//! rules that move them between states live in `broker` and `lease`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Declares a string-backed enum with `as_str`, `FromStr`, `Display` and serde
/// in snake case, so the database, the API and the CLI spell states alike.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// The stable spelling used in the API, the CLI and the store.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$(Self::$variant),+];
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "`{other}` is not one of: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Where an agent is in its lifecycle.
    AgentStatus {
        /// Registered, waiting for provisioning approval.
        Pending = "pending",
        /// May authenticate and request credentials.
        Active = "active",
        /// Temporarily barred; its leases were revoked.
        Suspended = "suspended",
        /// Retired for good; the record is kept as evidence.
        Decommissioned = "decommissioned",
    }
);

string_enum!(
    /// The deployment environment an agent runs in.
    Environment { Dev = "dev", Test = "test", Prod = "prod" }
);

string_enum!(
    /// How an agent proves who it is.
    AuthMethod {
        /// RFC 7523 client assertion signed by a key in the agent's JWKS.
        PrivateKeyJwt = "private_key_jwt",
    }
);

string_enum!(
    /// A task's state. Only `open` tasks accept their session token.
    TaskState {
        Open = "open",
        Completed = "completed",
        Expired = "expired",
        Revoked = "revoked",
    }
);

string_enum!(
    /// A lease's state.
    LeaseState {
        /// Row written, provider call in flight (or the broker crashed in it).
        Pending = "pending",
        /// Issued and handed to the agent.
        Active = "active",
        /// Queued for revocation; retried until the provider confirms.
        Revoking = "revoking",
        /// The provider confirmed it is dead (or never existed).
        Revoked = "revoked",
        /// Released, but the backend cannot kill it: it lives until expiry.
        Expiring = "expiring",
        /// Reached its expiry.
        Expired = "expired",
        /// The provider refused to issue; nothing exists to revoke.
        Failed = "failed",
    }
);

impl LeaseState {
    /// States from which a lease may still be a working credential.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Active | Self::Revoking | Self::Expiring
        )
    }
}

string_enum!(
    /// Whether a lease can be killed before expiry.
    Revocability {
        Revocable = "revocable",
        ExpiresAt = "expires_at",
        NotApplicable = "not_applicable",
    }
);

impl From<keygate_provider_api::Revocability> for Revocability {
    fn from(r: keygate_provider_api::Revocability) -> Self {
        use keygate_provider_api::Revocability as R;
        match r {
            R::Revocable => Self::Revocable,
            R::ExpiresAt => Self::ExpiresAt,
            R::NotApplicable => Self::NotApplicable,
        }
    }
}

/// A registered non-human principal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Agent {
    pub id: String,
    pub team: String,
    pub sponsor: String,
    pub risk_tier: u8,
    pub environment: Environment,
    pub purpose: String,
    pub labels: BTreeMap<String, String>,
    pub status: AgentStatus,
    pub auth_method: AuthMethod,
    /// Public keys only (`private_key_jwt`); private members are refused at registration.
    pub jwks: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_review_at: Option<OffsetDateTime>,
    /// Whom the agent may delegate to, and how deep.
    #[serde(default)]
    pub delegation: Delegation,
    /// The workload identity it proves itself with instead of a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedSubject>,
    /// Whether it may name the user it acts for without a user ID token
    /// (`on_behalf_of` at the token endpoint); an admin's decision.
    #[serde(default)]
    pub may_assert_users: bool,
    /// While suspended: the state a resume returns it to (`pending` for an
    /// agent whose provisioning approval was never granted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_from: Option<AgentStatus>,
    /// The longest any session or credential of the agent may live, below
    /// the broker's and the scopes' own limits (seed 000's per-agent TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl_secs: Option<u64>,
    /// Scopes the registry denies it whatever policy says (a review's
    /// `narrow`, an unused scope removed, an admin's exclusion), until an
    /// admin lifts them: Keygate cannot edit the Cedar files, so it narrows
    /// here. A lifted exclusion stays, with who lifted it and when.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub excluded_scopes: BTreeMap<String, Exclusion>,
    /// When its keys last changed (`None`: never since registration), for
    /// the rotation its declared `credential.rotation_days` asks.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub keys_rotated_at: Option<OffsetDateTime>,
    /// When its team or sponsor last changed (`None`: never since
    /// registration): a review is due within the lifecycle's
    /// `deprovision_within_hours`.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub owner_changed_at: Option<OffsetDateTime>,
    /// Continuous validation's step-up: while set, its credential requests
    /// need a human (see [`StepUp`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_up: Option<StepUp>,
}

/// A person signed in to the web console.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleSession {
    pub operator: String,
    /// How they signed in: `token` or `oidc`.
    pub method: String,
    /// A fingerprint of what they signed in with (the configured token's
    /// hash, or the OIDC subject): the session ends when it changes.
    pub credential: Option<String>,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// An incident's step-up on an agent: its requests (every scope, or the
/// sensitive ones without policy's automatic approval) need a human until
/// an operator resolves the incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepUp {
    pub incident: String,
    pub scopes: crate::validation::StepUpScopes,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// Why and by whom a scope was excluded from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Exclusion {
    pub reason: String,
    pub by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_by: Option<String>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub lifted_at: Option<OffsetDateTime>,
}

impl Agent {
    /// The registry's standing (not lifted) exclusion of `scope`.
    pub fn exclusion(&self, scope: &str) -> Option<&Exclusion> {
        self.excluded_scopes
            .get(scope)
            .filter(|e| e.lifted_at.is_none())
    }

    /// `secs` capped by the agent's own `max_ttl_secs`.
    pub fn cap_ttl(&self, secs: u64) -> u64 {
        self.max_ttl_secs.map_or(secs, |cap| secs.min(cap))
    }
}

/// The user a task acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserContext {
    pub id: String,
    /// The trusted issuer that vouched for the user, or `asserted`.
    pub issuer: String,
    /// Groups from the user's token (Cedar `Keygate::Group`s).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A subject of a trusted issuer (e.g. `system:serviceaccount:ns:name` of
/// issuer `k8s-prod`) bound to one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FederatedSubject {
    /// A `[[federation.issuers]]` name.
    pub issuer: String,
    pub subject: String,
}

/// An orchestrator's delegation rights (RFC 8693 token exchange).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Delegation {
    /// Levels of sub-agents that may hang below the agent's tasks; 0: none.
    #[serde(default)]
    pub max_depth: u8,
    /// Agent ids it may delegate to.
    #[serde(default)]
    pub targets: Vec<String>,
}

/// One unit of agent work: a broker session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    pub id: String,
    pub agent_id: String,
    pub description: String,
    pub state: TaskState,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub end_reason: Option<String>,
    /// The orchestrator's task, for a delegated (child) task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<String>,
    /// 0 for a task opened by the agent itself; +1 per delegation.
    #[serde(default)]
    pub depth: u8,
    /// How many more levels of delegation may hang below this task.
    #[serde(default)]
    pub delegation_budget: u8,
    /// The scopes a delegated task may hold; `None`: whatever policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// The delegating agents, root orchestrator first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The user the task acts for; policy must permit both agent and user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<UserContext>,
}

/// One minted credential, as the broker remembers it. Holds the revoke handle,
/// never the credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub id: String,
    pub agent_id: String,
    pub task_id: String,
    pub scope: String,
    pub provider: String,
    pub state: LeaseState,
    pub revocability: Option<Revocability>,
    /// Opaque to the core; never sent to agents.
    #[serde(skip_serializing)]
    #[schema(ignore)]
    pub handle: Option<serde_json::Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub end_reason: Option<String>,
    /// Revocation attempts so far.
    pub attempts: u32,
    /// The last revocation error, kept visible until the provider confirms.
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub revocation_id: Option<String>,
    /// The process that wrote it (see `LeaseEngine::boot_id`).
    #[serde(skip)]
    pub boot_id: Option<String>,
    /// The client address the credential was asked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Which leases and sessions an emergency revocation hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    Agent(String),
    Team(String),
    Provider(String),
    All,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(a) => write!(f, "agent `{a}`"),
            Self::Team(t) => write!(f, "team `{t}`"),
            Self::Provider(p) => write!(f, "provider `{p}`"),
            Self::All => f.write_str("all"),
        }
    }
}

/// An emergency revocation, and how far it has got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revocation {
    pub id: String,
    pub selector: Selector,
    pub reason: String,
    pub operator: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Sessions ended by this revocation.
    pub tasks_ended: u64,
    /// Agents it suspended (`suspend`).
    pub agents_suspended: u64,
    /// Fences its providers could not put up.
    pub fence_failures: Vec<FenceFailure>,
}

/// A fence a provider could not put up: the kill switch is incomplete there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FenceFailure {
    pub provider: String,
    /// The role (or other target) it was for, when the provider got that far.
    pub target: Option<String>,
    pub name: Option<String>,
    pub agent: Option<String>,
    pub error: String,
}

/// Progress counts of the leases an emergency revocation queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevocationProgress {
    /// Live leases that matched.
    pub found: u64,
    /// Confirmed dead by their provider.
    pub revoked: u64,
    /// Cannot be killed; they live until their expiry.
    pub expiring: u64,
    /// Still queued (some may be failing: see `GET /v1/leases?state=revoking`).
    pub pending: u64,
}

/// Filters for listing leases.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LeaseFilter {
    pub agent: Option<String>,
    pub task: Option<String>,
    pub state: Option<LeaseState>,
    pub provider: Option<String>,
    /// At most this many (1 to [`MAX_PAGE`], default [`MAX_PAGE`]).
    pub limit: Option<u32>,
    /// Continue after this row (`Keygate-Next-Cursor` of the previous page).
    pub cursor: Option<String>,
}

/// The largest page a list endpoint answers.
pub const MAX_PAGE: u32 = 1000;

/// A list page's size: the asked limit, clamped to 1..=[`MAX_PAGE`].
pub fn page_size(limit: Option<u32>) -> u32 {
    limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE)
}

/// A position in a list ordered newest first: `<created_at>.<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: i64,
    pub id: String,
}

impl Cursor {
    pub fn of(created_at: OffsetDateTime, id: &str) -> String {
        format!("{}.{id}", unix(created_at))
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`cursor` `{s}` is not one this broker gave (use Keygate-Next-Cursor)");
        let (t, id) = s.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            created_at: t.parse().map_err(|_| bad())?,
            id: id.to_owned(),
        })
    }
}

/// Unix seconds for the store.
pub fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// Back from unix seconds; out-of-range values clamp to the epoch rather than fail.
pub fn from_unix(s: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// RFC 3339 text for messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Now, truncated to whole seconds so a value survives a store round trip.
pub fn now() -> OffsetDateTime {
    from_unix(OffsetDateTime::now_utc().unix_timestamp())
}

/// A new opaque id with a kind prefix: `tk_…`, `ls_…`, `rv_…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// A barrier an emergency revocation put up at a provider (an AWS deny
/// policy on a role), until an operator lifts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FenceRecord {
    pub id: String,
    pub revocation_id: String,
    pub provider: String,
    /// What it is attached to (a role ARN).
    pub target: String,
    /// Its name at the backend (an inline policy name).
    pub name: String,
    /// The agent it stops; `None` when it stops every session of the target.
    pub agent: Option<String>,
    /// What it does, in words.
    pub description: String,
    /// Opaque to the core: what the provider needs to lift it.
    #[serde(skip_serializing)]
    #[schema(ignore)]
    pub handle: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub lifted_at: Option<OffsetDateTime>,
    pub lifted_by: Option<String>,
    pub lift_reason: Option<String>,
    /// When the fence becomes moot (every session it denies has expired):
    /// Keygate lifts it then. `None`: it stands until an operator lifts it.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub expires_at: Option<OffsetDateTime>,
}

/// Filters for listing fences.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FenceFilter {
    pub revocation: Option<String>,
    pub provider: Option<String>,
    /// Only fences not lifted yet.
    #[serde(default)]
    pub active: bool,
    /// At most this many (every one when `None`; the API clamps it to a page).
    pub limit: Option<u32>,
    /// Continue after this row (`Keygate-Next-Cursor` of the previous page).
    pub cursor: Option<String>,
    /// Only fences moot by this time (internal: the sweep that lifts them).
    #[serde(skip)]
    pub moot_at: Option<OffsetDateTime>,
}

mod approvals;
pub use approvals::*;
