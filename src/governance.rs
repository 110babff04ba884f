//! Governance: the lifecycle control Keygate runs and proves (seed 000/001).
//!
//! - [`compliance`]: an agent's compliance issues under its effective
//!   `[[lifecycle]]` policy (`review_overdue`, `dormant`, `unused_scope`,
//!   `no_sponsor`, `long_ttl`, …), computed from facts the store holds;
//! - [`maturity`]: seed 000's maturity level per agent and overall, with the
//!   criteria each level needs and which fail;
//! - [`people`]: the people directory (sponsors, reviewers, team leads)
//!   and departures; [`reviews`]: access review campaigns; `exclusions`:
//!   the registry's per-agent scope exclusions and recording departures;
//! - [`sweep`]: the periodic pass that records issues as findings, acts when
//!   a deadline passes (suspend, decommission), and closes resolved ones —
//!   every step audited in the same transaction.

pub mod compliance;
pub mod evidence;
mod exclusions;
pub mod maturity;
pub mod people;
pub mod reviews;
pub mod sweep;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::LifecycleAction;

/// How an agent used one scope: read from its leases, no write per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScopeUsage {
    pub scope: String,
    #[serde(with = "time::serde::rfc3339")]
    pub last_used_at: OffsetDateTime,
    /// Credentials issued for it, ever.
    pub credentials: u64,
    /// The client addresses they were asked from (the most recent
    /// [`ScopeUsage::MAX_SOURCES`] distinct ones).
    #[serde(default)]
    pub sources: Vec<String>,
}

impl ScopeUsage {
    /// How many distinct source addresses a scope's usage lists.
    pub const MAX_SOURCES: usize = 16;
}

/// A compliance issue the sweep recorded, open until resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Finding {
    pub id: String,
    pub agent_id: String,
    pub kind: String,
    /// The scope of an `unused_scope` finding; empty otherwise.
    pub subject: String,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    /// When the lifecycle action falls due (`None`: notify only).
    #[serde(with = "time::serde::rfc3339::option")]
    pub action_due_at: Option<OffsetDateTime>,
    pub action: Option<LifecycleAction>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub acted_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub closed_at: Option<OffsetDateTime>,
    pub close_reason: Option<String>,
}
