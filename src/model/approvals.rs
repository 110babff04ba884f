//! Approvals, their decisions, and the notification outbox rows that
//! announce them (and review items).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

string_enum!(
    /// What an approval is about.
    ApprovalKind {
        /// A credential for a sensitive scope.
        Credential = "credential",
        /// A new agent identity, or a change that widens what an agent may obtain.
        Provisioning = "provisioning",
    }
);

string_enum!(
    /// Where an approval is.
    ApprovalState {
        Pending = "pending",
        Approved = "approved",
        Denied = "denied",
        Expired = "expired",
        Cancelled = "cancelled",
    }
);

string_enum!(
    /// One approver's answer.
    Verdict { Approve = "approve", Deny = "deny" }
);

/// A request for human sign-off, with every decision made on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    pub id: String,
    pub kind: ApprovalKind,
    pub state: ApprovalState,
    /// Who asked, as the audit log names actors (`agent:…`, `operator:…`).
    pub requester: String,
    pub agent_id: String,
    pub task_id: Option<String>,
    pub scope: Option<String>,
    /// What is asked: `{ttl, params}` for a credential, `{change, …}` for provisioning.
    pub request: serde_json::Value,
    pub justification: String,
    /// Approvals needed (the quorum).
    pub required: u32,
    /// Teams whose approvers may decide; empty means any approver.
    pub approver_teams: Vec<String>,
    /// The agent's sponsor when the request was made.
    pub sponsor: String,
    /// Whether the sponsor's approval alone may satisfy the request.
    pub sponsor_alone: bool,
    /// Whether Slack only links to the API, where the decision must be made.
    pub confirm_in_api: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
    pub end_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub redeemed_at: Option<OffsetDateTime>,
    pub lease_id: Option<String>,
    pub decisions: Vec<ApprovalDecision>,
}

impl Approval {
    /// The incidents whose step-ups this approval was asked under
    /// (`request.step_ups`; one, `request.step_up`, in approvals asked
    /// before every step-up on a delegation chain was named).
    pub fn step_up_incidents(&self) -> Vec<&str> {
        match self.request["step_ups"].as_array() {
            Some(all) => all.iter().filter_map(|i| i.as_str()).collect(),
            None => self.request["step_up"].as_str().into_iter().collect(),
        }
    }

    /// Approvals so far.
    pub fn approvals(&self) -> impl Iterator<Item = &ApprovalDecision> {
        self.decisions
            .iter()
            .filter(|d| d.decision == Verdict::Approve)
    }
}

/// One approver's decision on an approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalDecision {
    pub operator: String,
    pub decision: Verdict,
    /// Where it was made: `api` or `slack`.
    pub channel: String,
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Filters for listing approvals.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalFilter {
    pub state: Option<ApprovalState>,
    pub kind: Option<ApprovalKind>,
    pub agent: Option<String>,
    pub limit: Option<u32>,
    /// Continue after this row (`Keygate-Next-Cursor` of the previous page).
    #[serde(default)]
    pub cursor: Option<String>,
}

/// A message waiting in the notification outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    pub id: String,
    /// The approval it is about, or (`None`) the review item.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_item_id: Option<String>,
    /// The incident it alerts about (continuous validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    /// `slack` or `webhook:<name>`.
    pub channel: String,
    /// `requested`, `decided` or `reply` (an answer to one Slack click);
    /// for review items `review_requested`, `review_escalated`,
    /// `review_decided` or `reply`.
    pub event: String,
    pub payload: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
}
